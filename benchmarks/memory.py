"""Per-process memory of each parallel strategy, measured side by side and set against `maescale plan`.

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

`maescale plan`'s predictions next to the measurements they model (no processes started):

    python benchmarks/memory.py --cpu benchmarks/results/2026-12-0[23]-memory-vit-*.txt \
        --gpu benchmarks/results/2026-11-26-h200.jsonl

CPU rows: saved outputs of this script (first line: the command that produced them; then
its table), one image per process, fp32 unless the strategy says bf16, on gloo, in fresh processes,
so one forward + backward + first AdamW step, which is what the prediction simulates
(`Setup(first_step=True)`). Each measured column is predicted as the quantity
it is:

* live tensors after backward / after step: the state, gradients and buffers Python can reach
  (not DDP's C++ buckets, not collective temporaries, no activations: backward freed them). Under
  DeepSpeed "after backward" already follows the optimizer step: Accelerate's `backward` runs the
  engine's step;
* peak RSS growth: the simulated peak. RSS follows allocated memory only when freed memory goes
  back to the system: runs with MALLOC_MMAP_THRESHOLD_=131072 in their command (glibc then maps
  every allocation of 128 KiB or more on its own and unmaps it when freed) measure that; with
  glibc's default, memory freed inside its heap stays resident and the RSS peak is higher.

GPU rows: the bare step of benchmarks/throughput.py (its --jsonl rows: one process, bf16 autocast,
fused AdamW, fp32 weights, the batch in memory), whose peak is CUDA's max_memory_allocated over the
timed steps; the prediction is the steady-state step (`Setup(strategy="ddp", world_size=1)`).
Compiled rows are predicted as the eager step (the planner does not model what inductor fuses).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from maescale.layout import STRATEGIES  # noqa: E402
from maescale.plan import INVISIBLE_TO_PYTHON, Setup, model_shape, simulate_step  # noqa: E402

# The table's rows: every strategy in fp32 (hsdp on one node is fsdp2), and in bf16 those whose
# weights themselves are cast (DDP autocasts, which changes no stored state).
ROWS = (*(name for name in STRATEGIES if name != "hsdp"), "fsdp2_bf16", "zero3_bf16")


def row_layout(row: str) -> tuple[str, str]:
    """A row's strategy and precision: `zero3_bf16` is zero3 in bf16, `ddp` is ddp in fp32."""
    strategy, _, precision = row.partition("_")
    return strategy, precision or "fp32"
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


def measure(model_name: str, row: str, construction_only: bool = False) -> dict[str, int]:
    """Run one step of `row`'s layout in this (torchrun-launched) process."""
    from maescale import parallel
    from maescale.config import load_config
    from maescale.models import build_model
    from maescale.optim import build_optimizer

    strategy, precision = row_layout(row)
    cfg = load_config(None, [f"model.name={model_name}", "data.batch_size=1", f"parallel.strategy={strategy}",
                             f"train.precision={precision}"])
    layout = parallel.launch_layout(cfg.parallel, cfg.train.precision)
    zero = parallel.ZeroSettings(width=model_shape(model_name).encoder.width)  # the trainer's buckets
    accelerator = parallel.build_accelerator(layout, cfg.parallel.backend, zero)
    rss_before = resident_kib("VmRSS")
    torch.manual_seed(0)
    model = parallel.build_model(lambda: build_model(model_name), layout, cfg.parallel, accelerator)
    construction = (resident_kib("VmHWM") - rss_before) * 1024
    if construction_only:  # models whose training step does not fit this machine
        return {"parameters": parameters_held(model), "rss_at_construction": construction,
                "full_model": full_fp32_bytes(model)}
    optimizer = build_optimizer(model, cfg.optim, lr=1e-4)
    shape = (1, model.in_chans, *model.img_size)  # before prepare() wraps the model
    model, optimizer = parallel.prepare(model, optimizer, layout, accelerator)
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


# ------------------------------------------------------------------ measurements against maescale plan


MIB, GIB = 2**20, 2**30
TOLERANCE = 0.20


def read_memory_output(path: Path) -> dict:
    """The command, model, process count and rows (MiB) of a saved output of this script."""
    lines = path.read_text().splitlines()
    command = lines[0].removeprefix("$ ").strip() if lines and lines[0].startswith("$ ") else ""
    header = next(line for line in lines if ", AdamW, one image per process" in line)
    model, nproc = re.match(r"(\S+), (\d+) processes", header).groups()
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] in ROWS:
            rows[cells[0]] = {"after_backward": float(cells[2]), "after_step": float(cells[3]),
                              "rss_growth": float(cells[4])}
    return {"command": command, "model": model, "nproc": int(nproc), "rows": rows,
            "rss_follows_live": "MALLOC_MMAP_THRESHOLD_" in command}


