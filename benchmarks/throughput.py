"""Training-step throughput table: models x batch sizes x precision x compile, one run.

    python benchmarks/throughput.py --models mae_vit_tiny_patch4 mae_vit_base_patch16 --batch-sizes 8

Prints a Markdown table (images/s, ms/step, achieved TFLOP/s, MFU on known GPUs,
peak memory) and, with --jsonl, appends one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maescale.bench import TABLE_HEADER, TABLE_RULE, bench_train_step, table_row  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mae_vit_tiny_patch4", "mae_vit_base_patch16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--jsonl", help="append each result as a JSON line to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    compile_choices = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    print(TABLE_HEADER)
    print(TABLE_RULE)
    for model in args.models:
        for batch in args.batch_sizes:
            for precision in args.precision:
                for compiled in compile_choices:
                    result = bench_train_step(
                        model, batch_size=batch, precision=precision, compile=compiled,
                        steps=args.steps, warmup=args.warmup, device=args.device,
                    )
                    print(table_row(result), flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a") as f:
                            f.write(json.dumps(result) + "\n")
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
