"""Real 2-process runs (gloo on CPU): DDP and FSDP2 compute what one process computes,
really shard, and their checkpoints resume on another number of processes (DeepSpeed's:
test_zero_resume.py)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import free_port, run_ranks
from safetensors.torch import load_file

from maescale import checkpoint
from maescale.config import load_config
from maescale.interop import load_run_model
from maescale.metrics import read_metrics
from maescale.models import build_model

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 16
COMMON = [
    "model.name=mae_vit_micro_patch4", "data.synthetic_size=512", "data.num_workers=0", "schedule.epochs=4",
    "schedule.warmup_epochs=1", "optim.blr=1.5e-3", "train.log_every=1", "checkpoint.every_steps=3",
    # One process computes on the CPU like two on the gloo fallback, also where a GPU is present.
    "parallel.backend=gloo",
]
KNN_MONITOR = ["monitor.knn_every=3", "monitor.bank_images=128", "monitor.val_images=64"]


def run(
    out: Path, nproc: int, *overrides: str, steps: int = 6, launcher: str = "ranks"
) -> subprocess.CompletedProcess:
    """`maescale pretrain` on `nproc` processes with the same global batch; returns the finished process.

    `launcher`: "ranks" forks the processes with the env:// variables set, as srun sets them
    (processes.run_ranks); "torchrun" and "accelerate" exec those launchers (each costs a process
    importing torch first, and every rank's own imports).
    """
    args = [*COMMON, f"output_dir={out}", f"data.batch_size={GLOBAL_BATCH // nproc}", f"train.max_steps={steps}",
            *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if launcher == "ranks" or nproc == 1:
        result = run_ranks(["pretrain", *args], nproc, env, REPO, timeout=300)
    else:
        launch = {
            "torchrun": ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"],
            # the documented way, with a config from configs/accelerate
            "accelerate": ["-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "configs/accelerate/cpu.yaml"), "--num_processes", str(nproc),
                           "--main_process_port", str(free_port())],
        }[launcher]
        result = subprocess.run([sys.executable, *launch, "-m", "maescale", "pretrain", *args], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out) if "loss" in row]


def knn_rows(out: Path) -> list[tuple[int, float, float]]:
    return [(row["step"], row["knn_top1"], row["knn_top5"]) for row in read_metrics(out) if "knn_top1" in row]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    _, model = load_run_model(checkpoint.latest(checkpoint.checkpoint_root(out)))
    return model.state_dict()


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    run(out, 1, *KNN_MONITOR)
    return out


@pytest.mark.parametrize(
    "name, overrides, tolerance",
    [
        ("ddp", ["parallel.strategy=ddp"], 1e-4),
        ("fsdp2", ["parallel.strategy=fsdp2"], 1e-4),
        ("fsdp2_ac", ["parallel.strategy=fsdp2", "parallel.activation_checkpointing=true"], 1e-4),
        # The other cut: a unit per block, freed after forward and gathered again for backward.
        ("fsdp2_reshard_1_block", ["parallel.strategy=fsdp2", "parallel.reshard_after_forward=true",
                                   "parallel.blocks_per_unit=1"], 1e-4),
        ("fsdp2_bf16", ["parallel.strategy=fsdp2", "train.precision=bf16"], 2e-2),
        ("fsdp2_offload", ["parallel.strategy=fsdp2", "parallel.cpu_offload=true"], 1e-4),
        ("hsdp", ["parallel.strategy=hsdp", "parallel.replicate_degree=2"], 1e-4),
        pytest.param("zero1", ["parallel.strategy=zero1"], 1e-4, marks=pytest.mark.deepspeed),
        pytest.param("zero3", ["parallel.strategy=zero3"], 1e-4, marks=pytest.mark.deepspeed),
        # ZeRO-2 with 2 processes x 2 micro-batches of 4 = the same global batch of 16
        pytest.param("zero2_accum", ["parallel.strategy=zero2", "data.batch_size=4", "train.accum_iter=2"], 1e-4,
                     marks=pytest.mark.deepspeed),
        pytest.param("zero3_bf16", ["parallel.strategy=zero3", "train.precision=bf16"], 2e-2,
                     marks=pytest.mark.deepspeed),
    ],
)
def test_two_processes_match_one(tmp_path, single, name, overrides, tolerance):
    out = tmp_path / name
    result = run(out, 2, *overrides, *KNN_MONITOR)
    strategy = overrides[0].split("=")[1]
    # "(cpu, gloo)", or "(cpu, gloo fallback: 2 processes, 1 GPU on this node)" on a one-GPU machine
    held = re.search(rf"{strategy}: [^\n]* on 2 process\(es\) \(cpu, gloo[^)]*\), "
                     rf"([\d.]+)% of the parameters held here",
                     result.stdout)
    assert held, result.stdout
    # FSDP2 and ZeRO-3 really shard: rank 0 holds about half (FSDP2 keeps the [1, L, D] position
    # embeddings whole, they shard along a first dimension of size 1); DDP, HSDP 2x1 and ZeRO-1/2
    # hold every parameter (ZeRO-1/2 partition optimizer state and gradients).
    sharded = name.startswith("fsdp2") or name.startswith("zero3")
    assert (45 <= float(held.group(1)) < 60) if sharded else float(held.group(1)) == 100.0
    assert "Warning" not in result.stderr, result.stderr[-3000:]  # uninformative ones are silenced
    assert losses(out) == pytest.approx(losses(single), rel=tolerance)
    # The kNN monitor encodes through the sharded model (steps 3 and 6): same accuracies in fp32.
    assert [row[0] for row in knn_rows(out)] == [3, 6]
    if tolerance < 1e-3:
        assert knn_rows(out) == knn_rows(single)
    reference = final_weights(single)
    for key, value in final_weights(out).items():
        assert torch.allclose(value, reference[key], atol=tolerance, rtol=tolerance), key


@pytest.mark.parametrize("offload, line", [
    # Nothing to shard over one process: the model trains whole, with no process group.
    (False, r"fsdp2: whole model \(shard degree 1\), fp32 on 1 process\(es\) \(cpu, no process group\), "
            r"100\.0% of the parameters held here"),
    # CPU offload keeps FSDP2: a process group of its own, gradients reduced in place
    # (parallel.ReduceOverOneRank).
    (True, r"fsdp2: shard 1, CPU offload, fp32 on 1 process\(es\) \(cpu, gloo\), 100\.0% of the parameters held here"),
], ids=["whole", "offload"])
def test_fsdp2_on_one_process_accumulating_matches_the_plain_model(tmp_path, single, offload, line):
    """FSDP2 with no launcher, 2 micro-batches of 8 added up: the plain model's batches of 16."""
    out = tmp_path / "fsdp2_one"
    result = run(out, 1, "parallel.strategy=fsdp2", f"parallel.cpu_offload={str(offload).lower()}",
                 "data.batch_size=8", "train.accum_iter=2", *KNN_MONITOR)
    assert re.search(line, result.stdout), result.stdout
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(single), rel=1e-4)
    assert knn_rows(out) == knn_rows(single)
    reference = final_weights(single)
    for key, value in final_weights(out).items():
        assert torch.allclose(value, reference[key], atol=1e-4, rtol=1e-4), key


