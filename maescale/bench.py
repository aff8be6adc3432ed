"""Steady-state training throughput of the bare model step (forward, backward, AdamW).

This is the yardstick the trainer is compared against: random images already on
the device, no data loading, no logging; warm-up steps (and compilation) are
excluded from the timing.

Variants of the step (attention kernel, torch.compile, fused AdamW, activation
checkpointing, mask tokens in the encoder) are compared by `compare_variants`, which
times them in interleaved rounds on one model, so that a machine whose load changes
during the run (a shared VM, a GPU whose clocks drift) affects every variant alike;
ratios are medians of per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from . import parallel
from .layout import Layout
from .metrics import device_peak_flops, mae_train_flops_per_image
from .models import build_model
from .optim import LocalShardAdamW, param_groups

ATTENTION_KERNELS = ("sdpa", "explicit")


@dataclass(frozen=True)
class StepVariant:
    """One way to run the training step; the defaults are maescale's own choices."""

    attention: str = "sdpa"  # "sdpa": fused scaled_dot_product_attention; "explicit": q @ k^T, softmax, @ v
    compile: bool = False  # torch.compile the whole model
    compile_blocks: bool = False  # torch.compile each transformer block (as the trainer does under FSDP2)
    fused_adamw: bool = True  # as the trainer (optim.fused); False: torch's default implementation
    activation_checkpointing: bool | str = False  # True (full) or "selective", as parallel.activation_checkpointing
    mask_tokens_in_encoder: bool = False  # the paper's "w/ [M] in encoder" baseline
    # False times forward + backward only: the per-image work, which is what large batches
    # see once the per-step AdamW cost (same for every variant) is amortised.
    optimizer_step: bool = True

    def __post_init__(self):
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class StepBench:
    """One model, its input batch and its optimizers; `step_fn(variant)` gives a training step.

    Variants share the weights: switching attention kernel, checkpointing or mask tokens
    only flips attributes, a compiled variant wraps the same module, and a fused AdamW is a
    second optimizer over the same parameters. Timing needs the work, not the trajectory,
    and sharing keeps several ViT-L variants within a CPU machine's memory.
    """

    def __init__(
        self, model_name: str, *, batch_size: int, precision: str = "fp32", device: str | None = None, seed: int = 0,
        **model_overrides,
    ):
        # One process holding the whole model: what every strategy's step is on one GPU.
        self.layout = Layout(precision=precision)
        self.device = pick_device(device)
        self.model_name, self.batch_size, self.precision = model_name, batch_size, precision
        torch.manual_seed(seed)
        # Built with the encoder's mask token so that every variant can run on it; the
        # default path never touches that parameter (its gradient stays None, AdamW skips it).
        self.model = build_model(model_name, mask_tokens_in_encoder=True, **model_overrides).to(self.device)
        self.images = torch.randn(batch_size, self.model.in_chans, *self.model.img_size, device=self.device)
        self._optimizers: dict[bool, torch.optim.Optimizer] = {}
        self._compiled: torch.nn.Module | None = None

    def optimizer(self, fused: bool) -> torch.optim.Optimizer:
        if fused not in self._optimizers:
            self._optimizers[fused] = LocalShardAdamW(
                param_groups(self.model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=fused or None
            )
        return self._optimizers[fused]

    def forward_module(self, compiled: bool) -> torch.nn.Module:
        if not compiled:
            return self.model
        if self._compiled is None:
            self._compiled = torch.compile(self.model)
        return self._compiled

    def apply(self, variant: StepVariant) -> None:
        """Set the model's runtime switches for `variant`."""
        model = self.model
        model.activation_checkpointing = variant.activation_checkpointing
        model.mask_tokens_in_encoder = variant.mask_tokens_in_encoder
        for block in parallel.transformer_blocks(model):
            block.attn.fused_attn = variant.attention == "sdpa"
            self._use_compiled_block(block, variant.compile_blocks)

    def _use_compiled_block(self, block: torch.nn.Module, compiled: bool) -> None:
        """Point the block at its compiled forward (made once, kept) or back at its class's eager one."""
        if compiled and not hasattr(block, "_compiled_forward"):
            block._compiled_forward = parallel.compiled_block_forward(block)
        vars(block).pop("forward", None)
        if compiled:
            block.forward = block._compiled_forward

    def step_fn(self, variant: StepVariant) -> Callable[[], torch.Tensor]:
        """A closure running one optimizer step of `variant` (call `apply(variant)` first)."""
        module = self.forward_module(variant.compile)
        optimizer = self.optimizer(variant.fused_adamw)
        images = self.images
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.layout.autocast else nullcontext()

        def step() -> torch.Tensor:
            with autocast:
                loss, _, _ = module(images)
            loss.backward()
            if variant.optimizer_step:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    def flops_per_image(self, variant: StepVariant, include_recompute: bool = False) -> int:
        return mae_train_flops_per_image(
            self.model, mask_tokens_in_encoder=variant.mask_tokens_in_encoder,
            # Selective checkpointing recomputes no matmul: nothing to add.
            include_recompute=include_recompute and variant.activation_checkpointing is True,
        )

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_steps(step: Callable[[], object], steps: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per step over `steps` calls, synchronising the device only at both ends.

    clock="cpu" counts this process's CPU time instead of wall time: with one torch thread
    (OMP_NUM_THREADS=1) that is the step's own compute, unaffected by other jobs taking
    turns on a shared machine (with several threads it would also count their spin-waits).
    """
    now = CLOCKS[clock]
    _sync(device)
    start = now()
    for _ in range(steps):
        step()
    _sync(device)
    return (now() - start) / steps


def interleaved_times(
    steps: dict[str, Callable[[], object]], *, rounds: int, steps_per_round: int, warmup: int,
    device: torch.device, before: Callable[[str], None] | None = None, log: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per step of each candidate in each round; candidates alternate within a round.

    `before(name)` runs before each candidate's warm-up and rounds (e.g. to set switches on a
    shared model). The order rotates every round so no candidate always follows the same one.
    `log` receives a line per round (progress of long CPU runs).
    """
    before = before or (lambda name: None)
    log = log or (lambda line: None)
    names = list(steps)
    for name in names:
        before(name)
        for _ in range(warmup):
            steps[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            before(name)
            times[name].append(time_steps(steps[name], steps_per_round, device, clock))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{name} {1000 * t[-1]:.0f} ms" for name, t in times.items()))
    return times


def paired_ratio(reference: list[float], candidate: list[float]) -> float:
    """Median over rounds of reference time / candidate time: the candidate's speedup."""
    return statistics.median(ref / cand for ref, cand in zip(reference, candidate))


def compare_variants(
    model_name: str, variants: dict[str, StepVariant], *, batch_size: int, precision: str = "fp32",
    rounds: int = 3, steps_per_round: int = 2, warmup: int = 2,
    device: str | None = None, seed: int = 0,
    others: dict[str, Callable[[torch.Tensor], Callable[[], object]]] | None = None,
    log: Callable[[str], None] | None = None, clock: str = "wall", **model_overrides,
) -> list[dict]:
    """Time `variants` of one model's step in interleaved rounds; the first is the reference.

    `others` adds steps that are not maescale's model (e.g. a straightforward implementation
    written in a benchmark): each entry builds a step closure from the input images; their
    FLOPs are counted as those of the default variant.
    """
    bench = StepBench(model_name, batch_size=batch_size, precision=precision, device=device, seed=seed,
                      **model_overrides)
    steps = {}
    for name, variant in variants.items():
        bench.apply(variant)
        steps[name] = bench.step_fn(variant)
    for name, build_step in (others or {}).items():
        steps[name] = build_step(bench.images)
    switches = {**{name: StepVariant() for name in others or {}}, **variants}
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)  # the peak then covers every variant
    times = interleaved_times(
        steps, rounds=rounds, steps_per_round=steps_per_round, warmup=warmup, device=bench.device,
        before=lambda name: bench.apply(switches[name]), log=log, clock=clock,
    )
    reference = times[next(iter(steps))]
    steps = rounds * steps_per_round
    return [
        _result_row(bench, name, switches[name], statistics.median(t), paired_ratio(reference, t), steps)
        for name, t in times.items()
    ]


def _result_row(bench: StepBench, name: str, variant: StepVariant, seconds: float, speedup: float, steps: int) -> dict:
    images_per_sec = bench.batch_size / seconds
    model_flops = images_per_sec * bench.flops_per_image(variant)
    peak = device_peak_flops(bench.device_name())
    return {
        "model": bench.model_name,
        "variant": name,
        **asdict(variant),
        "device": bench.device_name(),
        "batch_size": bench.batch_size,
        "precision": bench.precision,
        "layout": bench.layout.describe(),
        "steps": steps,
        "step_time_ms": 1000 * seconds,
        "images_per_sec": images_per_sec,
        "speedup": speedup,
        "tflops": model_flops / 1e12,
        "hardware_tflops": images_per_sec * bench.flops_per_image(variant, include_recompute=True) / 1e12,
        "mfu": model_flops / peak if peak and bench.precision == "bf16" else None,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(bench.device) / 2**30 if bench.device.type == "cuda" else None
        ),
    }


def bench_train_step(
    model_name: str,
    *,
    batch_size: int = 8,
    precision: str = "fp32",
    compile: bool = False,
    steps: int = 10,
    warmup: int = 3,
    device: str | None = None,
    seed: int = 0,
    variant: StepVariant | None = None,
    **model_overrides,
) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones; returns images/s and step time."""
    variant = variant or StepVariant()
    if compile:
        variant = replace(variant, compile=True)
    bench = StepBench(model_name, batch_size=batch_size, precision=precision, device=device, seed=seed,
                      **model_overrides)
    bench.apply(variant)
    step = bench.step_fn(variant)
    for _ in range(warmup):
        step()
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    seconds = time_steps(step, steps, bench.device)
    loss = step()
    row = _result_row(bench, "default", variant, seconds, 1.0, steps)
    row["final_loss"] = loss.detach().float().item()
    return row


TABLE_HEADER = "| model | device | batch | precision | compile | images/s | ms/step | TFLOP/s | MFU | peak GiB |"
TABLE_RULE = "|---" * (TABLE_HEADER.count("|") - 1) + "|"

COMPARE_HEADER = (
    "| model | variant | batch | precision | images/s | ms/step | speedup | TFLOP/s | MFU | peak GiB |"
)
COMPARE_RULE = "|---" * (COMPARE_HEADER.count("|") - 1) + "|"


def _mfu_and_memory(r: dict) -> tuple[str, str]:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
    return mfu, memory


def table_row(r: dict) -> str:
    """One Markdown table row (columns of TABLE_HEADER) for a bench_train_step result."""
    mfu, memory = _mfu_and_memory(r)
    return (
        f"| {r['model']} | {r['device']} | {r['batch_size']} | {r['precision']} | {'on' if r['compile'] else 'off'} | "
        f"{r['images_per_sec']:.1f} | {r['step_time_ms']:.1f} | {r['tflops']:.2f} | {mfu} | {memory} |"
    )


def compare_row(r: dict) -> str:
    """One Markdown table row (columns of COMPARE_HEADER) for a compare_variants result."""
    mfu, memory = _mfu_and_memory(r)
    return (
        f"| {r['model']} | {r['variant']} | {r['batch_size']} | {r['precision']} | "
        f"{r['images_per_sec']:.2f} | {r['step_time_ms']:.1f} | {r['speedup']:.2f}x | {r['tflops']:.3f} | "
        f"{mfu} | {memory} |"
    )
