"""Peak live tensor memory of one forward + backward, plain vs FSDP2 over a process group of one,
measured and as `maescale plan` predicts it.

    OMP_NUM_THREADS=1 python benchmarks/backward_peak.py --models mae_vit_micro_patch4 mae_vit_tiny_patch4

Exact bytes, not timings, of a first step (every buffer is created inside it): each storage it
creates is followed by `maescale.plan.LiveStorageTracker` (the weights excluded) at its size of
the moment, and the largest live total after any op is the peak (activations, gradients and
FSDP2's gathered and reduce buffers). `fsdp2` is the trainer's cut; `fsdp2_copy_reduce` lets
FSDP2 copy each gradient reduction's input into an output buffer of its own, as it does without
`parallel.ReduceOverOneRank`. "planned" is the planner's largest total up to the end of backward
for the same step (fp32, one process, first step, no batch on the device), less the weights.
"""

from __future__ import annotations

import argparse

import torch

from maescale import parallel
from maescale.models import build_model
from maescale.plan import LiveStorageTracker, Setup, model_shape, simulate_step
from maescale.shards import local_tensor

CUTS = {"plain": None, "fsdp2_copy_reduce": parallel.FSDP2Options(reduce_in_place=False),
        "fsdp2": parallel.FSDP2Options()}
PLANNED = {"plain": "ddp", "fsdp2": "fsdp2"}  # cut -> the planner's strategy at world size 1


def step_peak(model_name: str, cut: parallel.FSDP2Options | None, batch: int) -> int:
    torch.manual_seed(0)
    model = build_model(model_name)
    if cut is not None:
        parallel.shard_fsdp2(model, parallel.device_mesh(1, "cpu"), cut)
    images = torch.randn(batch, model.in_chans, *model.img_size)
    noise = torch.rand(batch, model.patch_embed.num_patches)
    tracker = LiveStorageTracker(existing=[local_tensor(p) for p in model.parameters()], track_peak=True)
    with tracker:
        model(images, noise=noise)[0].backward()
    return tracker.peak


def planned_peak(model_name: str, strategy: str, batch: int) -> int:
    setup = Setup(strategy=strategy, world_size=1, precision="fp32", batch_size=batch, input_batches=0,
                  first_step=True)
    step = simulate_step(model_shape(model_name), setup)
    return step.peaks_until["after_backward"] - step.marks["forward"]["parameters"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mae_vit_micro_patch4", "mae_vit_tiny_patch4"])
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    parallel.start_process_group_of_one(torch.device("cpu"))
    columns = [f"{cut} MiB" for cut in CUTS] + [f"planned {cut} MiB (/ measured)" for cut in PLANNED]
    print(f"| model, batch {args.batch_size} | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name in args.models:
        measured = {cut: step_peak(name, options, args.batch_size) for cut, options in CUTS.items()}
        cells = [f"{peak / 2**20:.2f}" for peak in measured.values()]
        for cut, strategy in PLANNED.items():
            planned = planned_peak(name, strategy, args.batch_size)
            cells.append(f"{planned / 2**20:.2f} ({planned / measured[cut]:.3f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
