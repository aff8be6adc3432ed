"""Test processes started from an interpreter that has already imported maescale.

A process started with `python -m maescale` spends ~3.5 s of CPU importing torch, torchvision,
timm and maescale before its first step: most of what a short test run costs. A multiprocessing
forkserver imports them once per test worker and forks every process from that clean,
single-threaded interpreter. The children are as separate as `python -m maescale` processes
(their own memory, gloo groups, exit codes and output files); only the start differs, so the
launchers (torchrun, accelerate launch, sbatch/srun) keep tests of their own that exec them.
"""

import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from maescale.parallel import free_port

# The modules every maescale command imports (the trainer pulls in torch, torchvision, timm,
# accelerate and torch.distributed's checkpointing and tensors).
PRELOAD = ["maescale.__main__", "maescale.train"]
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(PRELOAD)


def _maescale_main(args: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        with open(path, "w") as file:
            os.dup2(file.fileno(), fd)
    import torch

    from maescale.__main__ import main

    # The OpenMP runtime read its environment when the forkserver loaded it: a new process would
    # read this one's.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count()))
    sys.argv = ["maescale", *args]
    sys.exit(main(args))  # multiprocessing turns SystemExit into the exit code


class MaescaleProcess:
    """`maescale *args` in a process forked from the forkserver, with Popen's poll/kill/returncode;
    stdout and stderr go to the named files."""

    def __init__(self, args: list[str], env: dict, cwd: Path, stdout: Path, stderr: Path):
        self._process = FORKSERVER.Process(target=_maescale_main,
                                           args=([str(a) for a in args], dict(env), str(cwd), str(stdout), str(stderr)))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def kill(self) -> None:
        if self._process.exitcode is None:
            self._process.kill()
        self._process.join()


def run_ranks(args: list[str], nproc: int, env: dict, cwd: Path, timeout: float,
              command: list[str] | None = None) -> subprocess.CompletedProcess:
    """`maescale *args` (or `command *args`, exec'd) as ranks 0..nproc-1 of one job on this node,
    with the env:// variables set as srun sets them; one process without them when `nproc` is 1.
    Stops them all when one fails or the time runs out. stdout and stderr are the ranks' in rank
    order, like a launcher's."""
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
                  "LOCAL_WORLD_SIZE": str(nproc)}
    with tempfile.TemporaryDirectory() as logs:
        outputs = [(Path(logs) / f"{r}.out", Path(logs) / f"{r}.err") for r in range(nproc)]
        ranks = []
        for rank, (out, err) in enumerate(outputs):
            rank_env = {**env, **rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)} if nproc > 1 else env
            if command is None:
                ranks.append(MaescaleProcess(args, rank_env, cwd, out, err))
            else:
                with open(out, "w") as stdout, open(err, "w") as stderr:
                    ranks.append(subprocess.Popen([*command, *map(str, args)], cwd=cwd, env=rank_env,
                                                  stdout=stdout, stderr=stderr))
        deadline = time.time() + timeout
        while any(rank.poll() is None for rank in ranks):
            if time.time() > deadline or any(rank.poll() for rank in ranks):
                for rank in ranks:
                    rank.kill()
            time.sleep(0.05)
        texts = [(out.read_text(errors="replace"), err.read_text(errors="replace")) for out, err in outputs]
    code = next((rank.returncode for rank in ranks if rank.returncode), 0)
    return subprocess.CompletedProcess(args, code, "".join(o for o, _ in texts), "".join(e for _, e in texts))
