"""What one FSDP2 unit costs the host per step, split into a fixed part and a part per parameter.

    OMP_NUM_THREADS=1 python benchmarks/fsdp2_unit_cost.py

A chain of `--units` modules, each holding `--params` parameters of `--elements` elements in
all, runs forward + backward as a plain model and sharded by FSDP2 over a process group of one
(one unit per module, weights kept from forward to backward as maescale shards), in interleaved
rounds, CPU time of one thread. The model does almost nothing, so the difference per unit is
FSDP2's own work: its hooks and per-parameter bookkeeping, and its copies (which grow with the
elements). A least-squares line through the rows of the smallest element count splits the
per-unit cost into a fixed part and a part per parameter; a ViT block has 12 parameters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maescale import parallel  # noqa: E402
from maescale.bench import interleaved_times  # noqa: E402


class Unit(nn.Module):
    """`params` parameters of `elements // params` elements each; the output depends on all."""

    def __init__(self, params: int, elements: int):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(elements // params) * 0.01) for _ in range(params))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.stack([w.sum() for w in self.weights]).sum()


def build(units: int, params: int, elements: int, sharded: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(*(Unit(params, elements) for _ in range(units)))
    if sharded:
        mesh = parallel.device_mesh(1, "cpu")
        for unit in model:
            fully_shard(unit, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()
    for p in model.parameters():
        p.grad = None


def per_step_seconds(models: dict[str, nn.Module], rounds: int, steps: int) -> dict[str, float]:
    """Median CPU time per step of each model, in rounds that alternate them."""
    x = torch.zeros(8)
    times = interleaved_times({name: partial(step, model, x) for name, model in models.items()}, rounds=rounds,
                              steps_per_round=steps, warmup=1, device=torch.device("cpu"), clock="cpu")
    return {name: statistics.median(t) for name, t in times.items()}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through (x, y) points."""
    xs, ys = zip(*points)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--params", nargs="+", type=int, default=[1, 4, 12, 48], help="parameters per unit")
    parser.add_argument("--elements", nargs="+", type=int, default=[4800, 480_000], help="elements per unit")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if len(set(args.params)) < 2:
        parser.error("--params: give at least two counts, to split the fixed cost from the per-parameter one")
    torch.set_num_threads(1)
    parallel.start_process_group_of_one(torch.device("cpu"))
    print("| parameters / unit | elements / unit | plain ms/step | fsdp2 ms/step | fsdp2 extra per unit ms |")
    print("|---|---|---|---|---|")
    extra = {}
    for elements in args.elements:
        for params in args.params:
            models = {kind: build(args.units, params, elements, kind == "fsdp2") for kind in ("plain", "fsdp2")}
            t = per_step_seconds(models, args.rounds, args.steps)
            extra[params, elements] = 1000 * (t["fsdp2"] - t["plain"]) / args.units
            print(f"| {params} | {elements} | {1000 * t['plain']:.3f} | {1000 * t['fsdp2']:.3f} | "
                  f"{extra[params, elements]:.3f} |", flush=True)
    smallest = min(args.elements)
    fixed, per_param = fit_line([(p, extra[p, smallest]) for p in args.params])
    print(f"\nper unit, {smallest} elements: {fixed:.3f} ms fixed + {per_param:.4f} ms per parameter "
          f"(a 12-parameter ViT block alone as a unit: {fixed + 12 * per_param:.3f} ms)")


if __name__ == "__main__":
    main()
