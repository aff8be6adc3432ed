"""`maescale plan`'s predictions next to the measurements they model.

    python benchmarks/plan_check.py --cpu docs/cpu/2026-12-02-memory-*.txt --gpu docs/gpu/2026-11-26-h200.jsonl

CPU rows: saved outputs of benchmarks/memory.py (first line: the command that produced them; then
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

GPU rows: the bare step of benchmarks/throughput.py (docs/gpu/*.jsonl: one process, bf16 autocast,
fused AdamW, fp32 weights, the batch in memory), whose peak is CUDA's max_memory_allocated over the
timed steps; the prediction is the steady-state step (`Setup(strategy="ddp", world_size=1)`).
Compiled rows are predicted as the eager step (the planner does not model what inductor fuses).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maescale.plan import INVISIBLE_TO_PYTHON, Setup, model_shape, simulate_step  # noqa: E402

MIB, GIB = 2**20, 2**30
TOLERANCE = 0.20
# benchmarks/memory.py's strategy names -> (planner strategy, precision)
CPU_STRATEGIES = {
    "ddp": ("ddp", "fp32"), "fsdp2": ("fsdp2", "fp32"), "zero1": ("zero1", "fp32"), "zero2": ("zero2", "fp32"),
    "zero3": ("zero3", "fp32"), "fsdp2_bf16": ("fsdp2", "bf16"), "zero3_bf16": ("zero3", "bf16"),
}


def read_memory_output(path: Path) -> dict:
    """The command, model, process count and rows (MiB) of a saved benchmarks/memory.py output."""
    lines = path.read_text().splitlines()
    command = lines[0].removeprefix("$ ").strip() if lines and lines[0].startswith("$ ") else ""
    header = next(line for line in lines if ", AdamW, one image per process" in line)
    model, nproc = re.match(r"(\S+), (\d+) processes", header).groups()
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] in CPU_STRATEGIES:
            rows[cells[0]] = {"after_backward": float(cells[2]), "after_step": float(cells[3]),
                              "rss_growth": float(cells[4])}
    return {"command": command, "model": model, "nproc": int(nproc), "rows": rows,
            "rss_follows_live": "MALLOC_MMAP_THRESHOLD_" in command}


def visible_bytes(live: dict[str, int]) -> int:
    return sum(value for key, value in live.items() if key not in INVISIBLE_TO_PYTHON)


def predict_cpu_row(model: str, nproc: int, strategy: str) -> dict[str, float]:
    """MiB per process of what benchmarks/memory.py measures, for one strategy."""
    name, precision = CPU_STRATEGIES[strategy]
    setup = Setup(strategy=name, world_size=nproc, precision=precision, batch_size=1, input_batches=1,
                  first_step=True)
    memory = simulate_step(model_shape(model), setup)
    stepped_in_backward = name.startswith("zero")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", nargs="*", default=[], type=Path, help="saved benchmarks/memory.py outputs")
    parser.add_argument("--gpu", nargs="*", default=[], type=Path, help="benchmarks/throughput.py JSONL rows")
    args = parser.parse_args()
    ratios: list[float] = []
    lines = cpu_table([read_memory_output(path) for path in args.cpu], ratios) if args.cpu else []
    for path in args.gpu:
        lines += ["", *gpu_table(path, ratios)]
    within = sum(abs(r - 1) <= TOLERANCE for r in ratios)
    lines += ["", f"{within} of {len(ratios)} predictions within {TOLERANCE:.0%} of their measurement "
                  f"(ratios {min(ratios, default=1):.2f} .. {max(ratios, default=1):.2f}); peak RSS under glibc's "
                  "default allocator is shown but not counted: it also measures freed memory glibc keeps"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
