"""Steady-state training throughput of the bare model step (forward, backward, AdamW).

This is the yardstick the trainer is compared against: random images already on
the device, no data loading, no logging; warm-up steps (and compilation) are
excluded from the timing.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from .metrics import device_peak_flops, mae_train_flops_per_image
from .models import build_model
from .optim import param_groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    **model_overrides,
) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones; returns images/s and step time."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = build_model(model_name, **model_overrides).to(device)
    if compile:
        model.compile()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda" or None)
    img_size = model.img_size
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step() -> torch.Tensor:
        with autocast:
            loss, _, _ = model(images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - start
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    images_per_sec = batch_size * steps / elapsed
    achieved = images_per_sec * mae_train_flops_per_image(model)
    peak = device_peak_flops(device_name)
    return {
        "model": model_name,
        "device": device_name,
        "batch_size": batch_size,
        "precision": precision,
        "compile": compile,
        "steps": steps,
        "step_time_ms": 1000 * elapsed / steps,
        "images_per_sec": images_per_sec,
        "tflops": achieved / 1e12,
        "mfu": achieved / peak if peak and precision == "bf16" else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": loss.detach().item(),
    }


TABLE_HEADER = "| model | device | batch | precision | compile | images/s | ms/step | TFLOP/s | MFU | peak GiB |"
TABLE_RULE = "|---" * (TABLE_HEADER.count("|") - 1) + "|"


def table_row(r: dict) -> str:
    """One Markdown table row (columns of TABLE_HEADER) for a bench_train_step result."""
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
    return (
        f"| {r['model']} | {r['device']} | {r['batch_size']} | {r['precision']} | {'on' if r['compile'] else 'off'} | "
        f"{r['images_per_sec']:.1f} | {r['step_time_ms']:.1f} | {r['tflops']:.2f} | {mfu} | {memory} |"
    )
