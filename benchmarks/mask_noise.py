"""Masking noise for one training batch: maescale's counter-based hash on the device vs the
previous per-sample generators on the host (plus the copy of the noise to the device).

    python benchmarks/mask_noise.py --batch-size 256 --num-patches 196 --device cpu

Both are timed in interleaved rounds in one process (wall clock; synchronised on CUDA);
prints milliseconds per batch and the speedup (median of per-round ratios).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maescale.bench import interleaved_times, paired_ratio, pick_device  # noqa: E402
from maescale.data.loader import sample_mask_seed  # noqa: E402
from maescale.data.seeding import mask_noise  # noqa: E402


def per_sample_generators(seeds: torch.Tensor, num_patches: int, device: torch.device) -> torch.Tensor:
    """The previous way: one CPU generator re-seeded per sample, then one copy to the device."""
    noise = torch.empty(len(seeds), num_patches)
    generator = torch.Generator()
    for row, seed in zip(noise, seeds.tolist()):
        torch.rand(num_patches, generator=generator.manual_seed(seed), out=row)
    return noise.to(device, non_blocking=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-patches", type=int, default=196, help="196: ViT-B/L at 224 px, 256: ViT-H/14")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="batches per round")
    args = parser.parse_args()
    device = pick_device(args.device)
    seeds = torch.tensor([sample_mask_seed(0, 0, i) for i in range(args.batch_size)])
    if device.type == "cuda":
        seeds = seeds.pin_memory()
    candidates = {
        "per-sample generators (host) + copy": lambda: per_sample_generators(seeds, args.num_patches, device),
        "hash on the device": lambda: mask_noise(seeds.to(device, non_blocking=True), args.num_patches),
    }
    times = interleaved_times(candidates, rounds=args.rounds, steps_per_round=args.steps, warmup=3, device=device)
    reference = times[next(iter(candidates))]
    print(f"| masking noise, batch {args.batch_size} x {args.num_patches} patches, {device.type} "
          "| ms per batch | speedup |")
    print("| --- | --- | --- |")
    for name, t in times.items():
        print(f"| {name} | {1000 * min(t):.3f} | {paired_ratio(reference, t):.2f}x |")


if __name__ == "__main__":
    main()
