"""Scaling experiments on Slurm: one job per point of a grid, then one table and one plot.

    python -m slurm.sweep submit configs/sweeps/scaling.yaml [--dry-run]
    python -m slurm.sweep summarize configs/sweeps/scaling.yaml

`submit` runs `sbatch slurm/pretrain_<model>.sh` once per point (model x nodes x strategy x
mask ratio x per-GPU batch) with the point's overrides and its own run folder
(<output_root>/<point>/, holding point.yaml, the Slurm log and what the trainer writes;
output_root defaults to the batch scripts' scratch folder, $SCRATCH/maescale/<sweep name>);
`--dry-run` prints the sbatch commands instead. Each job is an ordinary short training
run: the trainer logs images/s, peak memory and MFU to metrics.jsonl every `log_every`
steps. `summarize` reads the run folders, drops the first `warmup_steps` steps (start-up,
compilation, allocator warm-up) and writes summary.csv, summary.md and scaling.png into
output_root: steady-state throughput and scaling efficiency against the GPU count.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maescale.layout import STRATEGIES

REPO = Path(__file__).resolve().parents[1]
POINT_FILE = "point.yaml"


@dataclass
class Sweep:
    """A sweep file's keys (every list is one axis of the grid)."""

    name: str = "scaling"  # job name prefix
    # One run folder per point below this ($VARIABLES and ~ expanded). Default: where the batch
    # scripts put runs, <$MAESCALE_OUTPUT_ROOT or $SCRATCH/maescale or ~/scratch/maescale>/<name>.
    output_root: str | None = None
    models: list = field(default_factory=lambda: ["vitb"])  # slurm/pretrain_<model>.sh
    nodes: list = field(default_factory=lambda: [1])
    procs_per_node: list = field(default_factory=lambda: [None])  # None: one per allocated GPU
    # parallel.strategy of each point: names of maescale.layout.STRATEGIES (hsdp replicates
    # across the nodes: parallel.replicate_degree null is the node count)
    strategies: list = field(default_factory=lambda: ["ddp"])
    mask_ratios: list = field(default_factory=lambda: [0.75])
    batch_per_gpu: list = field(default_factory=lambda: [64])  # data.batch_size
    steps: int = 60  # optimizer steps per job
    warmup_steps: int = 20  # first steps left out of the steady-state numbers
    log_every: int = 5  # steps per metrics row (one throughput window)
    overrides: list = field(default_factory=list)  # key=value for every point
    sbatch: list = field(default_factory=list)  # extra sbatch options for every job
    env: dict = field(default_factory=dict)  # environment of every job (e.g. MAESCALE_DEVICE: cpu)

    @property
    def root(self) -> Path:
        """The folder of the run folders (see output_root)."""
        if self.output_root is not None:
            root = os.path.expanduser(os.path.expandvars(self.output_root))
            if "$" in root:
                raise ValueError(f"output_root {self.output_root!r}: a variable in it is not set")
            return Path(root).resolve()
        # The run folders' default of slurm/pretrain.sh, so that checkpoints leave the checkout.
        scratch = os.environ.get("SCRATCH") or os.path.expanduser("~/scratch")
        return Path(os.environ.get("MAESCALE_OUTPUT_ROOT") or os.path.join(scratch, "maescale")).resolve() / self.name

    def points(self) -> list[Point]:
        axes = itertools.product(
            self.models, self.nodes, self.procs_per_node, self.strategies, self.mask_ratios, self.batch_per_gpu
        )
        return [Point(self, *values) for values in axes]


