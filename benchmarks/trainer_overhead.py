"""The trainer's overhead: `maescale pretrain` end to end vs the bare step, one process.

    python benchmarks/trainer_overhead.py --model mae_vit_tiny_patch4 --batch-size 128 --steps 40 --log-every 10

Alternates, in rounds: a `maescale pretrain` run on synthetic data (a fresh output folder,
as a subprocess: the trainer exactly as users start it) and the bare step (forward,
backward, AdamW on one batch already in memory; maescale/bench.py) of the same model,
batch and loss, in this process. The trainer's images/s comes from its own metrics.jsonl,
over the logging windows after the first (which holds start-up); the bare step is timed
over as many steps. The ratio per round is trainer / bare; the median is reported.

--profile FILE adds one more trainer run under cProfile (written to FILE) and prints the
functions with the most own time, to see where the trainer's time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from maescale.bench import StepBench, StepVariant, time_steps  # noqa: E402
from maescale.metrics import read_metrics  # noqa: E402


def pretrain_command(args: argparse.Namespace, output_dir: Path, profile: str | None = None) -> list[str]:
    runner = ["-m", "cProfile", "-o", profile] if profile else []
    return [
        sys.executable, *runner, "-m", "maescale", "pretrain",
        f"output_dir={output_dir}", f"model.name={args.model}", "model.norm_pix_loss=true",
        "data.kind=synthetic", f"data.synthetic_size={args.batch_size * (args.steps + 1)}",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
        f"train.max_steps={args.steps}", f"train.log_every={args.log_every}",
        f"checkpoint.every_steps={args.checkpoint_every}", "schedule.epochs=1", "schedule.warmup_epochs=0",
    ]


def run_trainer(args: argparse.Namespace, profile: str | None = None) -> float:
    """Images/s of one trainer run over its logging windows after the first (harmonic mean)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        done = subprocess.run(pretrain_command(args, Path(tmp) / "run", profile), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise RuntimeError(f"maescale pretrain failed ({done.returncode}):\n{done.stderr[-3000:]}")
        rates = [row["images_per_sec"] for row in read_metrics(Path(tmp) / "run")[1:]]
    if not rates:
        raise ValueError("no logging window after the first: raise --steps or lower --log-every")
    return len(rates) / sum(1 / r for r in rates)


def measure(args: argparse.Namespace) -> dict:
    bench = StepBench(args.model, batch_size=args.batch_size, device="cpu", norm_pix_loss=True)
    bench.apply(StepVariant())
    step = bench.step_fn(StepVariant())
    timed_steps = args.steps - args.log_every
    for _ in range(2):
        step()
    trainer, bare = [], []
    for _ in range(args.rounds):
        trainer.append(run_trainer(args))
        bare.append(args.batch_size / time_steps(step, timed_steps, bench.device))
    ratios = [t / b for t, b in zip(trainer, bare)]
    return {
        "model": args.model, "batch_size": args.batch_size, "workers": args.workers, "steps": args.steps,
        "trainer_images_per_sec": trainer, "bare_images_per_sec": bare, "ratio_per_round": ratios,
        "ratio": statistics.median(ratios),
    }


def print_profile(path: str, top: int) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_tiny_patch4")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers of the trainer")
    parser.add_argument("--steps", type=int, default=40, help="trainer steps per run")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=10**6, help="checkpoint.every_steps of the trainer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per trainer run")
    parser.add_argument("--profile", help="also run the trainer once under cProfile, writing this file")
    parser.add_argument("--top", type=int, default=25, help="functions shown from the profile")
    args = parser.parse_args()
    if args.steps <= args.log_every:
        parser.error("--steps must exceed --log-every: the first logging window holds start-up")
    result = measure(args)
    print(json.dumps(result))
    print(f"trainer / bare step: {result['ratio']:.3f} (per round: "
          + ", ".join(f"{r:.3f}" for r in result["ratio_per_round"]) + ")")
    if args.profile:
        run_trainer(args, profile=args.profile)
        print_profile(args.profile, args.top)


if __name__ == "__main__":
    main()
