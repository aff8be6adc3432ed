"""The one seam between the ways processes share the model: DDP, FSDP2 and DeepSpeed.

`build_accelerator` starts the process group with the backend the node allows
(`choose_backend`: NCCL when every local process has a GPU of its own, otherwise gloo with
the processes computing on the CPU, so the same code runs in tests without a GPU and on a
one-GPU machine); `build_model` constructs the model so that no process of a sharded run
holds it whole (FSDP2 from the meta device, ZeRO-3 under `deepspeed.zero.Init`); FSDP2 over one
process shards nothing, so there the model trains whole (`shards_with_fsdp2`);
`parallelize` applies, in this order, activation checkpointing,
compilation (per block under FSDP2), FSDP2 sharding of the encoder blocks in groups, of the
decoder blocks as one unit, and then of the root (so the embeddings, tokens and norms outside
the blocks form one last group), each unit reducing its gradients in place when its shard group
is one process (`ReduceOverOneRank`);
`prepare` wraps the model and optimizer for the chosen strategy; `clip_gradients` clips
with one norm over the local shards and one all-reduce; `check_active` fails loudly when
the requested strategy is not the one running.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch import nn
from torch.distributed.tensor import DTensor

from .config import Config
from .errors import StrategyError
from .shards import local_fraction, local_tensor

# A rank that dies leaves the others blocked in a collective; they give up after this.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def build_accelerator(cfg: Config) -> Accelerator:
    # Accelerate keeps its settings in a process-wide singleton that refuses a second
    # Accelerator with another precision; each run (tests, notebooks) starts from its own
    # settings. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    backend = choose_backend(cfg.parallel.backend, torch.cuda.device_count(), local_processes())
    on_cpu = backend == "gloo"
    handlers = []
    if launched_processes() > 1:  # naming a backend makes Accelerate start a process group
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=COLLECTIVE_TIMEOUT))
    if cfg.parallel.strategy == "deepspeed":
        if on_cpu and torch.cuda.is_available():  # Accelerate drops the DeepSpeed plugin when told cpu=True
            raise StrategyError(
                f"parallel.strategy=deepspeed cannot take the gloo fallback on a node with GPUs ({local_processes()} "
                f"processes, {torch.cuda.device_count()} GPU(s)): launch one process per GPU, or use ddp or fsdp2"
            )
        _single_process_rendezvous()
        # bf16 is in the DeepSpeed config; Accelerate reads the precision from the plugin.
        return Accelerator(deepspeed_plugin=deepspeed_plugin(cfg, on_cpu), kwargs_handlers=handlers)
    # FSDP2 casts parameters itself (MixedPrecisionPolicy); autocast is for a model held whole.
    autocast_bf16 = cfg.train.precision == "bf16" and not shards_with_fsdp2(cfg.parallel, launched_processes())
    # On the CPU, Accelerate only treats a launch as distributed (MULTI_CPU) when told cpu=True.
    return Accelerator(cpu=on_cpu, mixed_precision="bf16" if autocast_bf16 else "no", kwargs_handlers=handlers)


def shards_with_fsdp2(settings, processes: int) -> bool:
    """Whether the model is cut into FSDP2 units: under parallel.strategy=fsdp2 on several processes,
    or on one with CPU offload (FSDP2 then keeps the weights in host memory). `settings`: anything
    with the `strategy` and `cpu_offload` of `cfg.parallel` (also `maescale plan`'s arguments).

    Over one process there is nothing to shard, yet FSDP2 still copies every weight into its
    gathered buffers and every gradient into its reduce buffer, and runs its hooks, every step:
    1.25-1.9x the plain step on CPU (docs/BENCHMARKS.md). There the model trains whole, built from
    the meta device like a sharded one, with bf16 under autocast, and writes the same
    torch.distributed.checkpoint files, which resume sharded on any number of processes.
    """
    return settings.strategy == "fsdp2" and (processes > 1 or settings.cpu_offload)


def choose_backend(requested: str, gpus: int, processes_on_node: int) -> str:
    """The process-group backend for `processes_on_node` processes on a node with `gpus` GPUs.

    NCCL refuses two ranks on one GPU, and Accelerate puts local rank r on GPU r % gpus; so
    "auto" takes NCCL only when every local process has a GPU of its own, and otherwise the
    gloo fallback, where the processes compute on the CPU (e.g. 2-process tests on one GPU).
    """
    enough_gpus = gpus >= processes_on_node and gpus > 0
    if requested == "auto":
        return "nccl" if enough_gpus else "gloo"
    if requested == "nccl" and not enough_gpus:
        raise StrategyError(
            f"parallel.backend=nccl needs a GPU per process: {processes_on_node} process(es) on this node, "
            f"{gpus} GPU(s); use parallel.backend=auto or gloo, or launch at most {gpus} process(es) per node"
        )
    if requested not in ("nccl", "gloo"):
        raise StrategyError(f"parallel.backend={requested!r}: expected auto, nccl or gloo")
    return requested


def local_processes() -> int:
    """Processes the launcher started on this node (torchrun and accelerate launch set it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", launched_processes()))


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed JSON, written from the maescale config (the optimizer stays torch AdamW,
    so no fused op is JIT-built)."""
    bucket = zero_bucket_elements(cfg.model.name)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        # maescale feeds the micro-batches and scales the loss itself (train.accum_iter), and
        # marks the last one of a step (no_gradient_sync); DeepSpeed must not scale again.
        "gradient_accumulation_steps": 1,
        # DeepSpeed clips at 1.0 unless told otherwise; 0 disables clipping.
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            # Partition every parameter, small ones included, so ZeRO-3 really shards (and is testable).
            "stage3_param_persistence_threshold": 0,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
        },
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def zero_bucket_elements(model_name: str) -> int:
    """About one transformer block of parameters (12 d^2): DeepSpeed's default buckets of 5e8
    elements make ZeRO-3 hold a 2 GB fp32 buffer per process even for a tiny model."""
    from .models import MODEL_SPECS

    width = MODEL_SPECS[model_name]["embed_dim"] if model_name in MODEL_SPECS else 1024
    return 12 * width * width


def deepspeed_plugin(cfg: Config, on_cpu: bool):
    from accelerate import DeepSpeedPlugin

    _deepspeed_workarounds(on_cpu)
    return DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg), zero3_init_flag=False)


def _deepspeed_workarounds(on_cpu: bool) -> None:
    """What DeepSpeed 0.19 + Accelerate 1.15 need to run anywhere, CPU included.

    - DeepSpeed's torch backend JIT-compiles a shared-memory all-reduce op at every start on
      CPU (40-100 s on a fresh machine); only its inference all-reduce uses it, not ZeRO.
    - Accelerate's plugin registers a weak reference for transformers' `from_pretrained`
      ZeRO-3 init, which imports transformers; maescale builds its models itself.
    """
    import sys

    from accelerate import DeepSpeedPlugin

    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.comm.torch  # noqa: F401  (the module, reached through sys.modules below)

        # `import deepspeed.comm.torch as m` would bind the torch package, which deepspeed.comm re-exports.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_rendezvous() -> None:
    """Without a launcher, DeepSpeed looks for MPI to find its peers; describe a group of one."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def start_process_group_of_one(device: torch.device) -> None:
    """A process group of this process alone (FSDP2 needs one even then), unless one exists.
    Its store lives in this process: no port, no environment variables that a later
    Accelerator would read as a launch."""
    if dist.is_initialized():
        return
    on_gpu = device.type == "cuda"
    dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if on_gpu else None)


@contextmanager
def process_group_for(cfg: Config):
    """FSDP2 shards over a process group, also of one process (CPU offload); Accelerate starts none
    for a single process (no launcher, or a launcher asked for one), so the run gets one of its own,
    ended with it."""
    if not shards_with_fsdp2(cfg.parallel, 1) or launched_processes() > 1 or dist.is_initialized():
        yield
        return
    on_gpu = choose_backend(cfg.parallel.backend, torch.cuda.device_count(), 1) == "nccl"
    start_process_group_of_one(torch.device("cuda", 0) if on_gpu else torch.device("cpu"))
    try:
        yield
    finally:
        dist.destroy_process_group()


def launched_processes() -> int:
    """Processes started by the launcher (accelerate launch, torchrun, srun + accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_model(build: Callable[[], nn.Module], cfg: Config, accelerator: Accelerator) -> nn.Module:
    """The model `build` makes, constructed the way the strategy needs and parallelized.

    No process of a sharded run ever holds the whole model: FSDP2 builds it on the meta device,
    shards it, and materialises and fills only the local shards; DeepSpeed ZeRO-3 partitions
    every module's parameters as soon as the module exists (`deepspeed.zero.Init`). The weights
    equal a single-process build's, whatever the sharding (see `init_weights`). DDP and ZeRO-1/2
    hold the whole model in every process anyway and build it directly; so does FSDP2 over one
    process, but from the meta device straight onto the device.
    """
    if cfg.parallel.strategy == "fsdp2":
        with torch.device("meta"):
            model = parallelize(build(), cfg, accelerator)
        # CPU offload keeps the shards in host memory; FSDP2 moves them to the device per step.
        model.to_empty(device="cpu" if cfg.parallel.cpu_offload else accelerator.device)
        model.init_weights()
        return model
    if cfg.parallel.strategy == "deepspeed" and cfg.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg)):
            model = build()  # each module partitioned as soon as it exists
        fill_zero3_partitions(model)
        return parallelize(model, cfg, accelerator)
    return parallelize(build(), cfg, accelerator)


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


def parallelize(model: nn.Module, cfg: Config, accelerator: Accelerator) -> nn.Module:
    """Activation checkpointing -> compile -> FSDP2 on the blocks -> FSDP2 on the root (in place)."""
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    if cfg.parallel.strategy == "fsdp2":
        require_divides(accelerator.num_processes, cfg.parallel.replicate_degree)
    sharded = shards_with_fsdp2(cfg.parallel, accelerator.num_processes)
    if cfg.train.compile and sharded:
        compile_blocks(model)  # each block on its own, so FSDP2's hooks stay outside the graphs
    elif cfg.train.compile:
        model.compile()  # in place: state-dict keys stay free of `_orig_mod`
    if sharded:
        mesh = device_mesh(accelerator.num_processes, accelerator.device.type, cfg.parallel.replicate_degree)
        shard_fsdp2(model, mesh, fsdp2_options(cfg))
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
    took up to 1.24x the static one (tiny model on CPU, docs/BENCHMARKS.md). A run's shapes
    are fixed, so each gets its own graph.
    """
    return torch.compile(type(block).forward.__get__(block), dynamic=dynamic)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.blocks, *model.decoder_blocks]


