"""The MAE pretraining loop.

`pretrain(cfg)` builds everything from the config, resumes from the newest
complete checkpoint, and runs optimizer steps until `train.max_steps` or the
end of the schedule. The step itself is sync-free: the loss stays on the
device and is read (`.item()`) only on logging steps.
"""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import checkpoint, parallel
from .config import Config, ConfigError, save_resolved
from .data import Batch, Loader, build_loader, first_images
from .errors import DataError
from .evaluate.monitor import KnnMonitor
from .metrics import (
    DataWait,
    MetricsLogger,
    Throughput,
    accelerator_peak_flops,
    mae_train_flops_per_image,
    peak_memory_gib,
)
from .models import build_model
from .optim import build_optimizer, effective_batch, lr_at, peak_lr, set_lr
from .parallel import no_gradient_sync
from .sizes import size_for_config
from .viz import draw_panels, figure_display, reconstruction_panels

FIGURE_IMAGES = 8
FINAL_FIGURE = "reconstruction.png"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; no checkpoint was written after it happened."""


@dataclass
class TrainState:
    """Counters that a checkpoint must restore (the data position derives from `step`)."""

    step: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


@dataclass
class Schedule:
    """Step counts and lr derived from the config and the data size."""

    steps_per_epoch: int
    total_steps: int
    last_step: int
    peak_lr: float
    effective_batch: int

    def lr(self, step: int, cfg: Config) -> float:
        return lr_at(
            step,
            peak=self.peak_lr,
            min_lr=cfg.optim.min_lr,
            steps_per_epoch=self.steps_per_epoch,
            warmup_epochs=cfg.schedule.warmup_epochs,
            epochs=cfg.schedule.epochs,
        )


class StopRequest:
    """Turns SIGINT/SIGTERM/SIGUSR1 into a flag checked after each step, so the step finishes and
    a checkpoint is written; a second Ctrl-C interrupts at once.

    SIGTERM is what Slurm sends on preemption, cancel and time limit; SIGUSR1 is the early
    warning the Slurm scripts ask for (`--signal=B:USR1@...`) and forward to the trainer.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def model_from_config(cfg: Config):
    """The MAE the config describes; an impossible shape is the config's error, named as such."""
    try:
        return build_model(**asdict(cfg.model))
    except ValueError as error:
        raise ConfigError(f"model section: {error}") from error


def require_writable(folder: Path, rank: int) -> Path:
    """Fail before any work when the run folder cannot be written (read-only, full, not a folder)."""
    probe = folder / f".write-test-{rank}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"output_dir={str(folder)!r} is not writable: {error.strerror or error}") from error
    return folder


def build_schedule(cfg: Config, loader: Loader, world_size: int) -> Schedule:
    steps_per_epoch = loader.batches_per_epoch // cfg.train.accum_iter
    if steps_per_epoch == 0:
        raise DataError(
            f"the dataset gives {loader.batches_per_epoch} batches per process per epoch, fewer than "
            f"train.accum_iter={cfg.train.accum_iter}: lower data.batch_size or train.accum_iter"
        )
    total = steps_per_epoch * cfg.schedule.epochs
    last = total if cfg.train.max_steps is None else min(total, cfg.train.max_steps)
    return Schedule(steps_per_epoch, total, last, peak_lr(cfg, world_size), effective_batch(cfg, world_size))


def micro_batches(loader: Loader, first_step: int, steps_per_epoch: int, accum: int) -> Iterator[list[Batch]]:
    """Yield the micro-batches of each optimizer step from `first_step` on, across epochs.

    The position in the data is a pure function of the step, which is what makes a
    resumed run see exactly the batches an uninterrupted run would have seen.
    """
    epoch, step_in_epoch = divmod(first_step, steps_per_epoch)
    while True:
        batches = loader.epoch(epoch, start_batch=step_in_epoch * accum)
        for _ in range(steps_per_epoch - step_in_epoch):
            yield [next(batches) for _ in range(accum)]
        batches.close()  # the tail of an epoch shorter than `accum` is not used
        epoch, step_in_epoch = epoch + 1, 0


def prefetch_to_device(steps: Iterator[list[Batch]], device: torch.device) -> Iterator[list[Batch]]:
    """Yield each step's micro-batches with their images and seeds already on `device`.

    On a GPU the copies of step k + 1 are issued on a side stream before step k is handed
    out, so they overlap step k's compute (the loader pins host memory, which makes them
    asynchronous); elsewhere the batches pass through unchanged.
    """
    if device.type != "cuda":
        yield from steps
        return
    stream = torch.cuda.Stream(device)
    ahead = None
    try:
        for batches in steps:
            with torch.cuda.stream(stream):
                copied = [b._replace(images=b.images.to(device, non_blocking=True),
                                     seeds=b.seeds.to(device, non_blocking=True)) for b in batches]
            if ahead is not None:
                yield _ready(ahead, stream)
            ahead = copied
        if ahead is not None:
            yield _ready(ahead, stream)
    finally:
        steps.close()  # frees the loader's workers when the loop ends early


