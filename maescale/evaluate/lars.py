"""LARS: layer-wise adaptive rate scaling (You, Gitman and Ginsburg 2017, arXiv 1708.03888).

The variant used for MAE linear probing (He et al. 2021, appendix A.2, after MoCo v3): for a
matrix parameter p with gradient g,

    g <- g + weight_decay * p
    g <- g * trust_coefficient * ||p|| / ||g||      (1 when either norm is 0)
    buf <- momentum * buf + g
    p <- p - lr * buf

Vectors (biases, norm parameters) skip the weight decay and the trust ratio: plain SGD with
momentum.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"invalid LARS settings: lr={lr}, weight_decay={weight_decay}, momentum={momentum}, "
                f"trust_coefficient={trust_coefficient}"
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad
        if p.ndim > 1:
            grad = grad.add(p, alpha=group["weight_decay"])
            param_norm, grad_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
            ratio = group["trust_coefficient"] * param_norm / grad_norm
            usable = (param_norm > 0) & (grad_norm > 0)
            grad = grad * torch.where(usable, ratio, torch.ones_like(ratio))
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        p.add_(buf, alpha=-group["lr"])
