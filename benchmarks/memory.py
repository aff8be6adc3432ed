"""Per-process memory of each parallel strategy, measured side by side.

    python benchmarks/memory.py --model mae_vit_base_patch16 --nproc 2 \
        --strategies ddp fsdp2 zero1 zero2 zero3

Each strategy runs in fresh processes (torchrun, gloo on CPU or NCCL on GPUs) that build
the model exactly as the trainer does (maescale.parallel), run one forward + backward +
AdamW step on one image per process (fp32 unless the row says bf16), and report per process:

* parameters held: elements of the model's weights stored here (DTensor shards and ZeRO-3
  partitions count their local part);
* live tensors after backward / after the step: bytes of every distinct tensor storage
  reachable from Python (weights, gradients, ZeRO's flat buffers and fp32 master
  partitions, optimizer moments), deduplicated by storage, so no strategy's internals need
  to be known;
* peak RSS growth: the process's high-water resident memory minus its resident memory
  before the model was built (Linux), which also sees buffers owned by C++ (DDP buckets);
  also taken right after construction (`maescale.parallel.build_model`: FSDP2 from the meta
  device, ZeRO-3 under `deepspeed.zero.Init`), and compared with the whole fp32 model.

The table shows the maximum over processes; "vs ddp" compares the larger live-tensor figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# strategy name in the table -> config overrides
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp2": ["parallel.strategy=fsdp2"],
    "zero1": ["parallel.strategy=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
    # bf16 changes what is stored only where the weights themselves are cast (DDP autocasts)
    "fsdp2_bf16": ["parallel.strategy=fsdp2", "train.precision=bf16"],
    "zero3_bf16": ["parallel.strategy=deepspeed", "parallel.zero_stage=3", "train.precision=bf16"],
}
RESULT_PREFIX = "MEMORY_RESULT "


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of all tensors the garbage collector can see."""
    from torch.distributed.tensor import DTensor

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or isinstance(obj, DTensor) or obj.is_meta:
            continue  # a DTensor's local shard is a tensor of its own and is counted as such
        storage = obj.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def resident_kib(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def parameters_held(model) -> int:
    """Bytes of the weights stored here (a DTensor's shard, a ZeRO-3 partition)."""
    from maescale.shards import local_tensor

    return sum(local_tensor(p).nbytes for p in model.parameters())


def full_fp32_bytes(model) -> int:
    """The whole model in fp32, also when sharded."""
    from maescale.shards import full_shape

    return 4 * sum(full_shape(p).numel() for p in model.parameters())


def measure(model_name: str, strategy: str, construction_only: bool = False) -> dict[str, int]:
    """Run one step with `strategy` in this (torchrun-launched) process."""
    from maescale import parallel
    from maescale.config import load_config
    from maescale.models import build_model
    from maescale.optim import build_optimizer

    cfg = load_config(None, [f"model.name={model_name}", "data.batch_size=1", *STRATEGIES[strategy]])
    accelerator = parallel.build_accelerator(cfg)
    rss_before = resident_kib("VmRSS")
    torch.manual_seed(0)
    model = parallel.build_model(lambda: build_model(model_name), cfg, accelerator)
    construction = (resident_kib("VmHWM") - rss_before) * 1024
    if construction_only:  # models whose training step does not fit this machine
        return {"parameters": parameters_held(model), "rss_at_construction": construction,
                "full_model": full_fp32_bytes(model)}
    optimizer = build_optimizer(model, cfg, lr=1e-4)
    shape = (1, model.in_chans, *model.img_size)  # before prepare() wraps the model
    model, optimizer = parallel.prepare(model, optimizer, cfg, accelerator)
    images = torch.randn(shape, device=accelerator.device, dtype=parallel.input_dtype(accelerator))
    loss, _, _ = model(images)
    accelerator.backward(loss)
    # Gradients live in C++ until Python asks for them; holding them makes them visible.
    gradients = [p.grad for p in model.parameters()]  # noqa: F841
    after_backward = live_tensor_bytes()
    optimizer.step()
    after_step = live_tensor_bytes()
    return {
        "parameters": parameters_held(model),
        "after_backward": after_backward,
        "after_step": after_step,
        "rss_at_construction": construction,
        "rss_growth": (resident_kib("VmHWM") - rss_before) * 1024,
        "full_model": full_fp32_bytes(model),
    }


def worker(model_name: str, strategy: str, construction_only: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    result = measure(model_name, strategy, construction_only)
    values = torch.tensor(list(result.values()), dtype=torch.int64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(RESULT_PREFIX + json.dumps(dict(zip(result, values.tolist()))), flush=True)


def launch(model_name: str, strategy: str, nproc: int, construction_only: bool = False) -> dict[str, int]:
    """Fresh processes per strategy, so one strategy's peak memory never hides another's."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               __file__, "--worker", strategy, "--model", model_name]
    command += ["--construction-only"] * construction_only
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"{strategy} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def print_table(model_name: str, nproc: int, rows: dict[str, dict[str, int]]) -> None:
    print(f"{model_name}, {nproc} processes, AdamW, one image per process; MiB per process (max over processes)\n")
    print("| strategy | parameters held | live tensors after backward | after step | peak RSS growth "
          "| RSS growth at construction (x full fp32 model) | vs ddp |")
    print("|---|---|---|---|---|---|---|")
    base = max(rows["ddp"]["after_backward"], rows["ddp"]["after_step"]) if "ddp" in rows else None
    for strategy, r in rows.items():
        mib = {k: v / 2**20 for k, v in r.items()}
        ratio = f"{max(r['after_backward'], r['after_step']) / base:.2f}" if base else "-"
        print(f"| {strategy} | {mib['parameters']:.0f} | {mib['after_backward']:.0f} | {mib['after_step']:.0f} | "
              f"{mib['rss_growth']:.0f} | {mib['rss_at_construction']:.0f} "
              f"({r['rss_at_construction'] / r['full_model']:.2f}x) | {ratio} |")


def print_construction(model_name: str, nproc: int, rows: dict[str, dict[str, int]]) -> None:
    print(f"{model_name}, {nproc} processes, construction only; MiB per process (max over processes)\n")
    print("| strategy | parameters held | RSS growth at construction (x full fp32 model) |")
    print("|---|---|---|")
    for strategy, r in rows.items():
        print(f"| {strategy} | {r['parameters'] / 2**20:.0f} | {r['rss_at_construction'] / 2**20:.0f} "
              f"({r['rss_at_construction'] / r['full_model']:.2f}x) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16")
    parser.add_argument("--nproc", type=int, default=2, help="processes per strategy")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--construction-only", action="store_true",
                        help="stop after building the model (for models whose step does not fit in memory)")
    parser.add_argument("--worker", choices=list(STRATEGIES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.worker, args.construction_only)
        return
    rows = {}
    for strategy in args.strategies:
        rows[strategy] = launch(args.model, strategy, args.nproc, args.construction_only)
        print(f"measured {strategy}", file=sys.stderr, flush=True)
    (print_construction if args.construction_only else print_table)(args.model, args.nproc, rows)


if __name__ == "__main__":
    main()