@dataclass
class Point:
    sweep: Sweep
    model: str
    nodes: int
    procs_per_node: int | None
    strategy: str
    mask_ratio: float
    batch_per_gpu: int

    @property
    def label(self) -> str:
        procs = f"p{self.procs_per_node}" if self.procs_per_node else ""
        return f"{self.model}-n{self.nodes}{procs}-{self.strategy}-m{self.mask_ratio:g}-b{self.batch_per_gpu}"

    @property
    def run_dir(self) -> Path:
        return self.sweep.root / self.label

    def overrides(self) -> list[str]:
        s = self.sweep
        return [
            f"output_dir={self.run_dir}", f"parallel.strategy={self.strategy}", f"model.mask_ratio={self.mask_ratio}",
            f"data.batch_size={self.batch_per_gpu}",
            f"train.max_steps={s.steps}", f"train.log_every={s.log_every}", "checkpoint.resume=none",
            f"checkpoint.every_steps={s.steps}", "train.figure_every=null", *s.overrides,
        ]

    def sbatch_command(self) -> list[str]:
        s = self.sweep
        env = {**s.env, **({"MAESCALE_PROCS_PER_NODE": self.procs_per_node} if self.procs_per_node else {})}
        exports = "".join(f",{key}={value}" for key, value in env.items())
        return [
            "sbatch", "--parsable", f"--job-name={s.name}-{self.label}", f"--nodes={self.nodes}",
            f"--output={self.run_dir}/slurm-%j.out", "--no-requeue", f"--export=ALL{exports}", *s.sbatch,
            f"slurm/pretrain_{self.model}.sh", *self.overrides(),
        ]

    def describe(self) -> dict:
        keys = ("model", "nodes", "procs_per_node", "strategy", "mask_ratio", "batch_per_gpu")
        return {key: getattr(self, key) for key in keys}


