"""The Slurm scripts on a real single-node Slurm cluster (slurmctld + slurmd + munge, started here).

The real `slurm/pretrain_vitb.sh` (a header around the body `slurm/pretrain.sh`) is submitted with
the nodes/GPUs overridden on the sbatch command line to fit this machine (1 node, 2 CPU processes
over gloo) and a tiny model. The jobs request one CPU each so that two can run at once; a job of
the `urgent` partition that needs both CPUs preempts them.
"""

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import SlurmCluster, missing_requirement

from maescale.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 80
TRAIN = [
    "model.name=mae_vit_micro_patch4", "data.kind=synthetic", "data.synthetic_size=512", "data.batch_size=8",
    "data.num_workers=0", "train.precision=fp32", "parallel.strategy=ddp", "schedule.epochs=4",
    "schedule.warmup_epochs=1", "optim.blr=1.5e-3", "train.log_every=1", "train.figure_every=null",
    f"train.max_steps={STEPS}", "checkpoint.every_steps=20",
]
FIT_ONE_CPU_NODE = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1"]
JOB_TIMEOUT = 240

pytestmark = pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement()))


def job_env() -> dict[str, str]:
    """What the jobs inherit through sbatch: this interpreter and this checkout, on CPU."""
    return {"MAESCALE_PYTHON": sys.executable, "PYTHONPATH": str(REPO), "MAESCALE_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()  # jobs first, then the daemons by their pid files, whatever happened


def submit_pretrain(cluster: SlurmCluster, run: Path, *sbatch_args: str) -> int:
    return cluster.submit(*FIT_ONE_CPU_NODE, f"--output={run}.log", *sbatch_args, "slurm/pretrain_vitb.sh",
                          f"output_dir={run}", *TRAIN, env=job_env(), cwd=REPO)


def job_log(run: Path) -> str:
    # A process killed mid-write may leave half a UTF-8 character (tqdm's bar) behind.
    return Path(f"{run}.log").read_text(errors="replace")


def last_step(run: Path) -> int:
    try:
        return read_metrics(run)[-1]["step"]
    except (FileNotFoundError, IndexError, ValueError):  # not written yet, or a line being written
        return 0


def wait_for(condition, what: str, timeout: float = JOB_TIMEOUT, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_running_at(cluster: SlurmCluster, job_id: int, run: Path, step: int) -> None:
    """Wait until the job runs and its trainer has logged `step` (so a stop lands mid-run)."""
    def reached():
        state = cluster.job(job_id).get("JobState")
        assert state not in ("COMPLETED", "FAILED", "CANCELLED"), f"job {job_id} ended early: {state}"
        return state == "RUNNING" and last_step(run) >= step

    wait_for(reached, f"job {job_id} to reach step {step}")


def resumed_step(run: Path, times: int) -> int:
    """Once the job log shows `times` resumes, the step of the last (0 for none)."""
    if times == 0:
        return 0
    lines = wait_for(
        lambda: [line for line in job_log(run).splitlines() if line.startswith("resumed from")][times - 1:],
        f"resume number {times}",
    )
    return int(lines[-1].rsplit(" ", 1)[1])


def assert_continues(run: Path, reference: Path) -> None:
    """Same optimizer steps as the uninterrupted run, each once, and the same losses."""
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in read_metrics(reference)], rel=1e-4)
    assert (run / "checkpoints" / f"step_{STEPS:08d}").is_dir()


@pytest.fixture(scope="module")
def baseline(cluster, tmp_path_factory):
    """An uninterrupted job, submitted with `sbatch --wait` and the script's log location
    (logs/slurm/<job name>-<job id>.out); the tests below compare interrupted jobs with it.
    It runs while the first of them does."""
    run = tmp_path_factory.mktemp("baseline") / "run"
    name = f"maescale-test-{os.getpid()}"  # a log name no real job of this checkout has
    command = ["sbatch", "--wait", "--parsable", f"--job-name={name}", *FIT_ONE_CPU_NODE, "slurm/pretrain_vitb.sh",
               f"output_dir={run}", *TRAIN]
    process = subprocess.Popen(command, cwd=REPO, env=cluster.env(job_env()), stdout=subprocess.PIPE, text=True)
    job_id = int(process.stdout.readline().strip().split(";")[0])

    log = REPO / "logs" / "slurm" / f"{name}-{job_id}.out"

    def finished() -> tuple[int, Path, Path]:
        process.wait(timeout=JOB_TIMEOUT)
        return process.returncode, run, log

    yield finished
    if process.poll() is None:
        process.kill()
    log.unlink(missing_ok=True)