def _ready(batches: list[Batch], stream: torch.cuda.Stream) -> list[Batch]:
    """Make the compute stream wait for the side-stream copies, and keep the caching allocator
    from reusing their memory before the compute stream is done with it."""
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    for batch in batches:
        batch.images.record_stream(current)
        batch.seeds.record_stream(current)
    return batches


def train_step(
    model, optimizer, accelerator: Accelerator, batches: list[Batch], num_patches: int, clip_grad: float | None,
    skip_nonfinite: bool = False,
) -> tuple[torch.Tensor, bool]:
    """One optimizer step over `batches` (gradient accumulation); returns the mean loss on device
    and whether the weights were updated (False only when `skip_nonfinite` caught a NaN/inf).

    The masking noise comes from each sample's seed (`Batch.mask_noise`), not from a global
    RNG: masks then do not depend on the process count, the micro-batch split, a resume, or
    `train.compile` (a compiled model would draw random numbers with its own kernel).
    """
    total = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        images = batch.images.to(accelerator.device, parallel.input_dtype(accelerator), non_blocking=True)
        noise = batch.mask_noise(num_patches, accelerator.device)
        with no_gradient_sync(model, accelerator, skip=i < len(batches) - 1):
            loss, _, _ = model(images, noise=noise)
            accelerator.backward(loss / len(batches))
        total += loss.detach().float()
    if skip_nonfinite and not parallel.all_finite(total, model):
        optimizer.zero_grad(set_to_none=True)
        return total / len(batches), False
    parallel.clip_gradients(model, clip_grad, accelerator)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(batches), True


