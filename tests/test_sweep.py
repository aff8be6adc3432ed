"""The sweep launcher without a cluster: the sbatch commands of a dry run, sweep file errors,
and the steady-state arithmetic of `summarize` on run folders written here."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `slurm` is a folder of the repository, not an installed package

from maescale.layout import STRATEGIES  # noqa: E402
from slurm.sweep import load_sweep, summarize  # noqa: E402


def sweep_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurm.sweep", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_dry_run_prints_one_sbatch_command_per_point_and_submits_nothing(tmp_path):
    tree = yaml.safe_load((REPO / "configs/sweeps/scaling.yaml").read_text())
    tree["output_root"] = str(tmp_path / "runs")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(tree))
    result = sweep_cli("submit", str(sweep_file), "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    points = (len(tree["models"]) * len(tree["nodes"]) * len(tree["strategies"]) * len(tree["mask_ratios"])
              * len(tree["batch_per_gpu"]))
    assert len(lines) == points
    vith_hsdp_8 = next(line for line in lines if "--job-name=scaling-vith-n8-hsdp-m0.75-b64" in line)
    for part in ["sbatch --parsable", "--nodes=8", "--time=00:30:00", "slurm/pretrain_vith.sh",
                 "parallel.strategy=hsdp", "train.max_steps=60", "data.batch_size=64",
                 "data.kind=synthetic", f"output_dir={tmp_path / 'runs' / 'vith-n8-hsdp-m0.75-b64'}"]:
        assert part in vith_hsdp_8
    # hsdp replicates across the nodes by itself (parallel.replicate_degree null = the node count)
    assert "replicate_degree" not in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_of_the_layout_is_a_sweep_strategy(tmp_path, strategy):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"strategies": [strategy], "output_root": str(tmp_path)}))
    (point,) = load_sweep(sweep_file).points()
    assert f"parallel.strategy={strategy}" in point.overrides()


def test_output_root_defaults_to_the_scratch_folder_of_the_batch_scripts(tmp_path, monkeypatch):
    """Like slurm/pretrain.sh: $MAESCALE_OUTPUT_ROOT, else $SCRATCH/maescale, else ~/scratch/maescale."""
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "grid"}))
    monkeypatch.delenv("MAESCALE_OUTPUT_ROOT", raising=False)
    monkeypatch.delenv("SCRATCH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_sweep(sweep_file).root == tmp_path / "home" / "scratch" / "maescale" / "grid"
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    assert load_sweep(sweep_file).root == tmp_path / "scratch" / "maescale" / "grid"
    monkeypatch.setenv("MAESCALE_OUTPUT_ROOT", str(tmp_path / "out"))
    assert load_sweep(sweep_file).root == tmp_path / "out" / "grid"
    sweep_file.write_text(yaml.safe_dump({"output_root": "$SCRATCH/sweeps/grid"}))
    assert load_sweep(sweep_file).points()[0].run_dir.parent == tmp_path / "scratch" / "sweeps" / "grid"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"strategy": ["ddp"]}, "unknown key 'strategy'"),
        ({"strategies": ["zero4"]}, "unknown strategy 'zero4'; valid: " + ", ".join(STRATEGIES)),
        ({"strategies": ["deepspeed"]}, "unknown strategy 'deepspeed'; valid: " + ", ".join(STRATEGIES)),
        ({"output_root": "$MAESCALE_UNSET_VARIABLE/runs"}, "a variable in it is not set"),
        ({"models": ["vitg"]}, "no batch script slurm/pretrain_vitg.sh"),
        ({"nodes": 4}, "nodes must be a list"),
        ({"warmup_steps": 60}, "warmup_steps must be in [0, steps)"),
    ],
)
def test_sweep_file_errors_name_the_key(tmp_path, change, message):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"steps": 60, **change}))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_sweep(sweep_file)
    result = sweep_cli("submit", str(sweep_file), "--dry-run")
    assert result.returncode == 2 and message in result.stderr


def write_run(run_dir: Path, point: dict, world_size: int, rates: list[float], last_step: int) -> None:
    """A run folder as a sweep job leaves it: point.yaml, config.yaml (derived values), metrics.jsonl."""
    run_dir.mkdir(parents=True)
    (run_dir / "point.yaml").write_text(yaml.safe_dump({**point, "job_id": 1}))
    derived = {"world_size": world_size, "effective_batch": 8 * world_size, "last_step": last_step}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "mae_vit_tiny_patch4"}, "derived": derived}))
    rows = [{"step": 2 * (i + 1), "loss": 1.0, "images_per_sec": rate, "peak_memory_gib": 1.0 + i}
            for i, rate in enumerate(rates)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summarize_measures_the_steady_state_and_efficiency(tmp_path):
    root = tmp_path / "runs"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "output_root": str(root), "procs_per_node": [1, 2, 4], "batch_per_gpu": [8], "steps": 6, "warmup_steps": 2,
        "log_every": 2,
    }))
    sweep = load_sweep(sweep_file)
    p1, p2, p4 = sweep.points()
    base = {"model": "vitb", "nodes": 1, "strategy": "ddp", "mask_ratio": 0.75, "batch_per_gpu": 8}
    # first window: warm-up
    write_run(p1.run_dir, {**base, "procs_per_node": 1}, 1, rates=[1.0, 100.0, 300.0], last_step=6)
    write_run(p2.run_dir, {**base, "procs_per_node": 2}, 2, rates=[1.0, 300.0, 300.0], last_step=6)
    (p4.run_dir).mkdir(parents=True)
    (p4.run_dir / "point.yaml").write_text(yaml.safe_dump({**base, "procs_per_node": 4, "job_id": 3}))  # never ran

    paths = summarize(sweep)
    rows = {int(r["gpus"]) if r["gpus"] else None: r for r in _read_csv(paths["csv"])}
    assert float(rows[1]["images_per_sec"]) == pytest.approx(150.0)  # harmonic mean of 100 and 300
    assert float(rows[1]["step_time_ms"]) == pytest.approx(1000 * 8 / 150.0)
    assert float(rows[2]["images_per_sec"]) == pytest.approx(300.0)
    assert float(rows[2]["efficiency"]) == pytest.approx(1.0)  # 150/GPU at 2 GPUs as at 1
    assert float(rows[2]["peak_memory_gib"]) == 3.0 and rows[2]["status"] == "ok"
    assert rows[None]["status"].startswith("no metrics")
    assert "| mae_vit_tiny_patch4 | ddp | 1 | 2 |" in paths["md"].read_text()
    assert paths["png"].stat().st_size > 10_000


def _read_csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))