def test_script_without_gpus_fails_with_a_clear_error(cluster, tmp_path):
    """The ViT-H script on a node without GPUs, not told to use the CPU: a message, not a hang."""
    env = {**job_env(), "MAESCALE_DEVICE": "gpu"}
    job_id = cluster.submit(*FIT_ONE_CPU_NODE, f"--output={tmp_path}/job.log", "slurm/pretrain_vith.sh", env=env,
                            cwd=REPO)
    info = cluster.wait_finished(job_id, 60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert ("no GPUs allocated: request --gpus-per-node, or run on CPU with MAESCALE_DEVICE=cpu"
            in (tmp_path / "job.log").read_text())


def test_usr1_then_preemption_resume_with_the_same_steps(cluster, baseline, tmp_path):
    """The time-limit warning (USR1 to the batch shell: checkpoint, `scontrol requeue`), then
    preemption (SIGTERM from Slurm, which requeues the job itself) of the requeued job: each time
    the job resumes from the checkpoint written at the stop, and it ends with the steps and
    losses of the uninterrupted run."""
    run = tmp_path / "run"
    job_id = submit_pretrain(cluster, run)
    for restart, how in enumerate(("usr1", "preempt"), start=1):
        wait_running_at(cluster, job_id, run, step=resumed_step(run, restart - 1) + 4)
        if how == "usr1":
            cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
        else:
            baseline()  # the baseline's job must have ended, or it would be preempted too
            cluster.preempt(cpus=cluster.cpus)
        wait_for(lambda restart=restart: cluster.job(job_id).get("Restarts") == str(restart),
                 f"job {job_id} to be requeued")
    info = cluster.wait_finished(job_id, JOB_TIMEOUT)
    log = job_log(run)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "2", log[-3000:]
    assert log.count("got SIGUSR1") == 1 and log.count(f"requeueing job {job_id}") == 1, log[-3000:]
    assert log.count("got SIGTERM") == 1, log[-3000:]
    stops = re.findall(r"received: stopping after step (\d+)", log)
    assert len(stops) == 2 and re.findall(r"resumed from \S+ at step (\d+)", log) == stops
    returncode, reference, _ = baseline()
    assert returncode == 0
    assert_continues(run, reference)


def test_baseline_job_writes_checkpoints_metrics_and_log(baseline):
    returncode, run, log_file = baseline()
    assert returncode == 0
    log = log_file.read_text(errors="replace")
    # output_dir and data.num_workers on the command line win over the body's defaults
    body = [line for line in log.splitlines() if line.startswith("[maescale slurm")]
    assert not [line for line in body if "run folder:" in line or "CPUs per node" in line], body
    assert "1 node(s) x 2 process(es)" in log and "ddp: replicate 2, fp32 on 2 process(es) (cpu, gloo)" in log
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps[-1] == f"step_{STEPS:08d}"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["derived"]["world_size"] == 2 and config["model"]["name"] == "mae_vit_micro_patch4"
    assert config["output_dir"] == str(run) and config["data"]["num_workers"] == 0


def test_sweep_submits_one_job_per_point_and_summarizes(cluster, tmp_path):
    """A two-point sweep (1 and 2 processes) through `python -m slurm.sweep`, then its table and plot."""
    sweep = {
        "name": "test-sweep", "output_root": str(tmp_path / "sweep"), "models": ["vitb"], "nodes": [1],
        "procs_per_node": [1, 2], "strategies": ["ddp"], "mask_ratios": [0.75], "batch_per_gpu": [8],
        "steps": 12, "warmup_steps": 4, "log_every": 2,
        "overrides": [t for t in TRAIN if not t.startswith(("train.max_steps", "train.log_every", "parallel."))],
        "sbatch": ["--gpus-per-node=0", "--cpus-per-task=1"], "env": {"OMP_NUM_THREADS": 1},
    }
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    command = [sys.executable, "-m", "slurm.sweep"]
    submitted = subprocess.run([*command, "submit", str(sweep_file)], cwd=REPO, env=cluster.env(job_env()),
                               capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    points = sorted((tmp_path / "sweep").glob("*/point.yaml"))
    assert [p.parent.name for p in points] == ["vitb-n1p1-ddp-m0.75-b8", "vitb-n1p2-ddp-m0.75-b8"]
    for point in points:
        job_id = yaml.safe_load(point.read_text())["job_id"]
        info = cluster.wait_finished(job_id, JOB_TIMEOUT)
        assert info["JobState"] == "COMPLETED", (
            (point.parent / f"slurm-{job_id}.out").read_text(errors="replace")[-3000:]
        )

    summary = subprocess.run([*command, "summarize", str(sweep_file)], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert summary.returncode == 0, summary.stderr
    with open(tmp_path / "sweep" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["gpus"], r["status"], r["steps"]) for r in rows] == [("1", "ok", "12"), ("2", "ok", "12")]
    assert float(rows[0]["efficiency"]) == 1.0 and float(rows[1]["efficiency"]) > 0
    for row in rows:
        assert float(row["images_per_sec"]) > 0 and float(row["peak_memory_gib"]) > 0
        assert float(row["step_time_ms"]) == pytest.approx(1000 * 8 * int(row["gpus"]) / float(row["images_per_sec"]))
    assert "| mae_vit_micro_patch4 | ddp | 1 | 2 |" in (tmp_path / "sweep" / "summary.md").read_text()
    assert (tmp_path / "sweep" / "scaling.png").stat().st_size > 10_000


# Short jobs that leave output_dir and data.num_workers to the body (the recipe says 10 workers).
SHORT = [t for t in TRAIN if not t.startswith(("data.num_workers", "train.max_steps", "checkpoint."))] + [
    "train.max_steps=2", "checkpoint.every_steps=2"]


def test_environment_hook_makes_the_environment_of_a_clean_job(cluster, tmp_path):
    """`sbatch --export=MAESCALE_ENV_SETUP=FILE`: the job starts with nothing of this shell's
    environment but the hook's path; the hook, sourced by the batch shell and on the node, sets
    what the job needs. Its run folder defaults to $SCRATCH/maescale/<job name> (SCRATCH set by the
    hook), its loader workers to --cpus-per-task / processes - 1."""
    marker, scratch = tmp_path / "sourced", tmp_path / "scratch"
    hook = tmp_path / "env.sh"
    exports = {**job_env(), "MAESCALE_PROCS_PER_NODE": "1", "SCRATCH": str(scratch)}
    hook.write_text("".join(f"export {key}='{value}'\n" for key, value in exports.items())
                    + f'echo "${{SLURM_STEP_ID:-batch}} $SLURM_JOB_ID" >> {marker}\n')
    name = f"maescale-hook-{os.getpid()}"
    job_id = cluster.submit("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", f"--job-name={name}",
                            f"--output={tmp_path}/job.log", f"--export=MAESCALE_ENV_SETUP={hook}",
                            "slurm/pretrain_vitb.sh", *SHORT, cwd=REPO)
    info = cluster.wait_finished(job_id, JOB_TIMEOUT)
    log = (tmp_path / "job.log").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-3000:]
    # sourced twice: by the batch shell, then by the node's task of the one srun step
    assert sorted(marker.read_text().splitlines()) == [f"0 {job_id}", f"batch {job_id}"]
    run = scratch / "maescale" / name
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["output_dir"] == str(run) and config["derived"]["world_size"] == 1
    assert config["data"]["num_workers"] == 1  # 2 CPUs / 1 process - 1
    assert f"run folder: {run}" in log and "data.num_workers=1: 2 CPUs per node / 1 process(es)" in log
    assert (run / "checkpoints" / "step_00000002").is_dir()


def test_output_root_and_at_least_one_loader_worker(cluster, tmp_path):
    """MAESCALE_OUTPUT_ROOT wins over SCRATCH; 2 CPUs for 2 processes still leave one loader worker each."""
    env = {**job_env(), "MAESCALE_OUTPUT_ROOT": str(tmp_path / "runs"), "SCRATCH": str(tmp_path / "scratch")}
    name = f"maescale-root-{os.getpid()}"
    job_id = cluster.submit("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", f"--job-name={name}",
                            f"--output={tmp_path}/job.log", "slurm/pretrain_vitb.sh", *SHORT, env=env, cwd=REPO)
    info = cluster.wait_finished(job_id, JOB_TIMEOUT)
    log = (tmp_path / "job.log").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-3000:]
    config = yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())
    assert config["derived"]["world_size"] == 2 and config["data"]["num_workers"] == 1
    assert not (tmp_path / "scratch").exists()