# ---------------------------------------------------------------- loading


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep YAML, naming the bad key or value."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    known = {f.name: f for f in dataclasses.fields(Sweep)}
    for key in tree:
        if key not in known:
            raise ValueError(f"{path}: unknown key {key!r}; valid keys: {', '.join(known)}")
    sweep = Sweep(**tree)
    for key, f in known.items():
        expected = {"list": list, "dict": dict, "int": int, "str": str, "str | None": (str, type(None))}[f.type]
        if not isinstance(getattr(sweep, key), expected):
            raise ValueError(f"{path}: {key} must be a {f.type}, got {getattr(sweep, key)!r}")
    try:
        _ = sweep.root  # an unset variable in output_root fails here, before anything is submitted
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    for strategy in sweep.strategies:
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise ValueError(f"{path}: unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    for model in sweep.models:
        if not (REPO / "slurm" / f"pretrain_{model}.sh").is_file():
            raise ValueError(f"{path}: no batch script slurm/pretrain_{model}.sh for model {model!r}")
    if not 0 <= sweep.warmup_steps < sweep.steps:
        raise ValueError(f"{path}: warmup_steps must be in [0, steps), got {sweep.warmup_steps} of {sweep.steps}")
    return sweep


# ---------------------------------------------------------------- submit


def submit(sweep: Sweep, dry_run: bool = False) -> list[str]:
    """Submit one job per point (or only print the commands); returns the commands as text."""
    lines = []
    for point in sweep.points():
        command = point.sbatch_command()
        lines.append(shlex.join(command))
        if dry_run:
            print(lines[-1])
            continue
        point.run_dir.mkdir(parents=True, exist_ok=True)  # Slurm writes the log there
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed for {point.label}: {result.stderr.strip()}")
        job_id = result.stdout.strip().split(";")[0]
        record = {**point.describe(), "job_id": int(job_id), "command": lines[-1]}
        (point.run_dir / POINT_FILE).write_text(yaml.safe_dump(record, sort_keys=False))
        print(f"submitted job {job_id}: {point.label}")
    return lines


# ---------------------------------------------------------------- summarize

COLUMNS = [
    "model", "strategy", "nodes", "gpus", "mask_ratio", "batch_per_gpu", "images_per_sec", "images_per_sec_per_gpu",
    "step_time_ms", "efficiency", "peak_memory_gib", "mfu", "steps", "status",
]


def measure_run(run_dir: Path, warmup_steps: int) -> dict:
    """Steady-state numbers of one run folder (status says why they are missing, if they are)."""
    point = yaml.safe_load((run_dir / POINT_FILE).read_text())
    row = {key: point[key] for key in ("model", "strategy", "nodes", "mask_ratio", "batch_per_gpu")}
    config_file, metrics_file = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not metrics_file.exists() or not config_file.exists():
        return {**row, "status": "no metrics (not run, or failed: see the slurm-*.out log)"}
    config = yaml.safe_load(config_file.read_text())
    derived = config["derived"]
    row["model"] = config["model"]["name"]  # the model that ran (a sweep's overrides may swap it)
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    steady = [r for r in rows if r["step"] > warmup_steps and "images_per_sec" in r]  # not kNN rows
    row.update(gpus=derived["world_size"], steps=rows[-1]["step"] if rows else 0)
    if not steady:
        return {**row, "status": f"no steps after the {warmup_steps} warm-up steps"}
    # Equal windows of log_every steps: total images / total time is the harmonic mean of the rates.
    images_per_sec = len(steady) / sum(1.0 / r["images_per_sec"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    row.update(
        images_per_sec=images_per_sec,
        images_per_sec_per_gpu=images_per_sec / row["gpus"],
        step_time_ms=1000 * derived["effective_batch"] / images_per_sec,
        peak_memory_gib=max(r.get("peak_memory_gib", 0.0) for r in steady),
        mfu=sum(mfus) / len(mfus) if mfus else None,
        status="ok" if row["steps"] == derived["last_step"] else f"stopped at step {row['steps']}",
    )
    return row


def add_efficiency(rows: list[dict]) -> None:
    """Scaling efficiency: per-GPU throughput relative to the same series at its fewest GPUs."""
    for _, series in itertools.groupby(sorted(rows, key=_series_key), key=_series_key):
        measured = [r for r in series if r.get("images_per_sec")]
        if not measured:
            continue
        base = min(measured, key=lambda r: r["gpus"])
        for r in measured:
            r["efficiency"] = r["images_per_sec_per_gpu"] / base["images_per_sec_per_gpu"]


def _series_key(row: dict) -> tuple:
    return (row["model"], row["strategy"], row["mask_ratio"], row["batch_per_gpu"])


def summarize(sweep: Sweep) -> dict[str, Path]:
    root = sweep.root
    rows = [measure_run(p.run_dir, sweep.warmup_steps) for p in sweep.points() if (p.run_dir / POINT_FILE).exists()]
    if not rows:
        raise ValueError(f"no submitted runs under {root}: run `python -m slurm.sweep submit` first")
    add_efficiency(rows)
    rows.sort(key=lambda r: (*_series_key(r), r["nodes"]))
    paths = {"csv": root / "summary.csv", "md": root / "summary.md", "png": root / "scaling.png"}
    write_csv(rows, paths["csv"])
    paths["md"].write_text(markdown_table(rows) + "\n")
    plot(rows, paths["png"])
    return paths


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key) for key in COLUMNS})


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key in ("mfu", "efficiency"):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.3g}" if key == "mask_ratio" else f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(key), key) for key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Throughput and efficiency against the GPU count, one line per model/strategy (and mask/batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    measured = [r for r in rows if r.get("images_per_sec")]
    for key, series in itertools.groupby(sorted(measured, key=_series_key), key=_series_key):
        series = sorted(series, key=lambda r: r["gpus"])
        model, strategy, mask, batch = key
        label = f"{model} {strategy} (mask {mask:g}, {batch}/GPU)"
        gpus = [r["gpus"] for r in series]
        left.plot(gpus, [r["images_per_sec"] for r in series], marker="o", label=label)
        right.plot(gpus, [100 * r["efficiency"] for r in series], marker="o", label=label)
    ticks = sorted({r["gpus"] for r in measured})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("GPUs (processes)")
        ax.grid(True, alpha=0.3)
    left.set_title("steady-state throughput")
    left.set_ylabel("images/s")
    right.set_title("scaling efficiency (per-GPU images/s vs the fewest GPUs)")
    right.set_ylabel("%")
    right.set_ylim(0, 110)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="sbatch one job per point of the sweep")
    p.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    p = sub.add_parser("summarize", help="table (CSV, Markdown) and plot (PNG) of the finished runs")
    p.add_argument("sweep", help="the sweep YAML that was submitted")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        if args.command == "submit":
            submit(sweep, dry_run=args.dry_run)
        else:
            paths = summarize(sweep)
            print(paths["md"].read_text(), end="")
            print("wrote " + ", ".join(str(p) for p in paths.values()))
    except (ValueError, RuntimeError) as error:
        print(f"sweep {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
