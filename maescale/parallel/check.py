"""The strategy line: what runs, checked against the Layout that was asked for.

`check_active` fails loudly when the requested layout is not the one running (an accelerate
launch config that asks for its own FSDP or DeepSpeed, a missing DDP wrapper, parameters
sharded or not as the layout says), and otherwise returns the line the trainer prints.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import StrategyError
from ..layout import Layout
from ..shards import local_fraction
from .processes import accelerator_placement, launched_processes
from .zero import is_deepspeed


def check_active(model: nn.Module, layout: Layout, accelerator: Accelerator) -> str:
    """A one-line description of what runs; raise if it is not `layout`."""
    world = accelerator.num_processes
    if world != layout.world_size:
        raise StrategyError(f"{layout.describe()} was planned for {layout.world_size} process(es), "
                            f"but Accelerate runs {world}")
    if layout.deepspeed:
        _check_deepspeed(model, layout, accelerator)
    elif accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise StrategyError(
            f"the accelerate launch config asks for {accelerator.distributed_type.value} but maescale shards "
            f"the model itself: use configs/accelerate/multi_gpu.yaml or cpu.yaml and set parallel.strategy instead"
        )
    elif layout.strategy in ("fsdp2", "hsdp"):
        _check_fsdp2(model, layout)
    elif world > 1 and not isinstance(model, nn.parallel.DistributedDataParallel):
        raise StrategyError(f"parallel.strategy={layout.strategy} on {world} processes but the model is not "
                            "DDP-wrapped")
    held = 100 * local_parameter_fraction(model)
    return (f"{layout.describe()} on {world} process(es) ({accelerator_placement(accelerator)}), {held:.1f}% of the "
            f"parameters held here")


def _check_fsdp2(model: nn.Module, layout: Layout) -> None:
    params = list(model.parameters())
    sharded = sum(isinstance(p, DTensor) for p in params)
    expected = len(params) if layout.fsdp2_units else 0
    if sharded != expected:
        raise StrategyError(f"parallel.strategy={layout.strategy} on {layout.world_size} process(es): {sharded} of "
                            f"{len(params)} parameters are sharded, expected {expected}")


def _check_deepspeed(model: nn.Module, layout: Layout, accelerator: Accelerator) -> None:
    if not is_deepspeed(accelerator) or model.zero_optimization_stage() != layout.zero_stage:
        raise StrategyError(
            f"parallel.strategy={layout.strategy} on {launched_processes()} process(es) requested, but "
            f"Accelerate runs {accelerator.distributed_type.value} on {accelerator.num_processes}"
        )


def local_parameter_fraction(model: nn.Module) -> float:
    """Share of the model's parameter elements stored by this process (1.0 unless sharded)."""
    return local_fraction(list(model.parameters()))
