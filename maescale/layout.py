"""The process layout of a run: one description, read by every tool.

A `Layout` holds how many processes train, how they share the model and in what precision:
the data-parallel degrees (replicate x shard), the ZeRO stage, CPU offload and precision. It is
built once, from the config's `parallel` section, `train.precision` and the process count
(`Layout.from_config`), checks itself when built, names itself in the strategy line and builds
the device mesh. The trainer, the evaluation commands, `maescale plan`, `maescale bench`, the
Slurm sweep and the benchmarks all read it; the names in `STRATEGIES` are the only spelling of
a strategy anywhere. Kept free of heavy imports: the config module reads the names from here.

A tensor-parallel degree would be one more field and one more mesh dimension (`mesh_shape`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import ConfigError

# Every strategy, with what it does (the help of parallel.strategy and of the sweep's axis).
STRATEGIES = {
    "ddp": "every process holds the whole model; gradients are all-reduced (DDP)",
    "fsdp2": "FSDP2 shards weights, gradients and optimizer state over all processes",
    "hsdp": "FSDP2 shards within groups of processes and replicates across parallel.replicate_degree groups "
            "(default: the nodes)",
    "zero1": "DeepSpeed ZeRO-1: optimizer state partitioned over all processes",
    "zero2": "DeepSpeed ZeRO-2: optimizer state and gradients partitioned",
    "zero3": "DeepSpeed ZeRO-3: optimizer state, gradients and parameters partitioned",
}
PRECISIONS = ("fp32", "bf16")
FSDP2_STRATEGIES = ("fsdp2", "hsdp")

log = logging.getLogger(__name__)


def zero_stage_of(strategy: str) -> int:
    """DeepSpeed's ZeRO stage of a strategy name, 0 for the strategies DeepSpeed does not run."""
    return int(strategy[-1]) if strategy.startswith("zero") else 0


