"""Faults injected into real runs: what survives them and what the next run resumes from."""

import contextlib
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BAD_FILES, TINY_RUN, run_maescale, write_mixed_image_folder
from processes import free_port
from test_distributed import COMMON, REPO, worker_with_rank

from maescale import checkpoint
from maescale.config import load_config
from maescale.errors import CheckpointError
from maescale.interop import load_run_model
from maescale.metrics import read_metrics
from maescale.train import NonFiniteLossError, StopRequest, Trainer, pretrain


def cli_process(*args: str) -> subprocess.CompletedProcess:
    """`maescale ...` in a process of its own: what reaches its stderr through warnings too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "maescale", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)

# The paper's decoder (512 wide, 8 blocks) on the tiny encoder: ~30 M weights with fp32 AdamW
# state make a checkpoint of ~0.35 GB whose save lasts long enough to be interrupted reliably,
# while 32 px images keep the steps instant.
BIG_CHECKPOINT_RUN = [
    "model.name=mae_vit_tiny_patch4", "model.decoder_embed_dim=512", "model.decoder_depth=8",
    "model.decoder_num_heads=16", "data.synthetic_size=64", "data.batch_size=2", "data.num_workers=0",
    "schedule.epochs=10", "schedule.warmup_epochs=1", "train.log_every=1", "checkpoint.every_steps=1",
    "checkpoint.keep_last=1", "train.max_steps=2", "parallel.strategy=fsdp2",
]


def launch_two_processes(out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "maescale", "pretrain", *BIG_CHECKPOINT_RUN, f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_shard_being_written(proc: subprocess.Popen, partial: Path, timeout: float = 240) -> None:
    """Return once `partial` holds a file, i.e. the processes are in the middle of writing it."""
    deadline = time.time() + timeout
    while not (partial.is_dir() and any(partial.iterdir())):
        assert proc.poll() is None, "the run ended before its second save"
        assert time.time() < deadline, "the second save never started"
        time.sleep(0.005)


def test_a_kill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    root = checkpoint.checkpoint_root(out)
    proc = launch_two_processes(out)
    partial = root / (checkpoint.PARTIAL_PREFIX + checkpoint.step_name(2))
    try:
        wait_for_shard_being_written(proc, partial)
        os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)  # one rank dies mid-write
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, output[-3000:]
    # (had the save finished before the kill, step 2 would be the latest: the test would fail)
    assert checkpoint.latest(root).name == checkpoint.step_name(1)
    logged_before_the_kill = {row["step"]: row["loss"] for row in read_metrics(out)}

    rerun = launch_two_processes(out)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output[-3000:]
    assert f"resumed from {root / checkpoint.step_name(1)} at step 1" in output
    assert not list(root.glob(checkpoint.PARTIAL_PREFIX + "*")), "the interrupted save was not cleaned up"
    assert [p.name for _, p in checkpoint.complete_checkpoints(root)] == [checkpoint.step_name(2)]
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2]
    # step 2 was logged before its save was killed; the resumed run computes it again, identically
    assert rows[1]["loss"] == pytest.approx(logged_before_the_kill[2], rel=1e-5)


# ---------------------------------------------------------------- a rank killed mid-training

KILL_RUN = [*COMMON, "data.batch_size=8", "checkpoint.every_steps=3"]


@pytest.fixture(scope="module")
def straight_nine_steps(straight_nine_steps_run) -> list[float]:
    return [row["loss"] for row in read_metrics(straight_nine_steps_run)]


@pytest.mark.parametrize("strategy", [
    pytest.param(["parallel.strategy=fsdp2"], id="fsdp2"),
    pytest.param(["parallel.strategy=zero2"], id="zero2", marks=pytest.mark.deepspeed),
])
def test_a_rank_killed_mid_training_ends_the_job_and_the_rerun_continues_exactly(
    tmp_path, strategy, straight_nine_steps
):
    out = tmp_path / "run"
    root = checkpoint.checkpoint_root(out)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "maescale", "pretrain", *KILL_RUN, *strategy, f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*command, "train.max_steps=1000"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while checkpoint.latest(root) is None:
            assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
            time.sleep(0.05)
        os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
        killed_at = time.time()
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # the survivor does not hang in a collective: the launcher ends the job and names the dead rank
    assert time.time() - killed_at < 60
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in output or "exitcode  : -9" in output, output[-3000:]

    rerun = subprocess.run([*command, "train.max_steps=9"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout + rerun.stderr
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == list(range(1, 10))
    assert [row["loss"] for row in rows] == pytest.approx(straight_nine_steps, rel=1e-4)


# ---------------------------------------------------------------- disk full, read-only output


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real small file system (needs root; skipped with the reason otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(folder: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_last_checkpoint(tmp_path, tiny_overrides):
    with tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "run"
        overrides = [*TINY_RUN, f"output_dir={out}"]
        pretrain(load_config(None, [*overrides, "train.max_steps=4"]))
        root = checkpoint.checkpoint_root(out)
        fill_up(disk, leave_bytes=256 * 1024)  # room for metric lines, not for a checkpoint
        with pytest.raises(CheckpointError, match=rf"could not write checkpoint {root / 'step_00000008'} "
                                                  rf"\(0\.\d MiB free on its file system\)"):
            pretrain(load_config(None, [*overrides, "train.max_steps=8"]))
        assert [p.name for _, p in checkpoint.complete_checkpoints(root)] == ["step_00000004"]
        assert not list(root.glob(checkpoint.PARTIAL_PREFIX + "*"))
        (disk / "filler").unlink()
        summary = pretrain(load_config(None, [*overrides, "train.max_steps=8"]))  # the last good one resumes
        assert summary["step"] == 8


def test_a_read_only_output_dir_is_a_clear_error_before_any_work(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as folder:
        result = run_maescale("pretrain", *TINY_RUN, f"output_dir={folder / 'run'}", ok=False)
    assert result.returncode == 2
    assert f"output_dir='{folder / 'run'}' is not writable: Read-only file system" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- bad data


def test_pretraining_and_the_ffcv_writer_skip_every_kind_of_bad_file(tmp_path):
    images = write_mixed_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    result = cli_process("pretrain", "model.name=mae_vit_micro_patch4", "data.kind=folder", f"data.path={images}",
                         "data.batch_size=4", "data.num_workers=0", "schedule.epochs=1", "schedule.warmup_epochs=0",
                         f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in BAD_FILES:
        assert str(images / name) in result.stderr
    assert read_metrics(out)[-1]["skipped_images"] == len(BAD_FILES)
    if importlib.util.find_spec("ffcv") is None:
        return  # the FFCV writer's own tests skip with the reason
    from maescale.data.ffcv_writer import BetonOptions, write_beton

    summary = write_beton(images, tmp_path / "mixed.beton", BetonOptions(num_workers=1))  # the CLI's: test_ffcv
    assert sorted(path for path, _ in summary.skipped) == [str(images / name) for name in BAD_FILES]


# ---------------------------------------------------------------- bad configuration and input


@pytest.mark.parametrize("overrides, message", [
    (["optim.blrr=1e-4"], "did you mean optim.blr"),
    (["data.batch_size=big"], "data.batch_size"),
    (["model.mask_ratio=1.5"], "model.mask_ratio"),
    (["data.batch_size=0"], "data.batch_size"),
    (["model.img_size=30"], "model section: img_size=30 is not divisible"),
    (["parallel.strategy=zero4"], "parallel.strategy"),
    (["parallel.zero_stage=2"], "parallel.zero_stage=2: the ZeRO stage is part of the name"),
    (["parallel.strategy=hsdp", "parallel.replicate_degree=2"], "replicate_degree=2 does not divide the 1 processes"),
    (["checkpoint.resume=/nonexistent/step_00000004"], "no such checkpoint folder"),
])
def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path, overrides, message):
    result = run_maescale("pretrain", *TINY_RUN, f"output_dir={tmp_path / 'run'}", *overrides, ok=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "run"
    pretrain(load_config(None, [*TINY_RUN, f"output_dir={out}", "train.max_steps=8"]))
    return out


def test_a_checkpoint_of_another_model_size_names_the_first_mismatching_key(tmp_path, saved_run):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    result = run_maescale("pretrain", *TINY_RUN, f"output_dir={out}", "train.max_steps=12",
                          "model.decoder_embed_dim=48", ok=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert ": mask_token has shape (1, 1, 32) there but (1, 1, 48) in this model" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_damaged_checkpoint_is_a_clear_error_pointing_to_the_previous_one(tmp_path, saved_run):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    root = checkpoint.checkpoint_root(out)
    newest = checkpoint.latest(root)
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # e.g. a disk error or a copy that stopped
    result = run_maescale("pretrain", *TINY_RUN, f"output_dir={out}", "train.max_steps=12", ok=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{newest} cannot be loaded" in result.stderr
    assert f"checkpoint.resume={root / 'step_00000004'}" in result.stderr
    assert "Traceback" not in result.stderr
    run_maescale("pretrain", *TINY_RUN, f"output_dir={out}", "train.max_steps=12",
                 f"checkpoint.resume={root / 'step_00000004'}")


# ---------------------------------------------------------------- non-finite loss


def test_skip_mode_skips_a_non_finite_step_and_goes_on(tmp_path, tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "train.max_steps=6", "train.nonfinite=skip"])
    trainer = Trainer(cfg)
    forward_calls = []

    def poison_third_forward(module, inputs, output):  # a fault in one step: NaN loss
        forward_calls.append(1)
        return (output[0] * float("nan"), *output[1:]) if len(forward_calls) == 3 else output

    trainer.model.register_forward_hook(poison_third_forward)
    with StopRequest() as stop:
        summary = trainer.run(stop)
    assert summary["step"] == 6
    rows = read_metrics(cfg.output_dir)
    assert [row["step"] for row in rows] == [1, 2, 4, 5, 6]  # step 3 had nothing finite to log
    assert rows[-1]["nonfinite_skips"] == 1
    assert all(math.isfinite(row["loss"]) for row in rows)
    _, model = load_run_model(summary["checkpoint"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_mode_stops_after_the_limit(tmp_path, tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "optim.lr=1e12", "optim.weight_decay=0", "train.max_steps=40",
                             "train.nonfinite=skip", "train.max_nonfinite_skips=2"])
    with pytest.raises(NonFiniteLossError, match=r"3 updates skipped .*train.max_nonfinite_skips=2"):
        pretrain(cfg)
    for _, path in checkpoint.complete_checkpoints(checkpoint.checkpoint_root(cfg.output_dir)):
        _, model = load_run_model(path)
        assert all(torch.isfinite(p).all() for p in model.parameters())
