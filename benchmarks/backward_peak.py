"""Peak live tensor memory of one forward + backward, plain vs FSDP2 over a process group of one.

    OMP_NUM_THREADS=1 python benchmarks/backward_peak.py --models mae_vit_micro_patch4 mae_vit_tiny_patch4

Exact bytes, not timings, of a first step (every buffer is created inside it): each storage it
creates is followed by `maescale.plan.LiveStorageTracker` (the weights excluded) at its size of
the moment, and the largest live total after any op is the peak (activations, gradients and
FSDP2's gathered and reduce buffers). `fsdp2` is the
trainer's cut; `fsdp2_copy_reduce` lets FSDP2 copy each gradient reduction's input into an output
buffer of its own, as it does without `parallel.ReduceOverOneRank`.
"""

from __future__ import annotations

import argparse

import torch

from maescale import parallel
from maescale.models import build_model
from maescale.plan import LiveStorageTracker

CUTS = {"plain": None, "fsdp2_copy_reduce": parallel.FSDP2Options(reduce_in_place=False),
        "fsdp2": parallel.FSDP2Options()}


def step_peak(model_name: str, cut: parallel.FSDP2Options | None, batch: int) -> int:
    torch.manual_seed(0)
    model = build_model(model_name)
    if cut is not None:
        parallel.shard_fsdp2(model, parallel.device_mesh(1, "cpu"), cut)
    images = torch.randn(batch, model.in_chans, *model.img_size)
    noise = torch.rand(batch, model.patch_embed.num_patches)
    weights = [p.to_local() if cut is not None else p for p in model.parameters()]
    tracker = LiveStorageTracker(existing=weights, track_peak=True)
    with tracker:
        model(images, noise=noise)[0].backward()
    return tracker.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mae_vit_micro_patch4", "mae_vit_tiny_patch4"])
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    parallel.start_process_group_of_one(torch.device("cpu"))
    print(f"| model, batch {args.batch_size} | " + " | ".join(f"{cut} MiB" for cut in CUTS) + " |")
    print("|---" * (len(CUTS) + 1) + "|")
    for name in args.models:
        peaks = [step_peak(name, cut, args.batch_size) / 2**20 for cut in CUTS.values()]
        print(f"| {name} | " + " | ".join(f"{peak:.2f}" for peak in peaks) + " |")


if __name__ == "__main__":
    main()