@dataclass(frozen=True)
class FSDP2Options:
    """How `shard_fsdp2` cuts the model; the defaults are maescale's measured choices
    (docs/BENCHMARKS.md, "FSDP2 host overhead")."""

    precision: str = "fp32"
    cpu_offload: bool = False
    # Encoder blocks: free the gathered weights after forward (ZeRO-3 style) or keep them for
    # backward (one all-gather per step instead of two; the gathered bf16 weights of a 1B model
    # are 2 GB).
    reshard_after_forward: bool = False
    # The decoder is small (the paper's 8 x 512 is ~8% of ViT-L) and its backward runs first:
    # keeping its weights gathered from forward to backward saves an all-gather per block.
    reshard_decoder: bool = False
    # Encoder blocks per FSDP unit. Each unit costs host time every step (FSDP2's hooks and
    # bookkeeping, ~1 ms on a CPU core, about the same for any block size), so fewer, larger
    # units hide behind shorter GPU steps; the price is the memory of that many gathered blocks.
    blocks_per_unit: int = 4
    # One FSDP unit for all decoder blocks: a small decoder block is not worth a unit of its own.
    decoder_as_one_unit: bool = True
    # Each unit's pre-forward issues the next unit's all-gather (FSDP2's explicit prefetch)
    # instead of the next unit's own pre-forward doing it. Off: no faster on gloo, where the
    # all-gather then only runs earlier, not alongside compute (docs/BENCHMARKS.md).
    forward_prefetch: bool = False
    # Over a shard group of one (one process, or HSDP with one process per shard group), let
    # FSDP2's gradient reduction write its output into its input buffer: `ReduceOverOneRank`.
    reduce_in_place: bool = True


