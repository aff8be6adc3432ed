"""What the host's memory allocator costs and saves: one trainer run under each, interleaved.

    python benchmarks/host_allocator.py --allocators glibc glibc_mmap_128k jemalloc tcmalloc --rounds 2
    python benchmarks/host_allocator.py --nproc 2 --threads 1 --steps 4 -- model.name=mae_vit_base_patch16 \
        parallel.strategy=deepspeed parallel.zero_stage=3 data.batch_size=2 data.num_workers=0

PyTorch allocates CPU tensors with the C library's malloc and frees them at once (no caching
allocator, unlike CUDA). glibc keeps freed heap memory resident, so a run that frees and
reallocates many mid-sized tensors (FSDP2's per-unit buffers, DeepSpeed's flattening) ends up
with a peak RSS well above its live tensors; mapping each large block on its own
(`MALLOC_MMAP_THRESHOLD_`) returns it, at the price of a page fault per 4 KiB on every
reallocation. jemalloc and tcmalloc (`LD_PRELOAD`, Debian's libjemalloc2 and
libtcmalloc-minimal4) are the usual alternatives. Each row is `maescale pretrain` (by default
the demo config, 30 steps, no figures or checkpoints) in a fresh process tree, allocators
alternating round by round; the table gives medians over rounds of wall time, CPU time
(user + system) and system time of the whole tree, minor page faults, and the peak RSS of its
largest process. Arguments after `--` are extra config overrides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
# allocator name -> environment it runs under: glibc tunables, or a library to preload
ALLOCATORS = {
    "glibc": {},
    "glibc_mmap_128k": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    "glibc_mmap_1m": {"MALLOC_MMAP_THRESHOLD_": "1048576"},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
}


def allocator_env(name: str) -> dict[str, str] | None:
    """The environment of one allocator, with its library's full path; None if not installed."""
    env = dict(ALLOCATORS[name])
    if "LD_PRELOAD" in env:
        found = [Path(d, env["LD_PRELOAD"]) for d in LIBRARY_DIRS if Path(d, env["LD_PRELOAD"]).exists()]
        if not found:
            return None
        env["LD_PRELOAD"] = str(found[0])
    return env


def pretrain_command(args: argparse.Namespace, output_dir: str) -> list[str]:
    launch = [sys.executable, "-m", "maescale"] if args.nproc == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/cpu.yaml"),
        "--num_processes", str(args.nproc), "-m", "maescale"]
    return [*launch, "pretrain", "--config", args.config, f"output_dir={output_dir}",
            f"train.max_steps={args.steps}", "train.figure_every=null", "checkpoint.every_steps=1000000",
            "train.log_every=1000000", *args.overrides]


def run_env(env_extra: dict[str, str], threads: int) -> dict[str, str]:
    """This process's environment with one allocator's settings instead of the caller's own
    (which would otherwise leak into every row, the glibc one included)."""
    inherited = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    return {**inherited, **env_extra, "OMP_NUM_THREADS": str(threads)}


def run_once(args: argparse.Namespace, env_extra: dict[str, str]) -> dict[str, float]:
    """One run in a fresh process tree; its resources come from wait4 (the tree's reaped processes)."""
    with tempfile.TemporaryDirectory() as output_dir:
        start = time.perf_counter()
        proc = subprocess.Popen(pretrain_command(args, output_dir), cwd=REPO, env=run_env(env_extra, args.threads),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"run under {env_extra or 'glibc'} failed ({proc.returncode}):\n{stderr[-3000:]}")
        # ru_maxrss is KiB on Linux: the largest single process of the tree
        return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "sys_s": usage.ru_stime,
                "minor_faults": usage.ru_minflt, "peak_rss_mib": usage.ru_maxrss / 1024}


def measure(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    envs = {name: allocator_env(name) for name in args.allocators}
    for name in [n for n, env in envs.items() if env is None]:
        print(f"skipping {name}: {ALLOCATORS[name]['LD_PRELOAD']} is not installed", file=sys.stderr)
        del envs[name]
    if not envs:
        raise SystemExit("none of the allocators asked for is installed")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in envs}
    names = list(envs)
    for round_index in range(args.rounds):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            runs[name].append(run_once(args, envs[name]))
            print(f"round {round_index + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    return runs


def table(runs: dict[str, list[dict[str, float]]]) -> str:
    base = {key: statistics.median(r[key] for r in next(iter(runs.values()))) for key in ("wall_s", "peak_rss_mib")}
    lines = ["| allocator | wall s | vs first | CPU s (system) | minor faults | peak RSS MiB | vs first |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        lines.append(f"| {name} | {med['wall_s']:.1f} | {med['wall_s'] / base['wall_s']:.2f}x | "
                     f"{med['cpu_s']:.1f} ({med['sys_s']:.1f}) | {med['minor_faults']:.0f} | "
                     f"{med['peak_rss_mib']:.0f} | {med['peak_rss_mib'] / base['peak_rss_mib']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allocators", nargs="+", choices=sorted(ALLOCATORS), default=list(ALLOCATORS))
    parser.add_argument("--config", default=str(REPO / "configs/pretrain/demo.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=1, help="processes (accelerate launch on CPU when > 1)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides after --")
    args = parser.parse_args(argv)
    print(table(measure(args)))


if __name__ == "__main__":
    main()
