"""A real single-node Slurm cluster (Debian's slurmctld/slurmd 22.05 + munge) in a folder.

Everything the daemons write (keys, sockets, state, spool, logs, pid files) stays in that
folder, and the ports are free ones, so several clusters can share a machine. Used by
tests/test_slurm.py; also runnable by hand:

    python tests/slurm_cluster.py start /tmp/slurm     # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop /tmp/slurm

Settings that make a one-machine cluster behave (measured on Debian 12, Slurm 22.05.8):
`slurmd -N <hostname -s>` with CPUs/memory no larger than `slurmd -C` reports (else the
node drains); proctrack/linuxproc and task/none (no cgroups or systemd); cred_expire=5
(a requeued job may start again after about 7 s; with the default, 120 s); scheduler passes
every 2 s; MinJobAge so finished jobs stay visible to `scontrol` long enough to be read.
Two partitions of different priority tier and PreemptMode=REQUEUE: a job submitted to
`urgent` preempts (SIGTERM, then requeue) the jobs of `debug` that it needs the CPUs of.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun")
INSTALL_HINT = "apt-get install slurmctld slurmd slurm-client munge (bash launchers/env.sh test does it)"
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def missing_requirement() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    missing = [
        name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None and not Path("/usr/sbin", name).exists()
    ]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the Slurm daemons of the test cluster must be started as root"
    if not _user_exists("munge"):
        return "the munge user does not exist (the munge package creates it)"
    return None


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _free_port() -> int:
    # Not maescale.parallel.free_port: this file also runs as a script, which should not import torch.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def node_hardware() -> dict[str, int]:
    """CPUs, sockets, cores, threads and memory as `slurmd -C` reports them."""
    out = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {key: int(fields[key]) for key in keys}


class SlurmCluster:
    """munged + slurmctld + slurmd on this machine, configured and run from `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.munge_link = self.root / "munge"  # -> the munge folder (see _start_munge)
        self.node = socket.gethostname().split(".")[0]

    # ------------------------------------------------------------ start / stop

    def start(self, timeout: float = 30) -> SlurmCluster:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        subprocess.run([_binary("slurmctld"), "-f", str(self.conf)], check=True, env=self.env())
        subprocess.run([_binary("slurmd"), "-f", str(self.conf), "-N", self.node], check=True, env=self.env())
        self._wait_until_idle(timeout)
        return self

    @property
    def munge_dir(self) -> Path:
        return self.munge_link.resolve()

    @property
    def socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    def _start_munge(self) -> None:
        """munged runs as the munge user, which needs every folder above its socket to be
        traversable: it gets a folder of its own under the system temp folder, linked from root."""
        if not self.munge_link.exists():
            self.munge_link.symlink_to(tempfile.mkdtemp(prefix="maescale-munge-"))
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
        shutil.chown(self.munge_dir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        self.munge_dir.chmod(0o755)
        key.chmod(0o400)
        files = {name: self.munge_dir / name for name in ("munged.pid", "munged.log", "munged.seed")}
        subprocess.run(
            ["runuser", "-u", "munge", "--", _binary("munged"), f"--socket={self.socket}", f"--key-file={key}",
             f"--pid-file={files['munged.pid']}", f"--log-file={files['munged.log']}",
             f"--seed-file={files['munged.seed']}"],
            check=True,
        )

    def _write_conf(self) -> None:
        hw = node_hardware()
        self.cpus = hw["CPUs"]
        memory = max(hw["RealMemory"] // 2, 1)  # leave room for the rest of the machine
        r = self.root
        node_line = (
            f"NodeName={self.node} CPUs={hw['CPUs']} Boards={hw['Boards']} SocketsPerBoard={hw['SocketsPerBoard']} "
            f"CoresPerSocket={hw['CoresPerSocket']} ThreadsPerCore={hw['ThreadsPerCore']} RealMemory={memory} "
            "State=UNKNOWN"
        )
        self.conf.write_text(f"""\
ClusterName=maescale-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5,socket={self.socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=16
KillWait=30
ReturnToService=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{node_line}
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=10
""")

    def _wait_until_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                                 env=self.env()).stdout
            if out.split() and set(out.split()) <= {"idle", "mixed", "allocated"}:
                return
            time.sleep(0.3)
        raise RuntimeError(f"the Slurm node did not become idle in {timeout:.0f} s; see {self.root / 'log'}")

    def stop(self) -> None:
        """Cancel jobs, then stop slurmd, slurmctld and munged by the PIDs in their pid files."""
        if self.conf.exists():
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env(), capture_output=True)
            self._wait_for_no_jobs(timeout=40)
        # slurmd and slurmctld stop together (each takes seconds), then munged, which they use.
        _terminate(self.root / "slurmd.pid", self.root / "slurmctld.pid")
        _terminate(self.munge_dir / "munged.pid")
        if self.munge_link.is_symlink():
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_link.unlink()

    def _wait_for_no_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T"], capture_output=True, text=True,
                                 env=self.env())
            if out.returncode != 0 or set(out.stdout.split()) <= FINISHED_STATES:
                return
            time.sleep(0.5)

    # ------------------------------------------------------------ jobs

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """This environment without an outer job's SLURM_* variables, pointed at this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def run(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> str:
        result = subprocess.run(list(args), capture_output=True, text=True, env=self.env(env), cwd=cwd, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def submit(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> int:
        """`sbatch --parsable ARGS`; returns the job id."""
        return int(self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is purged."""
        result = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                                env=self.env())
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait_finished(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll until the job has finished (requeues included); returns its last record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            if not info:
                raise RuntimeError(f"job {job_id} vanished from slurmctld before it was seen finished")
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s: {self.job(job_id)}")

    def preempt(self, cpus: int) -> int:
        """Submit a short job to the high-tier partition that needs `cpus` CPUs; returns its id."""
        return self.submit("--partition=urgent", f"--cpus-per-task={cpus}",
                           f"--output={self.root / 'log' / 'urgent-%j.out'}", "--wrap", "sleep 1")


def _terminate(*pid_files: Path, timeout: float = 15) -> None:
    """SIGTERM the daemons named in `pid_files` and wait for them to exit (SIGKILL after `timeout`)."""
    pids = []
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            continue
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    cluster = SlurmCluster(argv[1])
    if argv[0] == "stop":
        cluster.stop()
        return 0
    reason = missing_requirement()
    if reason:
        print(f"cannot start a Slurm cluster: {reason}", file=sys.stderr)
        return 1
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
