"""Fine-tuning resumes and shards like pretraining: a run killed mid-way and started again
continues with the losses of an uninterrupted one; FSDP2 over 2 processes computes what one
process computes; an EMA of the weights is kept, checkpointed and resumed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import run_ranks
from safetensors.torch import load_file

from maescale import checkpoint
from maescale.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 16
COMMON = [
    "encoder.model=mae_vit_micro_patch4", "data.kind=synthetic", "data.synthetic_size=128", "data.num_workers=0",
    "finetune.epochs=2", "finetune.warmup_epochs=1", "finetune.log_every=1", "finetune.blr=5e-3",
    "parallel.backend=gloo",
]


def finetune_args(out: Path, *overrides: str, processes: int = 1) -> list[str]:
    return ["finetune", *COMMON, f"output_dir={out}", f"data.batch_size={GLOBAL_BATCH // processes}", *overrides]


def run(out: Path, *overrides: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = run_ranks(finetune_args(out, *overrides, processes=processes), processes, env, REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def loss_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if r.get("protocol") == "finetune" and "loss" in r]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in loss_rows(out)]


def accuracies(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["top1"]) for r in read_metrics(out) if "top1" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """16 steps (2 epochs of 8) uninterrupted, with mixup, cutmix, stochastic depth and an EMA."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(out, "finetune.drop_path=0.1", "finetune.ema_decay=0.9")
    return out


def test_a_killed_finetune_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path, straight):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "maescale", *finetune_args(out, "finetune.drop_path=0.1",
                                                                  "finetune.ema_decay=0.9", "checkpoint.every_steps=3")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = checkpoint.checkpoint_root(out)
    deadline = time.time() + 120
    while checkpoint.latest(root) is None or checkpoint.latest(root).name < checkpoint.step_name(6):
        assert process.poll() is None and time.time() < deadline, process.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # no chance to save: the resume starts from the periodic checkpoint
    process.wait()
    resumed_from = int(checkpoint.latest(root).name.removeprefix("step_"))
    assert resumed_from >= 6 and resumed_from < 16
    result = run(out, "finetune.drop_path=0.1", "finetune.ema_decay=0.9", "checkpoint.every_steps=3")
    assert f"at step {resumed_from}" in result.stdout + result.stderr
    assert [r["step"] for r in loss_rows(out)] == list(range(1, 17))
    assert losses(out) == pytest.approx(losses(straight), rel=1e-5)
    assert accuracies(out) == accuracies(straight)  # evaluated on the EMA, which resumed too
    reference = load_file(str(straight / "finetuned.safetensors"))
    for key, value in load_file(str(out / "finetuned.safetensors")).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_stop_signal_checkpoints_and_the_rerun_finishes_the_run(tmp_path, straight):
    """SIGUSR1 (Slurm's early warning): the step finishes, a checkpoint is written, exit code 138."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "maescale", *finetune_args(out, "finetune.drop_path=0.1",
                                                                  "finetune.ema_decay=0.9")]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(losses(out)) < 3:
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR1, stderr[-3000:]
    stopped_at = int(checkpoint.latest(checkpoint.checkpoint_root(out)).name.removeprefix("step_"))
    assert "run the same command again to resume" in stdout and 3 <= stopped_at < 16
    run(out, "finetune.drop_path=0.1", "finetune.ema_decay=0.9")
    assert losses(out) == pytest.approx(losses(straight), rel=1e-5)


def test_fsdp2_on_two_processes_fine_tunes_as_one_process(tmp_path):
    """Without mixup and stochastic depth (their draws are per process), 2 x 8 images = 16 on one."""
    per_process = ["finetune.mixup=0", "finetune.cutmix=0", "finetune.drop_path=0", "finetune.max_steps=6",
                   "finetune.clip_grad=1.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, *per_process)
    result = run(two, *per_process, "parallel.strategy=fsdp2", "parallel.blocks_per_unit=1", processes=2)
    assert "fsdp2: shard 2, fp32 on 2 process(es) (cpu, gloo" in result.stdout
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    reference = load_file(str(one / "finetuned.safetensors"))
    for key, value in load_file(str(two / "finetuned.safetensors")).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-4, msg=key)


def test_finetune_refuses_the_pretraining_only_strategies(tmp_path):
    from conftest import run_maescale

    result = run_maescale(*finetune_args(tmp_path, "parallel.strategy=zero2"), ok=False)
    assert result.returncode == 2
    assert "parallel.strategy=zero2 is for pretraining: maescale finetune runs ddp, fsdp2 or hsdp" in result.stderr


@pytest.mark.parametrize("augment", [False, True], ids=["cached_features", "augmented_crops"])
def test_a_linear_probe_resumed_mid_epoch_ends_as_the_uninterrupted_one(tmp_path, augment):
    """The head's checkpoint at step 5 (inside the second epoch of 4 steps) resumed in another folder:
    the same head, the same accuracy after each later epoch."""
    from maescale.config import load_config
    from maescale.evaluate.config import EvalConfig
    from maescale.evaluate.linprobe import HEAD_CHECKPOINTS, linprobe

    def probe(out: Path, *extra: str) -> dict:
        cfg = load_config(None, [*COMMON, f"output_dir={out}", "data.batch_size=32", "linprobe.batch_size=32",
                                 "linprobe.epochs=3", "linprobe.warmup_epochs=1", f"linprobe.augment={augment}",
                                 "checkpoint.every_steps=5", "checkpoint.keep_last=5", *extra], schema=EvalConfig)
        return linprobe(cfg)

    straight = probe(tmp_path / "straight")
    step_5 = tmp_path / "straight" / HEAD_CHECKPOINTS / checkpoint.step_name(5)
    resumed = probe(tmp_path / "resumed", f"checkpoint.resume={step_5}")
    assert straight["steps"] == resumed["steps"] == 12
    for a, b in zip(straight["head"].state_dict().values(), resumed["head"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    later = [(r["step"], r["top1"]) for r in read_metrics(tmp_path / "straight") if r["step"] > 5]
    assert later == [(r["step"], r["top1"]) for r in read_metrics(tmp_path / "resumed")]
