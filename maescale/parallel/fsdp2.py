"""FSDP2: how the model is cut into units and sharded over the Layout's mesh.

Encoder blocks go in groups of `parallel.blocks_per_unit`, the decoder blocks as one unit, then
the root (so the embeddings, tokens and norms outside the blocks form one last group); each unit
reduces its gradients in place when its shard group is one process (`ReduceOverOneRank`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import StrategyError
from ..layout import Layout


@dataclass(frozen=True)
class FSDP2Options:
    """How `shard_fsdp2` cuts the model (docs/PARALLEL.md; measured in docs/BENCHMARKS.md)."""

    precision: str = "fp32"
    cpu_offload: bool = False
    # Encoder blocks: free the gathered weights after forward (least memory) or keep them for
    # backward (one all-gather per step instead of two; the gathered bf16 weights of a 1B model
    # are 2 GB). The decoder (the paper's 8 x 512 is ~8% of ViT-L) always keeps them: its
    # backward runs first, right after its forward.
    reshard_after_forward: bool = False
    # Encoder blocks per FSDP unit. Each unit costs host time every step (FSDP2's hooks and
    # bookkeeping, ~1 ms on a CPU core, about the same for any block size), so fewer, larger
    # units hide behind shorter GPU steps; the price is the memory of that many gathered blocks.
    blocks_per_unit: int = 4

    @classmethod
    def of(cls, layout: Layout, parallel) -> FSDP2Options:
        """The options of `layout` and the config's `parallel` section."""
        return cls(layout.precision, layout.cpu_offload, parallel.reshard_after_forward, parallel.blocks_per_unit)


def shard_fsdp2(model: nn.Module, mesh, options: FSDP2Options = FSDP2Options()) -> None:
    """fully_shard groups of `blocks_per_unit` encoder blocks, the decoder blocks (an MAE's) as one
    unit, then the root (in place). A ViT classifier (fine-tuning) has encoder blocks only."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy()
    if options.precision == "bf16":
        # bf16 compute and all-gathers, fp32 gradient reduction and master weights.
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Offload keeps the sharded fp32 weights, gradients and optimizer state in host memory and
    # runs the optimizer step there; pinned memory makes the copies asynchronous on GPUs.
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if options.cpu_offload else OffloadPolicy()
    common = dict(mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    blocks, size = list(model.blocks), options.blocks_per_unit
    encoder = [blocks[start:start + size] for start in range(0, len(blocks), size)]
    for unit in encoder:
        fully_shard(unit, reshard_after_forward=options.reshard_after_forward, **common)
    decoder = list(getattr(model, "decoder_blocks", []))
    if decoder:
        fully_shard(decoder, reshard_after_forward=False, **common)
    fully_shard(model, reshard_after_forward=options.reshard_after_forward, **common)
    # set_custom_reduce_scatter: torch >= 2.9; older FSDP2 keeps its copy.
    if shard_size(mesh) == 1 and hasattr(model, "set_custom_reduce_scatter"):
        for module in [*(unit[0] for unit in encoder), *decoder[:1], model]:
            module.set_custom_reduce_scatter(ReduceOverOneRank())


def shard_size(mesh) -> int:
    return mesh["shard"].size() if mesh.ndim == 2 else mesh.size()


class ReduceOverOneRank:
    """FSDP2's gradient reduce-scatter for a shard group of one, without its copy (FSDP2's
    `ReduceScatter` comm interface: `allocate` and the call).

    Over one rank the reduce-scatter's output is its input, yet FSDP2 allocates both and copies
    every gradient from one into the other, every step (tiny model on CPU: 2.7 ms per unit of 4
    blocks, docs/ARCHIVE.md). FSDP2 allocates a reduction's input and then its output of the
    same size: handing the input's buffer out again as the output turns that copy into a copy
    of a tensor onto itself, which returns at once, and saves the second buffer.
    """

    def __init__(self) -> None:
        self._input: torch.Tensor | None = None

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self._input is None:
            self._input = torch.empty(*size, dtype=dtype, device=device)
            return self._input
        output, self._input = self._input, None
        if output.shape != torch.Size(size) or output.dtype != dtype:
            raise StrategyError(f"ReduceOverOneRank: FSDP2 asked for a reduce output of {tuple(size)} {dtype} "
                                f"after an input of {tuple(output.shape)} {output.dtype}: not a group of one")
        return output

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        if group.size() != 1:
            raise StrategyError(f"ReduceOverOneRank reduces over one rank, not {group.size()}")
        return None  # the sum over one rank is the input, which the output already is