def test_clipped_sharded_steps_match_one_process(tmp_path):
    """Clipping on the local shards with one all-reduce (parallel.clip_grad_norm) = one process."""
    clip = ["optim.clip_grad=0.05"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 1, *clip)
    run(two, 2, "parallel.strategy=fsdp2", *clip)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    reference = final_weights(one)
    for key, value in final_weights(two).items():
        assert torch.allclose(value, reference[key], atol=1e-4, rtol=1e-4), key


def test_fsdp2_checkpoint_resumes_on_one_process_and_back(tmp_path, single, straight_nine_steps_run):
    """2 -> 1 and 1 -> 2 processes: the steps after the resume match the uninterrupted run."""
    straight = straight_nine_steps_run
    assert losses(straight)[:6] == losses(single)  # the kNN monitor, on in `single`, leaves training unchanged
    two_then_one = tmp_path / "two_then_one"
    run(two_then_one, 2, "parallel.strategy=fsdp2", steps=6)
    run(two_then_one, 1, steps=9)
    one_then_two = tmp_path / "one_then_two"
    run(one_then_two, 1, "parallel.strategy=fsdp2", steps=6)  # the model whole, nothing to shard
    result = run(one_then_two, 2, "parallel.strategy=fsdp2", steps=9)
    assert "resumed from" in result.stdout + result.stderr
    for resumed in (two_then_one, one_then_two):
        assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 10))
        assert losses(resumed) == pytest.approx(losses(straight), rel=1e-4)


@pytest.mark.parametrize("strategy", ["fsdp2", pytest.param("zero3", marks=pytest.mark.deepspeed)])
def test_export_consolidated_of_a_sharded_checkpoint(tmp_path, strategy):
    out = tmp_path / strategy
    result = run(out, 2, f"parallel.strategy={strategy}", steps=3, launcher="accelerate")
    assert f"{strategy}: " in result.stdout and " on 2 process(es)" in result.stdout
    ckpt = checkpoint.latest(checkpoint.checkpoint_root(out))
    exported = tmp_path / "mae.safetensors"
    cli = subprocess.run(
        [sys.executable, "-m", "maescale", "export", "--ckpt", str(ckpt), "--format", "consolidated",
         "--out", str(exported)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    model = build_model("mae_vit_micro_patch4", norm_pix_loss=True)  # the run's loss setting
    model.load_state_dict(load_file(str(exported)), strict=True)
    _, from_checkpoint = load_run_model(ckpt)
    images = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 64)
    with torch.no_grad():
        assert model(images, noise=noise)[0] == from_checkpoint(images, noise=noise)[0]
    cfg = load_config(out / "config.yaml")
    assert cfg.parallel.strategy == strategy


def worker_with_rank(parent: int, rank: int) -> int | None:
    """PID of the torchrun worker whose environment says RANK=`rank`."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


def test_a_signal_to_one_rank_stops_all_after_the_same_step(tmp_path):
    out = tmp_path / "run"
    args = [*COMMON, f"output_dir={out}", "data.batch_size=8", "train.max_steps=100000", "schedule.epochs=5000",
            "parallel.strategy=fsdp2", "checkpoint.every_steps=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "maescale", "pretrain", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    os.kill(worker_with_rank(proc.pid, 1), signal.SIGTERM)  # rank 1 only, like a preempted task
    output, _ = proc.communicate(timeout=120)
    assert "SIGTERM received: stopping after step" in output, output[-3000:]
    saved = checkpoint.latest(checkpoint.checkpoint_root(out))
    assert saved is not None, output[-3000:]
    assert int(saved.name.split("_")[1]) == read_metrics(out)[-1]["step"]  # both ranks saved the same step
