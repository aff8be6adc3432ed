"""End-to-end pretraining on CPU: loss falls, resume is exact, failures keep good checkpoints."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maescale import checkpoint
from maescale.config import load_config
from maescale.metrics import read_metrics
from maescale.train import NonFiniteLossError, pretrain

REPO = Path(__file__).resolve().parents[1]


def losses_by_step(output_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(output_dir)}


def test_loss_falls_and_run_folder_is_complete(tmp_path, tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "optim.blr=1.5e-3", "train.max_steps=60", "train.figure_every=30"])
    summary = pretrain(cfg)
    out = Path(cfg.output_dir)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert {"step", "epoch", "loss", "lr", "images_per_sec"} <= set(rows[0])
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert summary["step"] == 60 and summary["stopped_by"] is None
    assert (out / "reconstruction.png").stat().st_size > 1000
    assert (out / "figures" / "step_00000030.png").is_file()
    assert list((out / "tensorboard").iterdir())
    written = (out / "config.yaml").read_text()
    assert "derived:" in written and "effective_batch: 16" in written
    # lr = blr * effective batch / 256, reached at the end of the 1-epoch warmup (32 steps/epoch)
    peak = 1.5e-3 * 16 / 256
    assert rows[31]["lr"] == pytest.approx(peak * 31 / 32)
    assert max(r["lr"] for r in rows) <= peak + 1e-12


def test_resume_continues_exactly(tmp_path, tiny_overrides):
    straight = [f"output_dir={tmp_path / 'straight'}", *tiny_overrides[1:]]
    pretrain(load_config(None, [*straight, "train.max_steps=10"]))
    split = [f"output_dir={tmp_path / 'split'}", *tiny_overrides[1:]]
    first = pretrain(load_config(None, [*split, "train.max_steps=5"]))
    assert first["checkpoint"].name == "step_00000005"
    second = pretrain(load_config(None, [*split, "train.max_steps=10"]))
    assert second["step"] == 10
    a, b = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "split")
    assert sorted(b) == list(range(1, 11))  # no duplicated or missing rows after the resume
    for step in range(1, 11):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_checkpoints_keep_last_and_ignore_partials(tmp_path, tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "train.max_steps=12", "checkpoint.keep_last=2"])
    pretrain(cfg)
    root = checkpoint.checkpoint_root(cfg.output_dir)
    assert [step for step, _ in checkpoint.complete_checkpoints(root)] == [8, 12]
    # a save that crashed half-way leaves only a partial folder: never resumed, cleaned at start
    partial = root / (checkpoint.PARTIAL_PREFIX + checkpoint.step_name(16))
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"truncated")
    assert checkpoint.latest(root).name == "step_00000012"
    summary = pretrain(load_config(None, [*tiny_overrides, "train.max_steps=16", "checkpoint.keep_last=2"]))
    assert summary["step"] == 16
    assert not partial.exists() or checkpoint.latest(root).name == "step_00000016"
    assert [step for step, _ in checkpoint.complete_checkpoints(root)] == [12, 16]


def test_non_finite_loss_stops_without_saving_it(tmp_path, tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "optim.lr=1e12", "optim.weight_decay=0", "train.max_steps=40",
                             "checkpoint.every_steps=2"])
    with pytest.raises(NonFiniteLossError, match="Last good checkpoint"):
        pretrain(cfg)
    root = checkpoint.checkpoint_root(cfg.output_dir)
    rows = read_metrics(cfg.output_dir)
    assert all(math.isfinite(r["loss"]) for r in rows)  # the bad step is reported, not logged
    last_good = rows[-1]["step"]
    assert last_good < 40
    assert checkpoint.complete_checkpoints(root)  # earlier good ones are kept
    assert all(step <= last_good for step, _ in checkpoint.complete_checkpoints(root))


def test_ctrl_c_saves_and_the_rerun_resumes(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "maescale", "pretrain", *tiny_overrides, "train.max_steps=100000",
           "schedule.epochs=5000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "SIGINT received" in output
    saved = checkpoint.latest(checkpoint.checkpoint_root(out))
    last_logged = read_metrics(out)[-1]["step"]
    assert saved is not None and int(saved.name.split("_")[1]) == last_logged
    rerun = subprocess.run(
        [*cmd[:-2], f"train.max_steps={last_logged + 2}", "schedule.epochs=5000"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"at step {last_logged}" in rerun.stdout + rerun.stderr
    assert read_metrics(out)[-1]["step"] == last_logged + 2


def test_cli_help_lists_subcommands_and_keys():
    top = subprocess.run([sys.executable, "-m", "maescale", "--help"], capture_output=True, text=True, cwd=REPO)
    assert top.returncode == 0
    for command in ("pretrain", "visualize", "bench"):
        assert command in top.stdout
    sub = subprocess.run([sys.executable, "-m", "maescale", "pretrain", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert sub.returncode == 0
    for key in ("--config", "optim.blr", "train.max_steps", "checkpoint.keep_last", "data.kind"):
        assert key in sub.stdout


def test_cli_reports_config_errors_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "maescale", "pretrain", "optim.bLR=1"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert "did you mean optim.blr" in result.stderr
    assert "Traceback" not in result.stderr


def test_bf16_autocast_trains(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "train.precision=bf16", "optim.blr=1.5e-3", "train.max_steps=20"])
    pretrain(cfg)
    rows = read_metrics(cfg.output_dir)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])


def test_rerun_of_a_finished_run_does_nothing(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "train.max_steps=3"])
    pretrain(cfg)
    saved = checkpoint.latest(checkpoint.checkpoint_root(cfg.output_dir))
    before = saved.stat().st_mtime_ns
    again = pretrain(cfg)
    assert again["step"] == 3 and again["checkpoint"] == saved
    assert saved.stat().st_mtime_ns == before  # not rewritten
    assert [r["step"] for r in read_metrics(cfg.output_dir)] == [1, 2, 3]


def test_gradient_accumulation_matches_the_large_batch(tmp_path, tiny_overrides):
    """2 micro-batches of 8 see the same images, masks and lr as one batch of 16."""
    common = [*tiny_overrides[1:], "train.max_steps=6"]
    pretrain(load_config(None, [f"output_dir={tmp_path / 'big'}", *common, "data.batch_size=16"]))
    pretrain(load_config(None, [f"output_dir={tmp_path / 'acc'}", *common, "data.batch_size=8", "train.accum_iter=2"]))
    big, acc = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    assert [r["lr"] for r in big] == pytest.approx([r["lr"] for r in acc])
    assert [r["loss"] for r in big] == pytest.approx([r["loss"] for r in acc], rel=1e-4)


def test_fsdp2_runs_on_one_process_and_leaves_no_process_group_behind(tmp_path, tiny_overrides):
    """Two FSDP2 runs in one process, no launcher (sharded because of CPU offload): each starts its
    group of one and ends it."""
    import torch.distributed as dist

    for name in ("first", "second"):
        pretrain(load_config(None, [f"output_dir={tmp_path / name}", *tiny_overrides[1:], "train.max_steps=2",
                                    "parallel.strategy=fsdp2", "parallel.cpu_offload=true"]))
        assert not dist.is_initialized()
    first, second = ([r["loss"] for r in read_metrics(tmp_path / name)] for name in ("first", "second"))
    assert first == second


def test_fsdp2_on_one_process_trains_the_whole_model_under_autocast(tmp_path, tiny_overrides):
    """Nothing to shard over one process: fsdp2 bf16 is the whole model under autocast, as ddp."""
    common = [*tiny_overrides[1:], "train.max_steps=2", "train.precision=bf16"]
    losses = {}
    for strategy in ("ddp", "fsdp2"):
        pretrain(load_config(None, [f"output_dir={tmp_path / strategy}", *common, f"parallel.strategy={strategy}"]))
        losses[strategy] = [r["loss"] for r in read_metrics(tmp_path / strategy)]
    fp32 = tmp_path / "fp32"
    pretrain(load_config(None, [f"output_dir={fp32}", *tiny_overrides[1:], "train.max_steps=2"]))
    assert losses["fsdp2"] == losses["ddp"] != [r["loss"] for r in read_metrics(fp32)]


def test_compiled_model_trains_like_eager_and_saves_plain_keys(tmp_path, tiny_overrides):
    common = [*tiny_overrides[1:], "train.max_steps=3"]
    pretrain(load_config(None, [f"output_dir={tmp_path / 'eager'}", *common]))
    summary = pretrain(load_config(None, [f"output_dir={tmp_path / 'compiled'}", *common, "train.compile=true"]))
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-3)
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(summary["checkpoint"])).read_metadata().state_dict_metadata.keys()
    assert "model.pos_embed" in keys and not any("_orig_mod" in k for k in keys)