def check_strategy_settings(strategy: str, replicate_degree: int | None, cpu_offload: bool) -> None:
    """The checks that need no process count: the config's validation and every Layout run them."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"parallel.strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if replicate_degree is not None and replicate_degree < 1:
        raise ConfigError(f"parallel.replicate_degree must be positive or null, got {replicate_degree}")
    if strategy != "hsdp" and (replicate_degree or 1) > 1:
        raise ConfigError(f"parallel.replicate_degree={replicate_degree} replicates sharded groups: it needs "
                          f"parallel.strategy=hsdp (got {strategy})")
    if cpu_offload and strategy not in FSDP2_STRATEGIES:
        raise ConfigError(f"parallel.cpu_offload needs parallel.strategy=fsdp2 or hsdp (got {strategy})")


@dataclass(frozen=True)
class Layout:
    """How `world_size` processes share the model; checked when built."""

    strategy: str = "ddp"
    world_size: int = 1
    replicate_degree: int = 1  # hsdp: groups the model is replicated across, each sharding it
    cpu_offload: bool = False
    precision: str = "fp32"

    def __post_init__(self):
        check_strategy_settings(self.strategy, self.replicate_degree, self.cpu_offload)
        if self.world_size < 1:
            raise ConfigError(f"the process count must be at least 1, got {self.world_size}")
        if self.world_size % self.replicate_degree:
            raise ConfigError(f"parallel.replicate_degree={self.replicate_degree} does not divide the "
                              f"{self.world_size} processes")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r}: choose fp32 or bf16")

    @classmethod
    def from_config(cls, parallel, precision: str, world_size: int, nodes: int = 1) -> Layout:
        """The layout of `parallel` (the config section) on `world_size` processes over `nodes` nodes."""
        replicate = parallel.replicate_degree
        if replicate is None:
            replicate = nodes if parallel.strategy == "hsdp" else 1
        return cls(parallel.strategy, world_size, replicate, parallel.cpu_offload, precision)

    # ---------------------------------------------------------------- degrees

    @property
    def zero_stage(self) -> int:
        """DeepSpeed's ZeRO stage, 0 when DeepSpeed does not run."""
        return zero_stage_of(self.strategy)

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0

    @property
    def fsdp2_units(self) -> bool:
        """Whether the model is cut into FSDP2 units: under fsdp2/hsdp on several processes, or on one
        with CPU offload (FSDP2 then keeps the weights in host memory).

        Over one process there is nothing to shard, yet FSDP2 would still copy every weight into its
        gathered buffers and every gradient into its reduce buffer, and run its hooks, every step
        (1.25-1.9x the plain step on CPU, docs/ARCHIVE.md). There the model trains whole, built from
        the meta device like a sharded one, and writes the same checkpoint files.
        """
        return self.strategy in FSDP2_STRATEGIES and (self.world_size > 1 or self.cpu_offload)

    @property
    def shard_degree(self) -> int:
        """Processes one copy of the sharded state is spread over (1: every process holds it whole)."""
        if self.fsdp2_units:
            return self.world_size // self.replicate_degree
        return self.world_size if self.deepspeed else 1

    @property
    def whole_model(self) -> bool:
        """Every process holds the whole model and Accelerate wraps it (DDP, or nothing on one process)."""
        return not self.fsdp2_units and not self.deepspeed

    @property
    def autocast(self) -> bool:
        """bf16 by autocast: only for a whole model (FSDP2 casts its parameters, DeepSpeed the module)."""
        return self.precision == "bf16" and self.whole_model

    # ---------------------------------------------------------------- naming and mesh

    def describe(self) -> str:
        """The layout in one phrase, e.g. `hsdp: shard 8 x replicate 4, bf16` (the strategy line's head)."""
        if self.fsdp2_units:
            degrees = f"shard {self.shard_degree}"
            degrees += f" x replicate {self.replicate_degree}" if self.strategy == "hsdp" else ""
            degrees += ", CPU offload" if self.cpu_offload else ""
        elif self.deepspeed:
            degrees = f"partitioned over {self.world_size}"
        elif self.world_size > 1:
            degrees = f"replicate {self.world_size}"
        else:
            degrees = "whole model (shard degree 1)"
        precision = "bf16 autocast" if self.autocast else self.precision
        return f"{self.strategy}: {degrees}, {precision}"

    @property
    def mesh_shape(self) -> dict[str, int]:
        """The FSDP2 mesh's named dimensions, outermost first."""
        if self.strategy == "hsdp":
            return {"replicate": self.replicate_degree, "shard": self.shard_degree}
        return {"shard": self.shard_degree}

    def build_mesh(self, device_type: str):
        """The device mesh FSDP2 shards over (needs a process group)."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from .errors import StrategyError

        if not dist.is_initialized():
            raise StrategyError(f"parallel.strategy={self.strategy} needs a process group: launch with "
                                "accelerate launch or torchrun")
        dims = self.mesh_shape
        return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))


# ---------------------------------------------------------------- spellings of earlier versions


def translate_legacy_parallel(section: dict, source: str) -> dict:
    """A YAML `parallel` mapping in the spelling of earlier versions, in today's, with a notice:
    `strategy: deepspeed` + `zero_stage: N` is `strategy: zeroN`; `strategy: fsdp2` with
    `replicate_degree` > 1 is `hsdp`. (Run folders written before keep loading.)"""
    section = dict(section)
    stage = section.pop("zero_stage", None)
    strategy = section.get("strategy")
    if strategy == "deepspeed":
        section["strategy"] = f"zero{stage or 2}"
    elif strategy == "fsdp2" and (section.get("replicate_degree") or 1) > 1:
        section["strategy"] = "hsdp"
    if section.get("strategy") != strategy:
        log.info("%s: parallel.strategy=%s%s is now spelled parallel.strategy=%s", source, strategy,
                 f" with zero_stage={stage}" if strategy == "deepspeed" else "", section["strategy"])
    return section


LEGACY_OVERRIDES = {
    "parallel.strategy=deepspeed": "the ZeRO stage is part of the name: parallel.strategy=zero1, zero2 or zero3",
    "parallel.zero_stage": "the ZeRO stage is part of the name: parallel.strategy=zero1, zero2 or zero3",
    "parallel.forward_prefetch": "FSDP2's explicit forward prefetch was measured no faster and is no longer a key",
}


def legacy_override_error(key: str, value: str) -> str | None:
    """The message for an override in an earlier spelling, or None."""
    hint = LEGACY_OVERRIDES.get(f"{key}={value}") or LEGACY_OVERRIDES.get(key)
    return f"{key}={value}: {hint}" if hint else None
