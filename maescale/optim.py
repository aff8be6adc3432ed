"""AdamW with the MAE parameter groups and the per-iteration lr schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.adam import adam

from .config import Config, OptimConfig
from .shards import full_shape, local_tensor


def effective_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over the whole job."""
    return cfg.data.batch_size * cfg.train.accum_iter * world_size


def scaled_lr(blr: float, batch: int, lr: float | None = None) -> float:
    """lr = blr * batch / 256 (the MAE rule, for pretraining, probing and fine-tuning alike);
    `lr`, when set, overrides it."""
    return lr if lr is not None else blr * batch / 256


def peak_lr(cfg: Config, world_size: int) -> float:
    """The pretraining lr for the effective batch, unless `optim.lr` is set."""
    return scaled_lr(cfg.optim.blr, effective_batch(cfg, world_size), cfg.optim.lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and 1-D parameters (norms) get no weight decay.

    Frozen parameters (the fixed position embeddings) are left out entirely. The shape is the
    whole parameter's: a ZeRO-3 parameter built under `deepspeed.zero.Init` is an empty 1-D
    placeholder.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if len(full_shape(param)) <= 1 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over the MAE parameter groups, as the config's `optim` section says."""
    return LocalShardAdamW(
        param_groups(model, optim.weight_decay),
        lr=lr,
        betas=(optim.beta1, optim.beta2),
        fused=optim.fused or None,
    )


class LocalShardAdamW(torch.optim.AdamW):
    """AdamW that updates the local tensors of sharded (DTensor) parameters directly.

    AdamW is elementwise, so stepping each process's shard with its shard of the gradient and
    of the moments is the whole update. torch's AdamW on DTensors pays a DTensor dispatch for
    every tensor of every kernel, per step; here the fused (or foreach) kernel gets plain
    tensors. The state stays DTensors, so sharded checkpoints and resharded resumes are
    unchanged; plain (unsharded) parameters step exactly as with torch's AdamW.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            tensors: tuple[list, ...] = ([], [], [], [], [], [])
            has_complex = self._init_group(group, *tensors)
            local = ([local_tensor(t) for t in ts] for ts in tensors)
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = local
            beta1, beta2 = group["betas"]
            adam(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
                fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None), has_complex=has_complex, decoupled_weight_decay=True,
                amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            )
        return loss


def lr_at(step: int, *, peak: float, min_lr: float, steps_per_epoch: int, warmup_epochs: float, epochs: int) -> float:
    """Linear warmup then half-cosine, evaluated at fractional epoch `step / steps_per_epoch`."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, times its `lr_scale` where one is set (fine-tuning's layer decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
