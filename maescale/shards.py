"""What one process stores of a parameter, whichever strategy sharded it.

FSDP2 turns a parameter into a DTensor whose local shard lives here; DeepSpeed ZeRO-3 leaves an
empty placeholder with the whole shape set aside (`ds_shape`) and its flat partition in
`ds_tensor`. The model's init, the optimizer groups, checkpoints and the strategies' checks ask
these two questions here, so none of them needs to know which strategy ran.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process stores: a DTensor's local shard, a ZeRO-3 parameter's
    partition, else the tensor itself."""
    if isinstance(tensor, DTensor):
        return tensor._local_tensor
    return getattr(tensor, "ds_tensor", tensor)


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's whole shape, also under ZeRO-3, where the tensor itself is an empty placeholder."""
    return getattr(param, "ds_shape", param.shape)


def local_fraction(params: list[torch.Tensor]) -> float:
    """Share of the elements of `params` stored by this process (1.0 unless sharded)."""
    return sum(local_tensor(p).numel() for p in params) / sum(full_shape(p).numel() for p in params)
