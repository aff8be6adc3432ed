"""What the step asks of the group: clipping over shards, averages, agreement, and no_sync.

Control collectives (`any_process`, `all_finite`) run over a CPU (gloo) group so they never
wait for the GPU stream.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor

from ..shards import local_tensor
from .zero import is_deepspeed


def clip_gradients(model: nn.Module, max_norm: float | None, accelerator: Accelerator) -> None:
    """Clip the global gradient norm (DeepSpeed clips inside its step, from its config)."""
    if max_norm is not None and not is_deepspeed(accelerator):
        clip_grad_norm(model.parameters(), max_norm)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for plain and FSDP2-sharded gradients alike, with one
    foreach norm over the local (shard) tensors and one all-reduce of the squared sum.

    DTensor gradients would pay a DTensor dispatch per tensor for the norms and the scaling,
    and a collective to make the total norm whole (measured in docs/ARCHIVE.md).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    local = [local_tensor(g) for g in grads]
    squares = torch.stack(torch._foreach_norm(local)).square().sum()
    total = _sum_over_shards(squares, grads[0]).sqrt()
    torch._foreach_mul_(local, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def _sum_over_shards(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """All-reduce a per-process sum over the group `like` is sharded across (if any)."""
    group = shard_group(like)
    if group is None:
        return value
    # CPU-offloaded shards live in host memory while NCCL reduces on the GPU.
    on_mesh = value.to(like.device_mesh.device_type)
    dist.all_reduce(on_mesh, group=group)
    return on_mesh.to(value.device)


def shard_group(tensor: torch.Tensor):
    """The process group across which a DTensor is sharded (None for a whole tensor): its
    local pieces add up to the whole there; across a replicate dimension they are copies."""
    from torch.distributed.tensor import Shard

    if not isinstance(tensor, DTensor):
        return None
    dims = [i for i, placement in enumerate(tensor.placements) if isinstance(placement, Shard)]
    if not dims or tensor.device_mesh.size(dims[0]) == 1:
        return None
    return tensor.device_mesh.get_group(dims[0])


def mean_across_processes(value: torch.Tensor) -> torch.Tensor:
    """All-reduce average of a tensor (a copy; unchanged without a process group)."""
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_finite(loss: torch.Tensor, model: nn.Module) -> bool:
    """True when the loss and every local gradient (shard) are finite on every process (one host sync)."""
    local = [torch.isfinite(loss).all()]
    for p in model.parameters():
        if p.grad is not None:
            local.append(torch.isfinite(local_tensor(p.grad)).all())
    return not any_process(not bool(torch.stack(local).all()))


_control_group = None


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. a stop signal reached one).

    Runs over a CPU (gloo) group so it never waits for the GPU stream: cheap to call every step.
    """
    global _control_group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo")
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(value.item())


@contextmanager
def no_gradient_sync(model: nn.Module, accelerator: Accelerator, skip: bool):
    """Accumulate gradients locally on the micro-batches that do not end a step."""
    if not skip:
        yield
        return
    if is_deepspeed(accelerator):
        # Accelerate then tells the engine this is not an accumulation boundary and skips its step.
        accelerator.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    with accelerator.no_sync(model) if isinstance(model, nn.parallel.DistributedDataParallel) else nullcontext():
        yield
