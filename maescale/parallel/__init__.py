"""How processes share the model: DDP, FSDP2 (HSDP) and DeepSpeed ZeRO, behind one seam.

The `maescale.layout.Layout` of a run says what to build; this package builds it, one module
per concern:

- `processes`: launch, backend (NCCL or the gloo fallback), the Accelerator, the launch's Layout;
- `construct`: the model built from the meta device or under ZeRO-3's `zero.Init`, activation
  checkpointing, compilation, wrapping and unwrapping;
- `fsdp2`: how the model is cut into FSDP2 units;
- `zero`: the DeepSpeed JSON and what DeepSpeed needs to run anywhere;
- `collectives`: clipping over shards, averages, agreement between processes, no_sync;
- `check`: the strategy line, checked against what runs.
"""

from .check import check_active, local_parameter_fraction
from .collectives import (
    all_finite,
    any_process,
    clip_grad_norm,
    clip_gradients,
    mean_across_processes,
    no_gradient_sync,
    shard_group,
)
from .construct import (
    build_model,
    compile_blocks,
    compiled_block_forward,
    parallelize,
    prepare,
    transformer_blocks,
    unwrap,
)
from .fsdp2 import FSDP2Options, ReduceOverOneRank, shard_fsdp2
from .processes import (
    build_accelerator,
    choose_backend,
    free_port,
    launch_layout,
    launched_processes,
    local_processes,
    placement,
    process_group_for,
    start_process_group_of_one,
)
from .zero import ZeroSettings, deepspeed_config, input_dtype, is_deepspeed, zero_bucket_elements

__all__ = [
    "FSDP2Options", "ReduceOverOneRank", "all_finite", "any_process", "build_accelerator", "build_model",
    "check_active", "choose_backend", "clip_grad_norm", "clip_gradients", "compile_blocks", "compiled_block_forward",
    "deepspeed_config", "free_port", "input_dtype", "is_deepspeed", "launch_layout", "launched_processes",
    "local_parameter_fraction", "local_processes", "mean_across_processes", "no_gradient_sync", "parallelize",
    "placement", "prepare", "process_group_for", "shard_fsdp2", "shard_group", "start_process_group_of_one",
    "transformer_blocks", "unwrap", "ZeroSettings", "zero_bucket_elements",
]
