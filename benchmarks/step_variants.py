"""Variants of the training step side by side, timed in interleaved rounds in one process.

    python benchmarks/step_variants.py --models mae_vit_base_patch16 --batch-size 4 \\
        --variants maescale explicit_attention compile fused_adamw checkpointing straightforward

The first variant is the reference: "speedup" is its step time over each variant's, the
median of per-round ratios (rounds alternate the variants, so a machine whose load
changes affects all alike). Variants share one model's weights (see maescale/bench.py);
"straightforward" is a separate plain implementation (benchmarks/straightforward_mae.py)
of the same sizes. Prints a Markdown table; --jsonl appends one JSON object per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from straightforward_mae import build_straightforward, straightforward_step  # noqa: E402

from maescale.bench import COMPARE_HEADER, COMPARE_RULE, StepVariant, compare_row, compare_variants  # noqa: E402

VARIANTS = {
    "maescale": StepVariant(),
    "mask_tokens_in_encoder": StepVariant(mask_tokens_in_encoder=True),
    "explicit_attention": StepVariant(attention="explicit"),
    "compile": StepVariant(compile=True),
    "fused_adamw": StepVariant(fused_adamw=True),
    "unfused_adamw": StepVariant(fused_adamw=False),
    "checkpointing": StepVariant(activation_checkpointing=True),
    "selective_checkpointing": StepVariant(activation_checkpointing="selective"),
    "compile_fused": StepVariant(compile=True, fused_adamw=True),
}
OTHERS = ("straightforward",)


def straightforward_factory(model_name: str, device: torch.device, optimizer_step: bool):
    def build(images: torch.Tensor):
        return straightforward_step(build_straightforward(model_name).to(device), images, optimizer_step)

    return build


def run(model: str, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = {
        name: replace(VARIANTS[name], optimizer_step=args.optimizer) for name in args.variants if name in VARIANTS
    }
    others = {name: straightforward_factory(model, device, args.optimizer) for name in args.variants if name in OTHERS}
    if args.variants[0] not in VARIANTS:
        raise SystemExit(f"the first (reference) variant must be one of {sorted(VARIANTS)}")
    return compare_variants(
        model, variants, others=others, batch_size=args.batch_size, precision=args.precision,
        strategy=args.strategy, rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup,
        device=args.device, clock=args.clock, log=lambda line: print(f"{model}: {line}", file=sys.stderr, flush=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mae_vit_base_patch16"])
    parser.add_argument("--variants", nargs="+", choices=[*VARIANTS, *OTHERS], default=["maescale", "straightforward"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--strategy", choices=["plain", "fsdp2"], default="plain")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-optimizer", dest="optimizer", action="store_false",
                        help="time forward + backward only (the per-image work; AdamW's per-step cost left out)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (use with OMP_NUM_THREADS=1 on a shared machine)")
    parser.add_argument("--jsonl", help="append each result as a JSON line to this file")
    args = parser.parse_args()
    print(COMPARE_HEADER)
    print(COMPARE_RULE)
    for model in args.models:
        for row in run(model, args):
            print(compare_row(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
