"""Faults injected into real runs: what survives them and what the next run resumes from."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maescale import checkpoint
from maescale.metrics import read_metrics
from test_distributed import REPO, free_port, worker_with_rank

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