FINETUNE = ["encoder.ckpt=null", "encoder.model=mae_vit_micro_patch4", "finetune.img_size=null", "data.kind=synthetic",
            "data.synthetic_size=256", "data.batch_size=8", "data.num_workers=0", "finetune.epochs=10",
            "finetune.warmup_epochs=1", "finetune.log_every=1", "checkpoint.every_steps=1000"]


def test_finetune_job_requeues_at_the_warning_and_finishes(cluster, tmp_path):
    """slurm/finetune.sh: the same body, `maescale finetune` instead of pretrain; USR1 checkpoints,
    the job requeues itself and the requeued job resumes and writes the classifier."""
    run = tmp_path / "finetune"
    job_id = cluster.submit(*FIT_ONE_CPU_NODE, f"--output={run}.log", "slurm/finetune.sh", f"output_dir={run}",
                            *FINETUNE, env=job_env(), cwd=REPO)
    wait_running_at(cluster, job_id, run, step=4)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    wait_for(lambda: cluster.job(job_id).get("Restarts") == "1", f"job {job_id} to be requeued")
    info = cluster.wait_finished(job_id, JOB_TIMEOUT)
    log = job_log(run)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    stopped = re.findall(r"stopped by SIGUSR1 at step (\d+)", log)
    assert len(stopped) == 1 and re.findall(r"resumed from \S+ at step (\d+)", log) == stopped, log[-3000:]
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    derived = yaml.safe_load((run / "finetune_config.yaml").read_text())["derived"]
    assert derived["world_size"] == 2 and derived["last_step"] == 160  # 10 epochs of 256 / (2 x 8)
    assert steps == list(range(1, 161))
    assert (run / "finetuned.safetensors").is_file()