class Trainer:
    """Holds the pieces of one run; `run()` trains until done, stopped, or failed."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.layout = parallel.launch_layout(cfg.parallel, cfg.train.precision)
        self._read_model_shape()
        zero = parallel.ZeroSettings(cfg.data.batch_size, cfg.optim.clip_grad, self.embed_dim)
        self.accelerator = parallel.build_accelerator(self.layout, cfg.parallel.backend, zero)
        self.output_dir = require_writable(Path(cfg.output_dir), self.accelerator.process_index)
        self.ckpt_root = checkpoint.checkpoint_root(self.output_dir)
        acc = self.accelerator
        self.loader = self._build_loader()
        self.schedule = build_schedule(cfg, self.loader, acc.num_processes)
        self.model, self.optimizer = self._build_model_and_optimizer()
        self.state = TrainState()
        self.metrics = MetricsLogger(self.output_dir, enabled=acc.is_main_process)
        # Every process holds the figure images: a sharded model reconstructs them collectively.
        self.figure_batch = first_images(
            cfg.data, img_size=self.img_size, in_chans=cfg.model.in_chans, seed=cfg.seed, count=FIGURE_IMAGES
        )
        self.figure_display = figure_display(cfg.data, cfg.train.figure_channels, cfg.model.in_chans)
        self.skipped: set[str] = set()
        self.nonfinite_skips = 0  # updates skipped in this process's run (train.nonfinite=skip)
        self.peak_flops = accelerator_peak_flops(acc.device, cfg.train.precision)
        self.knn_monitor = KnnMonitor(cfg, acc, self.img_size, self.embed_dim) if cfg.monitor.knn_every else None

    def _read_model_shape(self) -> None:
        """The model's resolution decides the crop size; read it without allocating weights."""
        with torch.device("meta"):
            shape = model_from_config(self.cfg)
        self.img_size, self.num_patches, self.embed_dim = shape.img_size, shape.num_patches, shape.embed_dim
        self.flops_per_image = mae_train_flops_per_image(shape)

    def _build_loader(self) -> Loader:
        cfg, acc = self.cfg, self.accelerator
        return build_loader(
            cfg.data, img_size=self.img_size, in_chans=cfg.model.in_chans, seed=cfg.seed, rank=acc.process_index,
            world_size=acc.num_processes,
        )

    def _build_model_and_optimizer(self):
        cfg, acc = self.cfg, self.accelerator
        set_seed(cfg.seed)  # identical initial weights on every process
        model = parallel.build_model(lambda: model_from_config(cfg), self.layout, cfg.parallel, acc, cfg.train.compile)
        optimizer = build_optimizer(model, cfg.optim, self.schedule.peak_lr)
        model, optimizer = parallel.prepare(model, optimizer, self.layout, acc)
        self.strategy = parallel.check_active(model, self.layout, acc)
        return model, optimizer

    # ------------------------------------------------------------ run folder

    def prepare_run_folder(self) -> Path | None:
        """Create folders, write the resolved config, and pick the checkpoint to resume from."""
        acc, cfg, s = self.accelerator, self.cfg, self.schedule
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_partials(self.ckpt_root)
            derived = {
                "world_size": acc.num_processes,
                "effective_batch": s.effective_batch,
                "lr": s.peak_lr,
                "steps_per_epoch": s.steps_per_epoch,
                "total_steps": s.total_steps,
                "last_step": s.last_step,
                "img_size": size_for_config(self.img_size),
            }
            save_resolved(cfg, self.output_dir / "config.yaml", derived)
        acc.wait_for_everyone()
        return checkpoint.resolve_resume(cfg.checkpoint.resume, self.output_dir)

    def resume(self, path: Path) -> None:
        self.state.load_state_dict(checkpoint.load(self.model, self.optimizer, path, self.accelerator))
        self.metrics.truncate_after(self.state.step)
        self.print(f"resumed from {path} at step {self.state.step}")

    def save_checkpoint(self) -> Path:
        return checkpoint.save(
            self.model, self.optimizer, self.state.state_dict(), self.ckpt_root, self.state.step,
            self.cfg.checkpoint.keep_last, self.accelerator,
        )

    def save_figure(self, final: bool = False) -> Path | None:
        """All processes reconstruct (a sharded model needs them all); the main one draws."""
        model = parallel.unwrap(self.model, self.accelerator)
        panels = reconstruction_panels(
            model, self.figure_batch.to(self.accelerator.device), seed=self.cfg.seed, display=self.figure_display
        )
        if not self.accelerator.is_main_process:
            return None
        name = FINAL_FIGURE if final else f"figures/step_{self.state.step:08d}.png"
        title = f"{self.cfg.model.name}, step {self.state.step}"
        return draw_panels(panels, self.output_dir / name, title=title)

    def print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message)

    # ------------------------------------------------------------ loop

    def run(self, stop: StopRequest) -> dict:
        resume_from = self.prepare_run_folder()
        if resume_from is not None:
            self.resume(resume_from)
        else:
            self.metrics.truncate_after(0)  # a fresh start replaces rows of an earlier run
        cfg, s = self.cfg, self.schedule
        if resume_from is None and s.last_step == 0:
            # train.max_steps=0: the random baseline of exactly this model, readable like any checkpoint.
            self.print(f"train.max_steps=0: the initialisation written as {self.save_checkpoint()}")
        self.print(
            f"{cfg.model.name}: {s.last_step} steps ({s.steps_per_epoch}/epoch), effective batch "
            f"{s.effective_batch}, lr {s.peak_lr:.3g} "
            f"({'optim.lr' if cfg.optim.lr else f'blr {cfg.optim.blr:.3g} x {s.effective_batch}/256'}), "
            f"{self.strategy}"
        )
        first_step = self.state.step
        stopped_by = self._loop(stop)
        if self.state.step == first_step:
            self.print(f"nothing to do: the run is already at step {first_step} of {s.last_step}")
        trained = self.state.step > first_step
        last_ckpt = self.save_checkpoint() if trained else checkpoint.latest(self.ckpt_root)
        figure = self.save_figure(final=True) if trained and not stopped_by else None
        self.metrics.close()
        return {"step": self.state.step, "stopped_by": stopped_by, "checkpoint": last_ckpt, "figure": figure}

    def _loop(self, stop: StopRequest) -> str | None:
        cfg, s, acc = self.cfg, self.schedule, self.accelerator
        if self.state.step >= s.last_step:
            return None
        stream = prefetch_to_device(
            micro_batches(self.loader, self.state.step, s.steps_per_epoch, cfg.train.accum_iter), acc.device
        )
        window_loss = torch.zeros((), device=acc.device)
        window_steps = 0
        throughput = Throughput()
        data_wait = DataWait()  # times only the stream's next(): the loop body below is not data wait
        bar = tqdm(total=s.last_step, initial=self.state.step, disable=not acc.is_main_process, unit="step",
                   dynamic_ncols=True)
        try:
            for batches in data_wait.timed(stream):
                lr = s.lr(self.state.step, cfg)
                set_lr(self.optimizer, lr)
                loss, updated = train_step(
                    self.model, self.optimizer, acc, batches, self.num_patches, cfg.optim.clip_grad,
                    skip_nonfinite=cfg.train.nonfinite == "skip",
                )
                self.state.step += 1
                if updated:
                    window_loss += loss
                    window_steps += 1
                else:
                    self._note_nonfinite_step()
                throughput.add(sum(len(b.images) for b in batches))
                self._note_skipped(batches)
                bar.update(1)
                done = self.state.step >= s.last_step
                if (done or self.state.step % cfg.train.log_every == 0) and window_steps:
                    self._log(window_loss / window_steps, lr, throughput.rate(), data_wait.mean(), bar)
                    window_loss.zero_()
                    window_steps = 0
                if self.knn_monitor and (done or self.state.step % cfg.monitor.knn_every == 0):
                    with throughput.paused():
                        self._check_knn()
                if done:
                    return None
                if parallel.any_process(stop.requested):  # every process stops after the same step
                    self._check_finite(window_loss)
                    signal_name = stop.signal_name or "SIGTERM"  # received by another process
                    self.print(f"{signal_name} received: stopping after step {self.state.step}")
                    return signal_name
                if self.state.step % cfg.checkpoint.every_steps == 0:
                    self._check_finite(window_loss)
                    self.save_checkpoint()
                if cfg.train.figure_every and self.state.step % cfg.train.figure_every == 0:
                    self.save_figure()
        finally:
            bar.close()
            stream.close()
        return None

    def _check_knn(self) -> None:
        m = self.cfg.monitor
        result = self.knn_monitor(self.model)
        self.metrics.log({"step": self.state.step, "epoch": self.state.step / self.schedule.steps_per_epoch, **result})
        self.print(
            f"step {self.state.step}: kNN top-1 {result['knn_top1']:.2f}%  top-5 {result['knn_top5']:.2f}%  "
            f"({m.val_split}: {len(self.knn_monitor.val.eval_selection())} images, "
            f"bank: {len(self.knn_monitor.bank.eval_selection())} {m.bank_split} images, {m.pool} pool)"
        )

    def _note_skipped(self, batches: list[Batch]) -> None:
        for batch in batches:
            self.skipped.update(batch.skipped)

    def _note_nonfinite_step(self) -> None:
        """Count a skipped update (train.nonfinite=skip); too many in one run is a diverged run."""
        self.nonfinite_skips += 1
        limit = self.cfg.train.max_nonfinite_skips
        self.print(f"non-finite loss or gradients at step {self.state.step}: update skipped "
                   f"({self.nonfinite_skips} of at most {limit})")
        if self.nonfinite_skips > limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_skips} updates skipped for non-finite loss or gradients (train.max_nonfinite_skips="
                f"{limit}), the last at step {self.state.step}; nothing non-finite was saved. Last good checkpoint: "
                f"{checkpoint.latest(self.ckpt_root) or 'none'}. Lower optim.blr or enable optim.clip_grad."
            )

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        """Stop before a non-finite loss can reach a checkpoint (one host sync, only when called)."""
        if not bool(torch.isfinite(loss_sum)):
            latest = checkpoint.latest(self.ckpt_root)
            raise NonFiniteLossError(
                f"loss became {loss_sum.item()} by step {self.state.step}; the run stopped without saving. "
                f"Last good checkpoint: {latest or 'none'}. Lower optim.blr or enable optim.clip_grad."
            )

    def _log(self, mean_loss: torch.Tensor, lr: float, images_per_sec: float, data_wait: float, bar) -> None:
        acc = self.accelerator
        loss = parallel.mean_across_processes(mean_loss)
        self._check_finite(loss)
        row = {
            "step": self.state.step,
            "epoch": self.state.step / self.schedule.steps_per_epoch,
            "loss": loss.item(),
            "lr": lr,
            "images_per_sec": images_per_sec * acc.num_processes,
            "data_wait": data_wait,  # mean seconds per step blocked on batches, main process
            "skipped_images": len(self.skipped),
            "nonfinite_skips": self.nonfinite_skips,
            "peak_memory_gib": peak_memory_gib(acc.device),  # of the main process
        }
        if self.peak_flops:  # model FLOPs utilisation per device, FLOP formula in metrics.py
            row["mfu"] = images_per_sec * self.flops_per_image / self.peak_flops
        self.metrics.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{row['images_per_sec']:.0f}")


def pretrain(cfg: Config) -> dict:
    """Run (or resume) MAE pretraining as configured; returns a summary of the run.

    Stop signals are caught from the start, so one that arrives while the model is being
    built or a checkpoint loaded stops the run after its first step instead of killing it.
    """
    layout = parallel.launch_layout(cfg.parallel, cfg.train.precision)
    with StopRequest() as stop, parallel.process_group_for(layout, cfg.parallel.backend):
        return Trainer(cfg).run(stop)
