"""The measurements of benchmarks/gpu_check.sh, one section per call (each in its own process).

    python benchmarks/gpu_suite.py sweep   --out DIR    # images/s per batch size; best batch per model
    python benchmarks/gpu_suite.py best    --out DIR    # at the best batch: plain eager vs compiled (whole, per block)
    python benchmarks/gpu_suite.py encoder --out DIR    # encoder-only vs mask tokens in the encoder

Every row goes to DIR/results.jsonl (with its section) and, as Markdown, to DIR/table.md.
`sweep` writes DIR/best_batch.json, which the later sections read. Defaults are the
bf16 ViT-B/L/H measurements; --models/--batch-sizes/--device let a test run it on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maescale.bench import (  # noqa: E402
    COMPARE_HEADER,
    COMPARE_RULE,
    TABLE_HEADER,
    TABLE_RULE,
    StepVariant,
    bench_train_step,
    compare_row,
    compare_variants,
    table_row,
)

PAPER_MODELS = ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]
BEST_BATCH_FILE = "best_batch.json"


def _emit(out: Path, section: str, rows: list[dict], header: str, rule: str, to_row) -> None:
    with (out / "results.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps({"section": section, **row}) + "\n")
    lines = [f"\n### {section}\n", header, rule, *map(to_row, rows)]
    with (out / "table.md").open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sweep(args: argparse.Namespace) -> None:
    """Eager bf16 step at each batch size; the batch with the most images/s is the model's best."""
    best: dict[str, int] = {}
    for model in args.models:
        rows = []
        for batch in args.batch_sizes:
            try:
                rows.append(bench_train_step(model, batch_size=batch, precision=args.precision, steps=args.steps,
                                             warmup=args.warmup, device=args.device))
            except torch.OutOfMemoryError:
                print(f"{model} batch {batch}: out of memory", flush=True)
                break  # larger batches will not fit either
            finally:
                _free_memory()
        if rows:
            best[model] = max(rows, key=lambda r: r["images_per_sec"])["batch_size"]
            _emit(args.out, f"sweep {model}", rows, TABLE_HEADER, TABLE_RULE, table_row)
    (args.out / BEST_BATCH_FILE).write_text(json.dumps(best, indent=1))


def _best_batches(args: argparse.Namespace) -> dict[str, int]:
    path = args.out / BEST_BATCH_FILE
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the sweep section first")
    return {model: batch for model, batch in json.loads(path.read_text()).items() if model in args.models}


def _compare(args, section: str, model: str, batch: int, variants: dict[str, StepVariant]) -> None:
    rows = compare_variants(model, variants, batch_size=batch, precision=args.precision, rounds=args.rounds,
                            steps_per_round=args.steps, warmup=args.warmup, device=args.device)
    _emit(args.out, section, rows, COMPARE_HEADER, COMPARE_RULE, compare_row)
    _free_memory()


def best(args: argparse.Namespace) -> None:
    """Plain step at the best batch: eager vs torch.compile of the whole model and of each block, interleaved."""
    variants = {"eager": StepVariant()}
    if args.compile:
        variants["compile"] = StepVariant(compile=True)
        variants["compile_blocks"] = StepVariant(compile_blocks=True)
    for model, batch in _best_batches(args).items():
        _compare(args, f"best batch {model}", model, batch, variants)


def encoder(args: argparse.Namespace) -> None:
    """Mask tokens in the encoder (reference) vs the MAE encoder on visible patches only."""
    for model in args.models:
        _compare(args, f"encoder {model}", model, args.encoder_batch,
                 {"mask_tokens_in_encoder": StepVariant(mask_tokens_in_encoder=True), "encoder_only": StepVariant()})


SECTIONS = {"sweep": sweep, "best": best, "encoder": encoder}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=list(SECTIONS))
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--models", nargs="+", default=PAPER_MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 256, 512], help="sweep section")
    parser.add_argument("--encoder-batch", type=int, default=64,
                        help="encoder section (mask tokens need ~4x activations)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (per round when comparing)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds when comparing")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="best section: eager only")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    SECTIONS[args.section](args)


if __name__ == "__main__":
    main()
