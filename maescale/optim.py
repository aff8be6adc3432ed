"""AdamW with the MAE parameter groups and the per-iteration lr schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config


def effective_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over the whole job."""
    return cfg.data.batch_size * cfg.train.accum_iter * world_size


def peak_lr(cfg: Config, world_size: int) -> float:
    """lr = blr * effective_batch / 256 (the MAE convention), unless `optim.lr` is set."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.blr * effective_batch(cfg, world_size) / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and 1-D parameters (norms) get no weight decay.

    Frozen parameters (the fixed position embeddings) are left out entirely.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        fused=cfg.optim.fused or None,
    )


def lr_at(step: int, *, peak: float, min_lr: float, steps_per_epoch: int, warmup_epochs: float, epochs: int) -> float:
    """Linear warmup then half-cosine, evaluated at fractional epoch `step / steps_per_epoch`."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
