"""DeepSpeed ZeRO-1/2/3: its JSON, written from the maescale config, and what it needs to run anywhere.

ZeRO-3 builds the model partitioned (`construct.build_model` under `deepspeed.zero.Init`);
maescale keeps torch's AdamW, feeds the micro-batches and scales the loss itself.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..layout import Layout


@dataclass(frozen=True)
class ZeroSettings:
    """What the DeepSpeed JSON needs beyond the Layout."""

    micro_batch: int = 1  # images per process per micro-batch (data.batch_size)
    clip_grad: float | None = None  # optim.clip_grad
    width: int = 1024  # the encoder's width, which sizes the buckets


def deepspeed_config(layout: Layout, settings: ZeroSettings) -> dict:
    """The DeepSpeed JSON of a zero1-3 `layout` (the optimizer stays torch AdamW, so no fused op is
    JIT-built)."""
    bucket = zero_bucket_elements(settings.width)
    return {
        "train_micro_batch_size_per_gpu": settings.micro_batch,
        # maescale feeds the micro-batches and scales the loss itself (train.accum_iter), and
        # marks the last one of a step (no_gradient_sync); DeepSpeed must not scale again.
        "gradient_accumulation_steps": 1,
        # DeepSpeed clips at 1.0 unless told otherwise; 0 disables clipping.
        "gradient_clipping": settings.clip_grad or 0.0,
        "zero_optimization": {
            "stage": layout.zero_stage,
            # Partition every parameter, small ones included, so ZeRO-3 really shards (and is testable).
            "stage3_param_persistence_threshold": 0,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
        },
        "bf16": {"enabled": layout.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def zero_bucket_elements(width: int) -> int:
    """About one transformer block of parameters (12 d^2) for a model `width` channels wide:
    DeepSpeed's default buckets of 5e8 elements make ZeRO-3 hold a 2 GB fp32 buffer per process
    even for a tiny model."""
    return 12 * width * width


def deepspeed_plugin(config: dict, on_cpu: bool):
    from accelerate import DeepSpeedPlugin

    _deepspeed_workarounds(on_cpu)
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)


def _deepspeed_workarounds(on_cpu: bool) -> None:
    """What DeepSpeed 0.19 + Accelerate 1.15 need to run anywhere, CPU included.

    - DeepSpeed's torch backend JIT-compiles a shared-memory all-reduce op at every start on
      CPU (40-100 s on a fresh machine); only its inference all-reduce uses it, not ZeRO.
    - Accelerate's plugin registers a weak reference for transformers' `from_pretrained`
      ZeRO-3 init, which imports transformers; maescale builds its models itself.
    """
    from accelerate import DeepSpeedPlugin

    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.comm.torch  # noqa: F401  (the module, reached through sys.modules below)

        # `import deepspeed.comm.torch as m` would bind the torch package, which deepspeed.comm re-exports.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def input_dtype(accelerator: Accelerator) -> torch.dtype:
    """DeepSpeed bf16 keeps the weights in bf16, so the images must be bf16 too."""
    return torch.bfloat16 if is_deepspeed(accelerator) and accelerator.mixed_precision == "bf16" else torch.float32
