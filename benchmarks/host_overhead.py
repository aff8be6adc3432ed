"""Where each training step's host time goes, strategy by strategy, in one interleaved run.

    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --models mae_vit_micro_patch4 mae_vit_tiny_patch4 \\
        --batch-sizes 2 8 --world-sizes 1 2 --profile

For each world size, every process builds every candidate on the same weights and batch, each
as the trainer builds it:

  plain         the model alone (world size 1 only): the reference
  ddp           DistributedDataParallel, as the trainer wraps it
  fsdp2         what parallel.strategy=fsdp2 builds (parallel.build_model): FSDP2 units on
                several processes, the model whole on one (nothing to shard there)
  zero1-3       DeepSpeed ZeRO through its engine, with maescale's DeepSpeed config

(the names are maescale.layout.STRATEGIES; hsdp on one node is fsdp2)

and times them in rounds that alternate the candidates (the order rotates every round), with
the CPU time of the process (one thread: the step's own work, whatever else the machine runs).
Each step is cut into forward, backward, gradient clipping and optimizer step (+ zero_grad);
`train_step` is the trainer's step function (maescale/train.py) on the same batch, and
`hand-off` what it adds to those phases (host-to-device copy, mask noise, accumulation).
ZeRO clips and steps inside `engine.step()` (shown under optimizer); its reduction runs in
backward. Each candidate is compared with the plain model at world size 1 and with DDP on
several processes.

--clock wall times elapsed instead of CPU time: what shows a collective overlapping compute,
on a machine that runs nothing else.

--trainer times instead the trainer's own loop (maescale.train.Trainer on synthetic data,
logging every 10 steps, a loader worker) against the bare step on the same model, optimizer
and batch size, for each of --trainer-strategies, in interleaved rounds: "bare / trainer" is
the share of the bare step's speed the trainer keeps.

--profile adds, per candidate, the CPU time of a few more steps under cProfile split by where
it is spent (FSDP2 hooks, DTensor, optimizer Python, DeepSpeed, autograd engine, ...), so
the table names where the time goes. Results: a Markdown table on stdout; --jsonl appends rows.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from maescale import parallel  # noqa: E402
from maescale.__main__ import silence_uninformative_warnings  # noqa: E402
from maescale.bench import CLOCKS  # noqa: E402
from maescale.config import load_config  # noqa: E402
from maescale.layout import STRATEGIES, Layout  # noqa: E402
from maescale.models import build_model  # noqa: E402
from maescale.optim import build_optimizer  # noqa: E402

silence_uninformative_warnings()  # the trainer's filters, in every rank that imports this module

PHASES = ("forward", "backward", "clip", "optimizer")
CANDIDATES = ("plain", *(name for name in STRATEGIES if name != "hsdp"))
PROFILE_AREAS = (  # first match wins: (label, substring of the function's file or name)
    ("FSDP2", "distributed/fsdp"),
    ("FSDP2", "_fsdp"),
    ("DTensor", "distributed/tensor"),
    ("DeepSpeed", "deepspeed"),
    ("DDP", "nn/parallel"),
    ("optimizer (Python)", "torch/optim"),
    ("autograd engine", "run_backward"),
    ("collectives", "distributed_c10d"),
    ("model (Python)", "maescale/models"),
    ("model (Python)", "timm/"),
    ("nn.Module calls and hooks", "torch/nn/modules"),
    ("record_function", "autograd/profiler"),
)


@dataclass
class Candidate:
    """One strategy's model and optimizer, and the step cut into its phases."""

    name: str
    model: torch.nn.Module
    forward: Callable[[], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    clip: Callable[[], None]
    optimizer: Callable[[], None]
    units: int = 0  # FSDP units
    train_step: Callable[[], object] | None = None
    times: dict[str, list[float]] = field(default_factory=dict)

    def step(self, clock=time.process_time) -> list[float]:
        marks = [clock()]
        loss = self.forward()
        marks.append(clock())
        self.backward(loss)
        marks.append(clock())
        self.clip()
        marks.append(clock())
        self.optimizer()
        marks.append(clock())
        return [b - a for a, b in zip(marks, marks[1:])]


def config(args, model_name: str, batch: int, strategy: str):
    return load_config(None, [
        f"model.name={model_name}", f"data.batch_size={batch}", f"parallel.strategy={strategy}",
        f"optim.clip_grad={args.clip}",
    ])


def layout_of(cfg) -> Layout:
    """The Layout the trainer builds for `cfg` over this process group."""
    return Layout.from_config(cfg.parallel, cfg.train.precision, dist.get_world_size())


def fresh_model(model_name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(model_name)


def torch_step(model, optimizer, images, noise, clip_fn, max_norm) -> dict:
    """The phases of a plain, DDP or FSDP2 step."""
    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return dict(
        forward=lambda: model(images, noise=noise)[0],
        backward=lambda loss: loss.backward(),
        clip=lambda: clip_fn(model.parameters(), max_norm),
        optimizer=optimizer_step,
    )


def build_torch_candidate(name: str, args, model_name: str, batch: int, images, noise, accelerator) -> Candidate:
    from maescale.data import Batch
    from maescale.train import train_step

    cfg = config(args, model_name, batch, "ddp" if name == "plain" else name)  # plain: one process, whole
    if name == "fsdp2":
        model = parallel.build_model(lambda: fresh_model(model_name), layout_of(cfg), cfg.parallel, accelerator)
    else:
        model = fresh_model(model_name)
    units = fsdp_units(model)
    optimizer = build_optimizer(model, cfg.optim, 1e-4)
    if name == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    candidate = Candidate(name, model, units=units,
                          **torch_step(model, optimizer, images, noise, parallel.clip_grad_norm, args.clip))
    labels = torch.zeros(len(images), dtype=torch.long)
    batches = [Batch(images, labels, (), torch.arange(len(images)))]
    candidate.train_step = lambda: train_step(model, optimizer, accelerator, batches, noise.shape[1], args.clip)
    return candidate


def fsdp_units(model: torch.nn.Module) -> int:
    """FSDP parameter groups (one all-gather and one reduce-scatter each per step)."""
    from torch.distributed.fsdp import FSDPModule

    groups = {id(m._get_fsdp_state()._fsdp_param_group) for m in model.modules() if isinstance(m, FSDPModule)}
    return len(groups)


def build_zero_candidate(stage: int, args, model_name: str, batch: int, images, noise) -> Candidate:
    import deepspeed

    cfg = config(args, model_name, batch, f"zero{stage}")
    model = fresh_model(model_name)
    optimizer = build_optimizer(model, cfg.optim, 1e-4)
    settings = parallel.ZeroSettings(batch, args.clip, model.embed_dim)
    # As Accelerate does for an optimizer of the user's (the trainer's path).
    ds_config = {**parallel.deepspeed_config(layout_of(cfg), settings), "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return Candidate(f"zero{stage}", engine, **zero_step(engine, images, noise))


def zero_step(engine, images, noise) -> dict:
    """The phases of a DeepSpeed step: the engine reduces in backward, clips and steps in engine.step()."""
    return dict(forward=lambda: engine(images, noise=noise)[0], backward=engine.backward, clip=lambda: None,
                optimizer=engine.step)


def build_candidates(args, model_name: str, batch: int, accelerator) -> list[Candidate]:
    torch.manual_seed(1)
    probe = build_model(model_name)
    images = torch.randn(batch, probe.in_chans, *probe.img_size)
    noise = torch.rand(batch, probe.num_patches)
    world = dist.get_world_size()
    names = [n for n in args.candidates if not (n == "plain" and world > 1)]
    candidates = []
    for name in names:
        if name in STRATEGIES and Layout(name).deepspeed:
            candidates.append(build_zero_candidate(Layout(name).zero_stage, args, model_name, batch, images, noise))
        else:
            candidates.append(build_torch_candidate(name, args, model_name, batch, images, noise, accelerator))
    return candidates


def timed(fn: Callable[[], object], steps: int, clock: Callable[[], float] = time.process_time) -> float:
    start = clock()
    for _ in range(steps):
        fn()
    return (clock() - start) / steps


def measure(candidates: list[Candidate], args) -> None:
    """Interleaved rounds; each candidate's phase times (and train_step's) per round."""
    for c in candidates:
        for _ in range(args.warmup):
            c.step()
            if c.train_step:
                c.train_step()
        c.times = {phase: [] for phase in (*PHASES, "train_step")}
    clock = CLOCKS[args.clock]
    for r in range(args.rounds):
        order = candidates[r % len(candidates):] + candidates[: r % len(candidates)]
        for c in order:
            per_step = [c.step(clock) for _ in range(args.steps)]
            for phase, values in zip(PHASES, zip(*per_step)):
                c.times[phase].append(statistics.fmean(values))
            if c.train_step:
                c.times["train_step"].append(timed(c.train_step, args.steps, clock))


def profile(candidate: Candidate, steps: int) -> dict[str, float]:
    """Own CPU time per step of the functions run by `steps` steps, summed by area."""
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    for _ in range(steps):
        candidate.step()
    profiler.disable()
    areas: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
        where = f"{filename}:{function}"
        label = next((label for label, key in PROFILE_AREAS if key in where), None)
        if label is None:
            label = "kernels (C++)" if filename == "~" else "other Python"
        areas[label] = areas.get(label, 0.0) + 1000 * own / steps
    return dict(sorted(areas.items(), key=lambda item: -item[1]))


def result_rows(candidates: list[Candidate], model_name: str, batch: int, world: int, args) -> list[dict]:
    medians = {c.name: {phase: 1000 * statistics.median(t) for phase, t in c.times.items() if t} for c in candidates}
    totals = {name: sum(m[p] for p in PHASES) for name, m in medians.items()}
    rows = []
    for c in candidates:
        m = medians[c.name]
        reference = reference_for(c.name, totals)
        row = {
            "model": model_name, "batch": batch, "world": world, "candidate": c.name, **{p: m[p] for p in PHASES},
            "step": totals[c.name], "vs_reference": totals[c.name] / totals[reference] if reference else None,
            "reference": reference, "units": c.units, "clock": args.clock, "train_step": m.get("train_step"),
        }
        if args.profile:
            row["profile"] = profile(c, args.profile_steps)
        rows.append(row)
    return rows


def reference_for(name: str, totals: dict[str, float]) -> str | None:
    """What a candidate is compared with, of those that ran: the plain model, else DDP (several
    processes); None when neither ran."""
    return next((reference for reference in ("plain", "ddp") if reference in totals), None)


def trainer_rows(args, model_name: str, batch: int, world: int, tmp: Path) -> list[dict]:
    """The trainer's loop (maescale.train.Trainer, synthetic data, logging every 10 steps) vs the
    bare step on the same model, optimizer and batch size, for each strategy, interleaved."""
    from maescale.train import StopRequest, Trainer

    trainers = {}
    for strategy in args.trainer_strategies:
        zero = Layout(strategy).deepspeed
        cfg = load_config(None, [
            f"output_dir={tmp / f'{strategy}_{model_name}_{batch}'}", f"model.name={model_name}",
            f"data.batch_size={batch}", f"data.synthetic_size={batch * world * 10_000}",
            f"data.num_workers={args.trainer_workers}", f"optim.clip_grad={args.clip}",
            f"parallel.strategy={strategy}",
            "checkpoint.every_steps=1000000", "schedule.epochs=1", "schedule.warmup_epochs=0",
        ])
        trainer = Trainer(cfg)
        trainer.prepare_run_folder()
        images = torch.randn(batch, cfg.model.in_chans, *trainer.img_size)
        noise = torch.rand(batch, trainer.num_patches)
        model = trainer.model
        if zero:
            phases = zero_step(model, images, noise)
        else:
            phases = torch_step(model, trainer.optimizer, images, noise, parallel.clip_grad_norm, args.clip)
        trainers[strategy] = (trainer, Candidate(strategy, model, **phases))
    times = {name: {"trainer": [], "bare": []} for name in trainers}
    for r in range(args.rounds + 1):  # round 0 warms up (and starts the loaders)
        names = list(trainers)[r % len(trainers):] + list(trainers)[: r % len(trainers)]
        for name in names:
            trainer, bare = trainers[name]
            trainer.schedule.last_step = trainer.state.step + args.trainer_steps
            with StopRequest() as stop:
                trainer_time = timed(lambda trainer=trainer, stop=stop: trainer._loop(stop), 1) / args.trainer_steps
            bare_time = timed(bare.step, args.trainer_steps)
            if r:
                times[name]["trainer"].append(trainer_time)
                times[name]["bare"].append(bare_time)
    rows = []
    for name, t in times.items():
        ratios = [b / tr for b, tr in zip(t["bare"], t["trainer"])]
        rows.append({
            "model": model_name, "batch": batch, "world": world, "strategy": name,
            "trainer_ms": 1000 * statistics.median(t["trainer"]), "bare_ms": 1000 * statistics.median(t["bare"]),
            "bare_over_trainer": statistics.median(ratios), "per_round": ratios,
        })
        trainers[name][0].metrics.close()
    return rows


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", TQDM_DISABLE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if any(Layout(name).deepspeed for name in args.candidates if name in STRATEGIES):
        parallel.zero._deepspeed_workarounds(on_cpu=True)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # what train_step reads: device and backward
    rows = []
    for model_name in args.models:
        for batch in args.batch_sizes:
            if args.trainer:
                rows += trainer_rows(args, model_name, batch, world, Path(out).parent)
            else:
                candidates = build_candidates(args, model_name, batch, accelerator)
                measure(candidates, args)
                rows += result_rows(candidates, model_name, batch, world, args)
            if rank == 0:
                print(f"world {world}, {model_name}, batch {batch}: done", file=sys.stderr, flush=True)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run_world(world: int, args) -> list[dict]:
    import torch.multiprocessing as mp

    from maescale.parallel import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.start_processes(worker, args=(world, port, args, out), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


HEADER = ("| model | batch | world | candidate | forward | backward | clip | optimizer | step ms | vs ref | "
          "units | train_step | hand-off |")


def table_row(r: dict) -> str:
    train = f"{r['train_step']:.2f}" if r["train_step"] is not None else "-"
    hand_off = f"{r['train_step'] - r['step']:+.2f}" if r["train_step"] is not None else "-"
    vs_reference = f"{r['vs_reference']:.2f}x {r['reference']}" if r["reference"] else "-"
    return (f"| {r['model']} | {r['batch']} | {r['world']} | {r['candidate']} | {r['forward']:.2f} | "
            f"{r['backward']:.2f} | {r['clip']:.2f} | {r['optimizer']:.2f} | {r['step']:.2f} | "
            f"{vs_reference} | {r['units'] or '-'} | {train} | {hand_off} |")


TRAINER_HEADER = "| model | batch | world | strategy | trainer ms/step | bare ms/step | bare / trainer | per round |"


def trainer_table_row(r: dict) -> str:
    rounds = ", ".join(f"{x:.3f}" for x in r["per_round"])
    return (f"| {r['model']} | {r['batch']} | {r['world']} | {r['strategy']} | {r['trainer_ms']:.2f} | "
            f"{r['bare_ms']:.2f} | {r['bare_over_trainer']:.3f} | {rounds} |")


def profile_lines(rows: list[dict]) -> list[str]:
    lines = ["", "Own CPU time per step by area (ms, cProfile; the profiler itself inflates Python areas):", ""]
    for r in rows:
        areas = ", ".join(f"{label} {ms:.2f}" for label, ms in r["profile"].items() if ms >= 0.05)
        lines.append(f"- {r['model']} b{r['batch']} w{r['world']} {r['candidate']}: {areas}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mae_vit_micro_patch4", "mae_vit_tiny_patch4"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per candidate per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate first")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: CPU time of each process (the host work, whatever else runs); wall: elapsed "
                             "time, which also shows collectives overlapping compute (an otherwise idle machine)")
    parser.add_argument("--clip", type=float, default=1.0, help="optim.clip_grad (the large-model recipes clip)")
    parser.add_argument("--profile", action="store_true", help="break each candidate's time down by area")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--trainer", action="store_true",
                        help="time the trainer's loop against the bare step instead (--trainer-strategies)")
    parser.add_argument("--trainer-strategies", nargs="+", choices=list(STRATEGIES), default=["ddp", "fsdp2"],
                        help="ddp and fsdp2 interleave; zero2 or zero3 runs alone")
    parser.add_argument("--trainer-steps", type=int, default=20, help="steps per trainer round")
    parser.add_argument("--trainer-workers", type=int, default=1, help="data.num_workers of the trainer")
    parser.add_argument("--jsonl", help="append each row as a JSON line to this file")
    args = parser.parse_args(argv)
    zero = [s for s in args.trainer_strategies if Layout(s).deepspeed]
    if args.trainer and zero and len(args.trainer_strategies) > 1:
        parser.error("--trainer-strategies: a ZeRO trainer runs alone "
                     "(Accelerate keeps one DeepSpeed state per process)")
    rows = [row for world in args.world_sizes for row in run_world(world, args)]
    header, to_row = (TRAINER_HEADER, trainer_table_row) if args.trainer else (HEADER, table_row)
    lines = [header, "|---" * (header.count("|") - 1) + "|", *map(to_row, rows)]
    if args.profile:
        lines += profile_lines(rows)
    print("\n".join(lines), flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