def fsdp2_options(cfg: Config) -> FSDP2Options:
    return FSDP2Options(
        precision=cfg.train.precision,
        cpu_offload=cfg.parallel.cpu_offload,
        reshard_after_forward=cfg.parallel.reshard_after_forward,
        blocks_per_unit=cfg.parallel.blocks_per_unit,
        forward_prefetch=cfg.parallel.forward_prefetch,
    )


def shard_fsdp2(model: nn.Module, mesh, options: FSDP2Options = FSDP2Options()) -> None:
    """fully_shard groups of `blocks_per_unit` encoder blocks, the decoder blocks, then the root
    (in place)."""
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
    decoder = [list(model.decoder_blocks)] if options.decoder_as_one_unit else [[b] for b in model.decoder_blocks]
    for unit in decoder:
        fully_shard(unit, reshard_after_forward=options.reshard_decoder, **common)
    fully_shard(model, reshard_after_forward=options.reshard_after_forward, **common)
    units = [unit[0] for unit in encoder + decoder]
    if options.forward_prefetch:
        prefetch_in_forward(model, units)
    # set_custom_reduce_scatter: torch >= 2.9; older FSDP2 keeps its copy.
    if options.reduce_in_place and shard_size(mesh) == 1 and hasattr(model, "set_custom_reduce_scatter"):
        for module in [*units, model]:
            module.set_custom_reduce_scatter(ReduceOverOneRank())