def visible_bytes(live: dict[str, int]) -> int:
    return sum(value for key, value in live.items() if key not in INVISIBLE_TO_PYTHON)


def predict_cpu_row(model: str, nproc: int, row: str) -> dict[str, float]:
    """MiB per process of what this script measures, for one row."""
    strategy, precision = row_layout(row)
    setup = Setup(strategy=strategy, world_size=nproc, precision=precision, batch_size=1, input_batches=1,
                  first_step=True)
    memory = simulate_step(model_shape(model), setup)
    stepped_in_backward = setup.zero_stage > 0
    after_backward = memory.marks["after_step" if stepped_in_backward else "after_backward"]
    return {"after_backward": visible_bytes(after_backward) / MIB,
            "after_step": visible_bytes(memory.marks["after_step"]) / MIB,
            "rss_growth": memory.peak / MIB}


def _cell(predicted: float, measured: float, ratios: list[float], digits: int = 0) -> str:
    ratio = predicted / measured
    ratios.append(ratio)
    flag = "" if abs(ratio - 1) <= TOLERANCE else " **"
    return f"{predicted:.{digits}f} / {measured:.{digits}f} ({ratio:.2f}{flag})"


def cpu_table(outputs: list[dict], ratios: list[float]) -> list[str]:
    lines = ["CPU, benchmarks/memory.py, MiB per process: predicted / measured (ratio; ** outside 20%)", "",
             "| model | strategy | live after backward | live after step | peak RSS growth | RSS allocator |",
             "|---|---|---|---|---|---|"]
    for out in outputs:
        allocator = "mmap threshold 128 KiB" if out["rss_follows_live"] else "glibc default"
        for strategy, measured in out["rows"].items():
            predicted = predict_cpu_row(out["model"], out["nproc"], strategy)
            # With glibc's default the RSS peak measures retention too; it is shown, not counted.
            rss_ratios = ratios if out["rss_follows_live"] else []
            lines.append(
                f"| {out['model']} | {strategy} | "
                f"{_cell(predicted['after_backward'], measured['after_backward'], ratios)} | "
                f"{_cell(predicted['after_step'], measured['after_step'], ratios)} | "
                f"{_cell(predicted['rss_growth'], measured['rss_growth'], rss_ratios)} | {allocator} |")
    return lines


def gpu_table(path: Path, ratios: list[float]) -> list[str]:
    lines = [f"GPU, {path}: peak GiB (max_memory_allocated), predicted / measured (ratio)", "",
             "| model | batch | compile | device | peak GiB | at |", "|---|---|---|---|---|---|"]
    for line in path.read_text().splitlines():
        row = json.loads(line)
        setup = Setup(strategy="ddp", world_size=1, precision=row["precision"], batch_size=row["batch_size"],
                      input_batches=1)
        memory = simulate_step(model_shape(row["model"]), setup)
        cell = _cell(memory.peak / GIB, row["peak_memory_gib"], ratios, digits=2)
        lines.append(f"| {row['model']} | {row['batch_size']} | {'on' if row['compile'] else 'off'} | "
                     f"{row['device']} | {cell} | {memory.peak_at} |")
    return lines

def check_plan(cpu: list[Path], gpu: list[Path]) -> None:
    """Print maescale plan's predictions against saved measurements, and how many fall within TOLERANCE."""
    ratios: list[float] = []
    lines = cpu_table([read_memory_output(path) for path in cpu], ratios) if cpu else []
    for path in gpu:
        lines += ["", *gpu_table(path, ratios)]
    within = sum(abs(r - 1) <= TOLERANCE for r in ratios)
    lines += ["", f"{within} of {len(ratios)} predictions within {TOLERANCE:.0%} of their measurement "
                  f"(ratios {min(ratios, default=1):.2f} .. {max(ratios, default=1):.2f}); peak RSS under glibc's "
                  "default allocator is shown but not counted: it also measures freed memory glibc keeps"]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16")
    parser.add_argument("--nproc", type=int, default=2, help="processes per strategy")
    parser.add_argument("--strategies", nargs="+", default=list(ROWS), choices=ROWS,
                        help="rows: a strategy (fp32), or fsdp2_bf16 / zero3_bf16")
    parser.add_argument("--construction-only", action="store_true",
                        help="stop after building the model (for models whose step does not fit in memory)")
    parser.add_argument("--cpu", nargs="+", type=Path, metavar="FILE",
                        help="instead of measuring: saved outputs of this script, set against maescale plan")
    parser.add_argument("--gpu", nargs="+", type=Path, metavar="FILE",
                        help="instead of measuring: benchmarks/throughput.py JSONL rows, set against maescale plan")
    parser.add_argument("--worker", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu or args.gpu:
        check_plan(args.cpu or [], args.gpu or [])
        return
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
