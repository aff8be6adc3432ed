"""Building the model the way the Layout needs it, and wrapping it for the step.

No process of a sharded run ever holds the whole model: FSDP2 builds it on the meta device,
shards it, and materialises and fills only the local shards; DeepSpeed ZeRO-3 partitions every
module's parameters as soon as the module exists (`deepspeed.zero.Init`). The weights equal a
single-process build's, whatever the sharding (see `init_weights`). DDP and ZeRO-1/2 hold the
whole model in every process anyway and build it directly; so does FSDP2 over one process, but
from the meta device straight onto the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from ..layout import FSDP2_STRATEGIES, Layout
from .fsdp2 import FSDP2Options, shard_fsdp2


def build_model(build: Callable[[], nn.Module], layout: Layout, parallel, accelerator: Accelerator,
                compile: bool = False) -> nn.Module:
    """The model `build` makes, constructed for `layout` and parallelized (`parallel`: the config
    section; `compile`: train.compile)."""
    if layout.strategy in FSDP2_STRATEGIES:
        with torch.device("meta"):
            model = parallelize(build(), layout, parallel, accelerator, compile)
        # CPU offload keeps the shards in host memory; FSDP2 moves them to the device per step.
        model.to_empty(device="cpu" if layout.cpu_offload else accelerator.device)
        model.init_weights()
        return model
    if layout.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=accelerator.state.deepspeed_plugin.deepspeed_config):
            model = build()  # each module partitioned as soon as it exists
        fill_zero3_partitions(model)
        return parallelize(model, layout, parallel, accelerator, compile)
    return parallelize(build(), layout, parallel, accelerator, compile)


def fill_zero3_partitions(model: nn.Module) -> None:
    """Give every ZeRO-3 partition its `init_weights` value, one whole parameter at a time.

    ZeRO-3 stores rank r's part of a parameter as the r-th equal slice of the flattened tensor
    (`ds_tensor`, zero-padded at the end); each rank cuts its slice from the full initial
    value. Gathering each parameter (`GatheredParameters`) would do the same with collectives
    per parameter and, measured (ViT-B, 2 processes), 1.5-1.7x the RSS growth at construction.
    """
    rank = dist.get_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            part = param.ds_tensor
            piece = model.initial_value(name).flatten()[rank * part.numel():(rank + 1) * part.numel()]
            part.zero_()
            part[:piece.numel()].copy_(piece)


def parallelize(model: nn.Module, layout: Layout, parallel, accelerator: Accelerator,
                compile: bool = False) -> nn.Module:
    """Activation checkpointing -> compile -> FSDP2 on the blocks -> FSDP2 on the root (in place)."""
    model.activation_checkpointing = parallel.activation_checkpointing
    if compile and layout.fsdp2_units:
        compile_blocks(model)  # each block on its own, so FSDP2's hooks stay outside the graphs
    elif compile:
        model.compile()  # in place: state-dict keys stay free of `_orig_mod`
    if layout.fsdp2_units:
        shard_fsdp2(model, layout.build_mesh(accelerator.device.type), FSDP2Options.of(layout, parallel))
    return model


def compile_blocks(model: nn.Module, dynamic: bool | None = False) -> None:
    """torch.compile every transformer block's forward, leaving the module (and its keys) as is."""
    for block in transformer_blocks(model):
        block.forward = compiled_block_forward(block, dynamic)


def compiled_block_forward(block: nn.Module, dynamic: bool | None = False) -> Callable:
    """The block's forward compiled for the shapes it sees, one static graph each.

    All blocks share one code object, so dynamo's default (`dynamic=None`) turns the second
    shape it meets (decoder after encoder) into a dynamic-shape graph; under FSDP2 a guard
    failure in the second step then recompiled the blocks once more, dynamic, and that step
    took up to 1.24x the static one (tiny model on CPU, docs/ARCHIVE.md). A run's shapes
    are fixed, so each gets its own graph.
    """
    return torch.compile(type(block).forward.__get__(block), dynamic=dynamic)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.blocks, *model.decoder_blocks]


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer, layout: Layout, accelerator: Accelerator):
    """Wrap for the layout: DDP, DeepSpeed and a whole model (bf16 autocast) through Accelerate;
    FSDP2 units are already sharded."""
    if not layout.fsdp2_units:
        return accelerator.prepare(model, optimizer)
    return model, optimizer


def unwrap(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """The MAE module itself (FSDP2 shards in place, so only DDP needs unwrapping)."""
    return accelerator.unwrap_model(model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
