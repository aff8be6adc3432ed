"""FSDP2's per-step copies of one unit, timed alone: what they cost without a training step around them.

    OMP_NUM_THREADS=1 python benchmarks/fsdp2_copies.py --model mae_vit_tiny_patch4 --blocks 4

At world size 1 FSDP2 still copies every parameter into its gathered buffer in forward, and in
backward concatenates the unit's gradients into the reduce buffer (`_chunk_cat`) and copies that
into the reduce output (a copy that maescale's `parallel.ReduceOverOneRank` turns into a no-op:
the output is the input's buffer). Here the same three copies run on tensors of one unit's shapes (the
first `--blocks` encoder blocks) in a loop, buffers reused, CPU time of one thread; compare with
the ops `benchmarks/host_overhead.py --op-profile` finds inside the step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_overhead import timed  # noqa: E402  (the same CPU-time clock as --op-profile's step)

from maescale.models import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_tiny_patch4")
    parser.add_argument("--blocks", type=int, default=4, help="encoder blocks per unit (parallel.blocks_per_unit)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(args.model)
    prefixes = tuple(f"blocks.{i}." for i in range(args.blocks))
    params = [p.detach() for name, p in model.named_parameters() if name.startswith(prefixes)]
    grads = [torch.randn_like(p) for p in params]
    total = sum(p.numel() for p in params)
    flat_in, flat_out = torch.randn(1, total), torch.empty(1, total)
    gathered = [torch.empty_like(p) for p in params]
    rows = {
        "gradients -> reduce buffer (_chunk_cat)": lambda: torch._chunk_cat(grads, 0, 1, out=flat_out),
        "reduce buffer -> reduce output (copy_)": lambda: flat_out.copy_(flat_in),
        "parameters -> gathered buffers (copy_ each)": lambda: [g.copy_(p) for g, p in zip(gathered, params)],
    }
    print(f"{args.model}, {args.blocks} blocks: {len(params)} tensors, {total * 4 / 1e6:.1f} MB fp32")
    print("| copy | ms | GB/s (read + write) |\n|---|---|---|")
    for label, fn in rows.items():
        timed(fn, 3)  # warm-up
        ms = 1000 * timed(fn, args.repeats)
        print(f"| {label} | {ms:.3f} | {2 * total * 4 / ms / 1e6:.1f} |")


if __name__ == "__main__":
    main()