def shard_size(mesh) -> int:
    return mesh["shard"].size() if mesh.ndim == 2 else mesh.size()


class ReduceOverOneRank:
    """FSDP2's gradient reduce-scatter for a shard group of one, without its copy (FSDP2's
    `ReduceScatter` comm interface: `allocate` and the call).

    Over one rank the reduce-scatter's output is its input, yet FSDP2 allocates both and copies
    every gradient from one into the other, every step (tiny model on CPU: 2.7 ms per unit of 4
    blocks, docs/BENCHMARKS.md). FSDP2 allocates a reduction's input and then its output of the
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


def prefetch_in_forward(root: nn.Module, units: list[nn.Module]) -> None:
    """Chain FSDP2's explicit forward prefetch: the root's pre-forward gathers the first unit,
    each unit's the next (`units`: one module of each unit, in the order forward runs them)."""
    for module, following in zip([root, *units], units):
        module.set_modules_to_forward_prefetch([following])


def device_mesh(world: int, device_type: str, replicate: int = 1):
    """1-D mesh (FSDP) or, with `replicate` > 1, a (replicate, shard) mesh (HSDP: shard inside a
    group such as a node, all-reduce gradients across groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise StrategyError("parallel.strategy=fsdp2 needs a process group: launch with accelerate launch or torchrun")
    require_divides(world, replicate)
    if replicate == 1:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def require_divides(world: int, replicate: int) -> None:
    if world % replicate:
        raise StrategyError(f"parallel.replicate_degree={replicate} does not divide the {world} processes")


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, accelerator: Accelerator):
    """Wrap for the strategy: DDP, DeepSpeed and a whole model (bf16 autocast) through Accelerate;
    an FSDP2 model is already sharded."""
    if not shards_with_fsdp2(cfg.parallel, accelerator.num_processes):
        return accelerator.prepare(model, optimizer)
    return model, optimizer


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def clip_gradients(model: nn.Module, max_norm: float | None, accelerator: Accelerator) -> None:
    """Clip the global gradient norm (DeepSpeed clips inside its step, from its config)."""
    if max_norm is not None and not is_deepspeed(accelerator):
        clip_grad_norm(model.parameters(), max_norm)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for plain and FSDP2-sharded gradients alike, with one
    foreach norm over the local (shard) tensors and one all-reduce of the squared sum.

    DTensor gradients would pay a DTensor dispatch per tensor for the norms and the scaling,
    and a collective to make the total norm whole (measured in docs/BENCHMARKS.md).
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


def input_dtype(accelerator: Accelerator) -> torch.dtype:
    """DeepSpeed bf16 keeps the weights in bf16, so the images must be bf16 too."""
    return torch.bfloat16 if is_deepspeed(accelerator) and accelerator.mixed_precision == "bf16" else torch.float32


def check_active(model: nn.Module, cfg: Config, accelerator: Accelerator) -> str:
    """Return a one-line description of what runs; raise if it is not what was asked for."""
    strategy = cfg.parallel.strategy
    world = accelerator.num_processes
    if strategy == "deepspeed":
        return _check_deepspeed(model, cfg, accelerator)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise StrategyError(
            f"the accelerate launch config asks for {accelerator.distributed_type.value} but maescale shards "
            f"the model itself: use configs/accelerate/*.yaml and set parallel.strategy instead"
        )
    whole = ""
    if strategy == "fsdp2":
        params = list(model.parameters())
        sharded = sum(isinstance(p, DTensor) for p in params)
        expected = len(params) if shards_with_fsdp2(cfg.parallel, world) else 0
        if sharded != expected:
            raise StrategyError(f"parallel.strategy=fsdp2 on {world} process(es): {sharded} of "
                                f"{len(params)} parameters are sharded, expected {expected}")
        if not expected:
            whole = " (nothing to shard over one process: the model trains whole, without FSDP2 units)"
    elif strategy == "ddp" and world > 1 and not isinstance(model, nn.parallel.DistributedDataParallel):
        raise StrategyError(f"parallel.strategy=ddp on {world} processes but the model is not DDP-wrapped")
    held = 100 * local_parameter_fraction(model)
    return (f"{strategy} on {world} process(es) ({_placement(accelerator)}), {held:.1f}% of the parameters held "
            f"here{whole}")


def _check_deepspeed(model: nn.Module, cfg: Config, accelerator: Accelerator) -> str:
    stage, world = cfg.parallel.zero_stage, accelerator.num_processes
    if not is_deepspeed(accelerator) or world != launched_processes() or model.zero_optimization_stage() != stage:
        raise StrategyError(
            f"parallel.strategy=deepspeed (ZeRO-{stage}) on {launched_processes()} process(es) requested, but "
            f"Accelerate runs {accelerator.distributed_type.value} on {world}"
        )
    return (
        f"deepspeed on {world} process(es) ({_placement(accelerator)}), ZeRO-{stage}, "
        f"{100 * local_parameter_fraction(model):.1f}% of the parameters held here"
    )


def local_parameter_fraction(model: nn.Module) -> float:
    """Share of the model's parameter elements stored by this process (1.0 unless sharded)."""
    return local_fraction(list(model.parameters()))


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


def backend_name() -> str:
    return dist.get_backend() if dist.is_initialized() else "no process group"


def placement(device_type: str, backend: str, gpus: int, processes: int) -> str:
    """Device and backend for the strategy line, saying why when the node's GPUs are left unused."""
    line = f"{device_type}, {backend}"
    if device_type == "cpu" and gpus:
        plural = "GPU" if gpus == 1 else "GPUs"
        shared = f"{processes} processes, {gpus} {plural} on this node"
        reason = "parallel.backend=gloo" if gpus >= processes else shared
        line += f" fallback: {reason}"
    return line


def _placement(accelerator: Accelerator) -> str:
    return placement(accelerator.device.type, backend_name(), torch.cuda.device_count(), local_processes())


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


def unwrap(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """The MAE module itself (FSDP2 shards in place, so only DDP needs unwrapping)."""
    return accelerator.unwrap_model(model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
