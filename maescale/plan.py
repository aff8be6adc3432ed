"""Per-GPU memory and step time of MAE pretraining, predicted before a job starts (`maescale plan`).

Shapes come from the model registry and parameters are counted exactly on a model built on the
meta device. Memory is simulated through one training step, tensor group by tensor group, so the
peak is the largest total at any moment rather than the sum of every part:

* state: weights, gradients, AdamW moments and, where the strategy keeps one, an fp32 master
  copy, each in its dtype and divided by the group it is sharded over;
* activations saved for backward, per transformer block from what autograd saves in timm's
  Block (see `block_saved_bytes_per_token`), at the encoder's 1 + L(1 - r) visible tokens and
  the decoder's 1 + L tokens, plus the patch embedding, masking, bridge and loss around them;
* temporaries: bf16 weight copies of autocast, FSDP2 all-gather / reduce-scatter buffers
  (units of `blocks_per_unit` encoder blocks, the decoder as one unit, the rest as the root),
  ZeRO buckets and gathered ZeRO-3 parameters, and the largest block's backward workspace.

The activation formulas are exact for the CPU kernels (the tests compare them byte for byte
with an exact live-storage count on small models, tests/storage_tracker.py); the whole model
reproduces the H200 peaks recorded in docs/BENCHMARKS.md and the CPU rows of benchmarks/memory.py
within the tolerance that `benchmarks/memory.py --cpu/--gpu` prints. What is predicted is memory
allocated by PyTorch (CUDA's `max_memory_allocated`); the CUDA context, NCCL's own buffers and the caching allocator's
fragmentation come on top, which is why batches "fit" only below `DEFAULT_HEADROOM` of the GPU.

Step time is compute only: training FLOPs (`metrics.mae_train_flops_per_image`, with the
second forward pass of full activation checkpointing) over a stated utilisation of the GPU's
peak; communication, host overhead and data loading are not modelled. What that step consumes
is set against what CPU loader cores deliver (`DataFeed`): whether the run is compute- or data-bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import ConfigError
from .layout import Layout

__all__ = [
    "GPUS",
    "GPU",
    "ModelShape",
    "DataFeed",
    "Plan",
    "Setup",
    "StepMemory",
    "block_saved_bytes_per_token",
    "data_feed",
    "largest_fitting_batch",
    "model_shape",
    "plan",
    "simulate_step",
]

GIB = 2**30

CHECKPOINTING = (False, True, "selective")

# Budget for allocated memory: the rest of the GPU goes to the CUDA context and library
# workspaces, NCCL's buffers and the caching allocator's fragmentation (reserved > allocated).
DEFAULT_HEADROOM = 0.10

# Utilisation of the peak FLOP/s the step time assumes by default: the compiled ViT-L/H bare steps
# on an H200 reached 0.36-0.40 MFU, the eager ones 0.27-0.33 (docs/BENCHMARKS.md).
DEFAULT_UTILISATION = 0.35

# Images per second one CPU loader core delivers by default: the folder kind's JPEG decode, crop, flip
# and normalise at 224 px on BSDS500 photos (481 x 321), per core, in docs/BENCHMARKS.md ("Data loaders").
# Measure it on your own data with `python benchmarks/loader.py --config RECIPE data.path=...`.
CPU_LOADER_IMAGES_PER_CORE = 370.0

# Cores one GPU's loader workers can use by default: a 96-core node's share per GPU with 8 GPUs. The
# training process takes some of it, so this is the most a GPU gets there, not a margin.
DEFAULT_LOADER_CORES_PER_GPU = 12

# DeepSpeed ZeRO-3's default `stage3_max_reuse_distance` (elements): once its trace of a step is
# complete, a parameter used again within this many gathered elements is not released, so the
# weights gathered in forward stay until backward for the last ~5e8 parameters of forward.
ZERO3_MAX_REUSE_DISTANCE = 10**9


# --------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # total memory as the driver reports it (nvidia-smi), GiB
    device_name: str  # what torch.cuda.get_device_name contains, for the FLOPs tables in metrics.py


GPUS = {
    # nvidia-smi totals: 143771 MiB (H200), 81559 MiB (H100 80GB HBM3), 81920 / 40960 MiB (A100).
    "H200": GPU("H200", 143771 / 1024, "H200"),
    "H100": GPU("H100", 81559 / 1024, "H100"),
    "A100-80GB": GPU("A100-80GB", 81920 / 1024, "A100"),
    "A100-40GB": GPU("A100-40GB", 40960 / 1024, "A100"),
}


def lookup_gpu(name: str, memory_gib: float | None = None) -> GPU:
    """A known GPU, with its memory replaced by `memory_gib` when given (e.g. a 94 GB H100 NVL)."""
    if name not in GPUS:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or give --gpu-memory GiB)")
    gpu = GPUS[name]
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ConfigError(f"--gpu-memory must be positive, got {memory_gib}")
        gpu = replace(gpu, name=f"{gpu.name} with {memory_gib:g} GiB", memory_gib=memory_gib)
    return gpu


# --------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class BlockShape:
    """One transformer block: width, MLP hidden size, heads and its parameter counts."""

    width: int
    hidden: int
    heads: int
    tokens: int  # sequence length it runs on, per image
    params: int
    matmul_weights: int  # elements of its Linear weights (the tensors autocast copies to bf16)
    largest_weight: int


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of an MAE, read off a (meta-device) model."""

    name: str
    params: int  # every parameter, frozen position tables included
    trainable: int
    image_elements: int  # C * H * W
    patches: int  # L
    patch_dim: int  # p * p * C
    encoder: BlockShape
    depth: int
    decoder: BlockShape
    decoder_depth: int
    root_params: int  # everything outside the transformer blocks
    root_matmul_weights: int  # patch embedding, decoder embedding and prediction weights
    root_trainable: int

    @property
    def visible_tokens(self) -> int:
        return self.encoder.tokens

    @property
    def decoder_tokens(self) -> int:
        return self.decoder.tokens


def model_shape(name: str, **overrides) -> ModelShape:
    """The shape of a registered model (unknown names are a ConfigError naming the closest one)."""
    return shape_of(meta_model(name, **overrides), name)


def meta_model(name: str, **overrides) -> nn.Module:
    """A registered model built on the meta device: shapes and counts without memory."""
    from .models import build_model

    with torch.device("meta"):
        return build_model(name, **overrides)


def shape_of(model: nn.Module, name: str = "model") -> ModelShape:
    """The shape of a built MaskedAutoencoderViT (any device, meta included)."""
    patches = model.num_patches
    visible = int(patches * (1 - model.mask_ratio))
    encoder = _block_shape(model.blocks[0], 1 + visible)
    decoder = _block_shape(model.decoder_blocks[0], 1 + patches)
    block_params = len(model.blocks) * encoder.params + len(model.decoder_blocks) * decoder.params
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    root_matmul = model.patch_embed.proj.weight.numel() + model.decoder_embed.weight.numel()
    root_matmul += model.decoder_pred.weight.numel()
    return ModelShape(
        name=name, params=params, trainable=trainable,
        image_elements=model.in_chans * model.img_size[0] * model.img_size[1],
        patches=patches, patch_dim=model.patch_size**2 * model.in_chans,
        encoder=encoder, depth=len(model.blocks), decoder=decoder, decoder_depth=len(model.decoder_blocks),
        root_params=params - block_params, root_matmul_weights=root_matmul,
        root_trainable=trainable - block_params,
    )


def _block_shape(block: nn.Module, tokens: int) -> BlockShape:
    weights = [m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear)]
    return BlockShape(
        width=block.norm1.normalized_shape[0], hidden=block.mlp.fc1.out_features, heads=block.attn.num_heads,
        tokens=tokens, params=sum(p.numel() for p in block.parameters()),
        matmul_weights=sum(weights), largest_weight=max(weights),
    )


# --------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Setup:
    """How the model is trained: the inputs of the plan other than the model. The process layout
    (strategy, processes, replicas, offload, precision) is `layout`, checked there."""

    strategy: str = "ddp"  # a name of maescale.layout.STRATEGIES
    world_size: int = 8
    precision: str = "bf16"  # fp32 | bf16
    batch_size: int = 64  # per GPU
    activation_checkpointing: bool | str = False  # False, True (every block recomputed) or "selective"
    replicate_degree: int = 1  # hsdp: replicas; the model is sharded over world_size / replicate_degree
    cpu_offload: bool = False  # fsdp2/hsdp: sharded weights, gradients and AdamW state in host memory
    blocks_per_unit: int = 4  # fsdp2/hsdp: encoder blocks per unit
    reshard_after_forward: bool = False  # fsdp2/hsdp: free the encoder's gathered weights after forward
    # Batches on the device: the trainer holds the current one and the next (prefetch_to_device).
    input_batches: int = 2
    # The first step of a job: no AdamW state yet, and ZeRO-3 has not traced the step, so it
    # releases every gathered parameter after use (benchmarks/memory.py measures this step).
    first_step: bool = False

    def __post_init__(self):
        self.layout  # noqa: B018  (checks the layout)
        _validate_setup(self)

    @classmethod
    def from_config(cls, cfg, world_size: int, nodes: int = 1) -> Setup:
        """What `maescale pretrain` with `cfg` runs on `world_size` GPUs over `nodes` nodes."""
        layout = Layout.from_config(cfg.parallel, cfg.train.precision, world_size, nodes)
        p = cfg.parallel
        return cls(layout.strategy, world_size, layout.precision, cfg.data.batch_size, p.activation_checkpointing,
                   layout.replicate_degree, layout.cpu_offload, p.blocks_per_unit, p.reshard_after_forward)

    @property
    def layout(self) -> Layout:
        return Layout(self.strategy, self.world_size, self.replicate_degree, self.cpu_offload, self.precision)

    @property
    def shard_degree(self) -> int:
        """Processes one copy of the sharded state is spread over."""
        return self.layout.shard_degree

    @property
    def fsdp(self) -> bool:
        """The model is cut into FSDP2 units (fsdp2/hsdp on one GPU trains it whole, as ddp)."""
        return self.layout.fsdp2_units

    @property
    def zero_stage(self) -> int:
        return self.layout.zero_stage

    @property
    def whole(self) -> bool:
        """Every GPU holds the whole model in fp32, bf16 by autocast (ddp; fsdp2 on one GPU)."""
        return self.layout.whole_model


def _validate_setup(setup: Setup) -> None:
    checks = [
        (setup.batch_size >= 1, f"batch size must be at least 1, got {setup.batch_size}"),
        (setup.activation_checkpointing in CHECKPOINTING,
         f"activation checkpointing must be false, true or selective, got {setup.activation_checkpointing!r}"),
        (setup.blocks_per_unit >= 1, f"blocks per unit must be at least 1, got {setup.blocks_per_unit}"),
        (setup.input_batches >= 0, f"input batches must be >= 0, got {setup.input_batches}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class ActivationDtypes:
    """Bytes per element of the two kinds of activations a block saves."""

    residual: int  # the residual stream (block inputs, LayerNorm inputs)
    matmul: int  # matmul inputs and outputs, attention, GELU
    # LayerNorm's saved mean and rstd: fp32 on CUDA for any input; torch's CPU kernel keeps them in
    # the input's dtype when weights and input are both bf16 (only the CPU tests see 2).
    norm_stats: int = 4


def activation_dtypes(setup: Setup) -> ActivationDtypes:
    """fp32: everything fp32. bf16 under DDP is autocast: matmuls run in bf16 but LayerNorm returns
    fp32 and adding a bf16 branch to the fp32 residual stream keeps it fp32. FSDP2 (bf16 parameters,
    inputs cast) and DeepSpeed (module and images in bf16) compute everything in bf16."""
    if setup.precision == "fp32":
        return ActivationDtypes(residual=4, matmul=4)
    if setup.whole:
        return ActivationDtypes(residual=4, matmul=2)
    return ActivationDtypes(residual=2, matmul=2)


def block_saved_bytes_per_token(block: BlockShape, dtypes: ActivationDtypes, checkpointing: bool | str) -> int:
    """Bytes a timm Block keeps for backward per token, derived from what autograd saves.

    Without checkpointing (D width, H MLP hidden, h heads, r / a the residual / matmul bytes):
    the block input and x + attn (LayerNorm inputs, r*D each), LayerNorm mean and rstd (2 x 4 bytes
    each norm), each norm's output as the next matmul's input (a*D each; under autocast the bf16
    copy, the fp32 output itself is freed), the qkv output (3a*D; q, k, v are views that
    attention saves), attention's output (a*D; also proj's input: its transpose-reshape is a
    view) and log-sum-exp (fp32, one per head), fc1's output (GELU's input) and GELU's output
    (fc2's input), a*H each. Residual adds and reshapes save nothing.

    Full checkpointing keeps only the block input. Selective (maescale.models.mae._KEPT_OPS)
    keeps the block input and the output of every matmul and of attention: qkv, attention (with
    its log-sum-exp), proj, fc1 and fc2.
    """
    width, hidden, r, a = block.width, block.hidden, dtypes.residual, dtypes.matmul
    logsumexp = 4 * block.heads
    if checkpointing is True:
        return r * width
    if checkpointing == "selective":
        return r * width + a * (3 * width + width + width + hidden + width) + logsumexp
    norm_stats = 2 * 2 * dtypes.norm_stats
    return 2 * r * width + a * (2 * width + 3 * width + width) + 2 * a * hidden + logsumexp + norm_stats


def block_backward_workspace_per_token(block: BlockShape, dtypes: ActivationDtypes) -> int:
    """The most a block's backward holds at once beyond its saved tensors, per token: the incoming
    and outgoing residual gradients (r*D each) plus the larger of attention's gradients (grad of its
    output, dq, dk, dv and their re-stacked qkv gradient: 7a*D) and the MLP's (GELU's gradient in and
    out: 2a*H)."""
    width, hidden, r, a = block.width, block.hidden, dtypes.residual, dtypes.matmul
    return 2 * r * width + a * max(7 * width, 2 * hidden)


# The loss and the count of masked patches it divides by (fp32 scalars), once per step.
LOSS_SCALAR_BYTES = 8


@dataclass(frozen=True)
class OuterActivations:
    """Bytes per image saved outside the transformer blocks, by when backward frees them (plus
    LOSS_SCALAR_BYTES per step)."""

    stem: int  # patch embedding input copy, the masking gather's input, shuffle indices, mask
    bridge: int  # encoder norm, decoder embedding, the decoder's unshuffle gather
    head: int  # decoder norm, prediction, loss


def outer_activation_bytes(shape: ModelShape, dtypes: ActivationDtypes, images_cast: bool) -> OuterActivations:
    """What autograd saves around the blocks, per image (see MaskedAutoencoderViT.forward):

    stem: the bf16 copy of the images that the patch embedding saves when the images are cast
    (autocast, FSDP2's input cast), the patch tokens + position that the masking gather saves
    (torch.gather keeps its input), the shuffle and restore indices (int64) and the mask (fp32);
    bridge: the encoder norm's input, statistics and output (as decoder_embed's input), and the
    gather input that puts mask tokens back in patch order; head: the decoder norm's input
    (the last decoder block's whole output, cls included), statistics and output, and the fp32
    difference that the squared error saves. The prediction itself is not saved (the loss takes
    a float copy), the target needs no gradient.
    """
    r, a, stats = dtypes.residual, dtypes.matmul, 2 * dtypes.norm_stats
    patches, width = shape.patches, shape.encoder.width
    visible, dec_width, dec_tokens = shape.visible_tokens, shape.decoder.width, shape.decoder_tokens
    image_copy = 2 * shape.image_elements if images_cast else 0
    stem = image_copy + r * patches * width + 2 * 8 * patches + 4 * patches
    bridge = (r + a) * visible * width + stats * visible + a * patches * dec_width
    head = r * dec_tokens * dec_width + stats * patches + a * patches * dec_width + 4 * patches * shape.patch_dim
    return OuterActivations(stem=stem, bridge=bridge, head=head)


# --------------------------------------------------------------------------- the step, simulated


# Categories of memory; "python-visible" ones are those benchmarks/memory.py's live-tensor count sees.
STATE_CATEGORIES = ("parameters", "gradients", "optimizer", "master")
CATEGORIES = (*STATE_CATEGORIES, "zero_buckets", "ddp_buckets", "gathered", "weight_copies", "activations",
              "temporaries", "batch")
INVISIBLE_TO_PYTHON = ("ddp_buckets", "temporaries")


class Timeline:
    """Live bytes per category through the step, and the largest total with its moment."""

    def __init__(self):
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.peak = 0
        self.peak_at = ""
        self.peak_live: dict[str, int] = dict(self.live)
        self.marks: dict[str, dict[str, int]] = {}
        self.peaks_until: dict[str, int] = {}

    def alloc(self, category: str, nbytes: float, moment: str) -> None:
        self.live[category] += int(nbytes)
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.peak_at, self.peak_live = total, moment, dict(self.live)

    def free(self, category: str, nbytes: float) -> None:
        self.live[category] -= int(nbytes)

    def transient(self, category: str, nbytes: float, moment: str) -> None:
        self.alloc(category, nbytes, moment)
        self.free(category, nbytes)

    def mark(self, name: str) -> None:
        self.marks[name] = dict(self.live)
        self.peaks_until[name] = self.peak


@dataclass
class StepMemory:
    """The simulated step: the peak, when it happens, what is live then, and named moments."""

    peak: int
    peak_at: str
    at_peak: dict[str, int]
    marks: dict[str, dict[str, int]]
    peaks_until: dict[str, int]  # the largest total from the start up to each mark
    host: int  # bytes kept in host memory (CPU offload)
    components: dict[str, int]  # the full size of each part, whether or not all of it is live at once


@dataclass(frozen=True)
class _Unit:
    """Parameters gathered and released together (an FSDP2 unit; a block under ZeRO-3)."""

    label: str
    params: int
    blocks: tuple[str, ...]  # the blocks it holds, in forward order


class _StepSimulation:
    """Forward, backward and the optimizer step as allocations and frees, in execution order."""

    def __init__(self, shape: ModelShape, setup: Setup):
        self.shape, self.setup = shape, setup
        self.dtypes = activation_dtypes(setup)
        self.param_bytes = 4 if setup.precision == "fp32" or setup.whole else 2
        self.t = Timeline()
        self.shard = setup.shard_degree
        self.batch = setup.batch_size
        images_cast = setup.precision == "bf16" and not setup.zero_stage
        self.outer = outer_activation_bytes(shape, self.dtypes, images_cast)
        self.blocks = [("encoder", i) for i in range(shape.depth)]
        self.blocks += [("decoder", i) for i in range(shape.decoder_depth)]
        self.units = self._units()
        self.gathered_units: set[str] = set()

    # ---------------------------------------------------------------- structure

    def block(self, kind: str) -> BlockShape:
        return self.shape.encoder if kind == "encoder" else self.shape.decoder

    def _units(self) -> list[_Unit]:
        shape, setup = self.shape, self.setup
        enc = [f"encoder.{i}" for i in range(shape.depth)]
        dec = tuple(f"decoder.{i}" for i in range(shape.decoder_depth))
        if setup.fsdp:
            size = setup.blocks_per_unit
            groups = [tuple(enc[i:i + size]) for i in range(0, len(enc), size)]
            units = [_Unit(f"encoder unit {g[0]}..{g[-1]}", len(g) * shape.encoder.params, g) for g in groups]
            decoder = _Unit("decoder unit", len(dec) * shape.decoder.params, dec)
            return [_Unit("root", shape.root_params, ()), *units, decoder]
        if setup.zero_stage == 3:
            units = [_Unit(b, shape.encoder.params, (b,)) for b in enc]
            units += [_Unit(b, shape.decoder.params, (b,)) for b in dec]
            return [_Unit("root", shape.root_params, ()), *units]
        return []

    def unit_of(self, block_label: str) -> _Unit | None:
        return next((u for u in self.units if block_label in u.blocks), None)

    # ---------------------------------------------------------------- state

    def state_components(self) -> dict[str, int]:
        """Full sizes of the persistent state on this GPU (bytes)."""
        s, p, pt = self.setup, self.shape.params, self.shape.trainable
        shard, pb = self.shard, self.param_bytes
        if s.fsdp:
            # fp32 sharded weights are the master copy; FSDP2 gathers bf16 copies of them to compute.
            out = dict(parameters=4 * p / shard, gradients=4 * pt / shard, optimizer=8 * pt / shard, master=0)
        elif s.zero_stage:
            # DeepSpeed keeps an fp32 master partition even when the module itself is fp32.
            params = pb * p / (shard if s.zero_stage == 3 else 1)
            grads = pb * pt / (shard if s.zero_stage >= 2 else 1)
            out = dict(parameters=params, gradients=grads, optimizer=8 * pt / shard, master=4 * pt / shard)
        else:
            out = dict(parameters=4 * p, gradients=4 * pt, optimizer=8 * pt, master=0)
        return {k: int(v) for k, v in out.items()}

    def zero_bucket_bytes(self) -> int:
        """One reduce bucket, of the size maescale gives DeepSpeed."""
        from .parallel.zero import zero_bucket_elements

        return self.param_bytes * zero_bucket_elements(self.shape.encoder.width)

    # ---------------------------------------------------------------- phases

    def run(self) -> StepMemory:
        state = self.state_components()
        self.start(state)
        self.forward()
        self.t.mark("forward")
        self.backward()
        self.t.mark("after_backward")
        self.optimizer_step(state)
        self.t.mark("after_step")
        host = 0
        if self.setup.cpu_offload:
            host = state["parameters"] + state["gradients"] + state["optimizer"]
        t = self.t
        return StepMemory(t.peak, t.peak_at, t.peak_live, t.marks, t.peaks_until, host, self.components(state))

    def start(self, state: dict[str, int]) -> None:
        s, t = self.setup, self.t
        if not s.cpu_offload:
            t.alloc("parameters", state["parameters"], "start")
            t.alloc("master", state["master"], "start")
            if not s.first_step:
                t.alloc("optimizer", state["optimizer"], "start")
        if s.whole and s.world_size > 1:
            t.alloc("ddp_buckets", 4 * self.shape.trainable, "start")  # the Reducer's flat gradient buckets
        if s.zero_stage == 3:
            # Partitioned gradients and one reduce bucket live for the whole run (measured on CPU: docs/BENCHMARKS.md).
            t.alloc("gradients", state["gradients"], "start")
            t.alloc("zero_buckets", self.zero_bucket_bytes(), "start")
        batch_bytes = 2 if s.zero_stage and s.precision == "bf16" else 4
        t.alloc("batch", s.input_batches * self.batch * self.shape.image_elements * batch_bytes, "start")

    def forward(self) -> None:
        t, b = self.t, self.batch
        self.gather(self.units[0] if self.units else None, "forward: root")
        t.alloc("activations", b * self.outer.stem, "forward: patch embedding and masking")
        if self.uses_autocast:
            t.alloc("weight_copies", 2 * self.shape.root_matmul_weights, "forward: autocast copies")
        for kind, index in self.blocks:
            if kind == "decoder" and index == 0:
                t.alloc("activations", b * self.outer.bridge, "forward: decoder embedding")
            self.forward_block(kind, index)
        t.alloc("activations", b * self.outer.head + LOSS_SCALAR_BYTES, "forward: loss")
        if self.uses_autocast and self.setup.activation_checkpointing:
            # Leaving autocast drops its cache; checkpointed blocks saved no weight copy.
            t.free("weight_copies", 2 * self.block_matmul_weights())

    def forward_block(self, kind: str, index: int) -> None:
        t, block, label = self.t, self.block(kind), f"{kind}.{index}"
        unit = self.unit_of(label)
        if unit is not None and unit.blocks[0] == label:
            self.gather(unit, f"forward: gather {unit.label}")
        if self.uses_autocast:
            t.alloc("weight_copies", 2 * block.matmul_weights, f"forward: {label}")
        ac = self.setup.activation_checkpointing
        t.alloc("activations", self.batch * block.tokens * block_saved_bytes_per_token(block, self.dtypes, ac),
                f"forward: {label}")
        if unit is not None and unit.blocks[-1] == label and self.releases_after_forward(unit):
            self.release(unit)

    def backward(self) -> None:
        t, b = self.t, self.batch
        t.free("activations", b * self.outer.head + LOSS_SCALAR_BYTES)
        for kind, index in reversed(self.blocks):
            self.backward_block(kind, index)
            if kind == "decoder" and index == 0:
                t.free("activations", b * self.outer.bridge)
        self.root_gradients()
        t.free("activations", b * self.outer.stem)
        if self.uses_autocast:
            t.free("weight_copies", 2 * self.shape.root_matmul_weights)
        if self.units and self.units[0].label in self.gathered_units:
            self.release(self.units[0])
        if self.setup.fsdp:
            self.reduce_scatter(self.shape.root_trainable, "backward: root gradients")

    def backward_block(self, kind: str, index: int) -> None:
        t, block, label, ac = self.t, self.block(kind), f"{kind}.{index}", self.setup.activation_checkpointing
        unit = self.unit_of(label)
        moment = f"backward: {label}"
        if unit is not None and unit.label not in self.gathered_units:
            self.gather(unit, f"backward: gather {unit.label}")
        tokens = self.batch * block.tokens
        if ac:  # the recomputed forward, under autocast with its own bf16 weight copies
            t.alloc("activations", tokens * self.recomputed_per_token(block), moment)
            if self.uses_autocast:
                t.alloc("weight_copies", 2 * block.matmul_weights, moment)
        workspace = tokens * block_backward_workspace_per_token(block, self.dtypes)
        # The low-precision gradient of the largest weight before it is cast to the fp32 gradient.
        workspace += self.dtypes.matmul * block.largest_weight if self.param_bytes > self.dtypes.matmul else 0
        t.transient("temporaries", workspace, moment)
        self.block_gradients(block, label)
        saved = tokens * block_saved_bytes_per_token(block, self.dtypes, ac)
        t.free("activations", saved + (tokens * self.recomputed_per_token(block) if ac else 0))
        if self.uses_autocast:
            t.free("weight_copies", 2 * block.matmul_weights)
        if unit is not None and unit.blocks[0] == label:
            # The unit's backward is done: FSDP2 frees its gathered weights, then reduces.
            self.release(unit)
            if self.setup.fsdp:
                self.reduce_scatter(unit.params, f"backward: {label} gradients")

    # ---------------------------------------------------------------- gradients

    def block_gradients(self, block: BlockShape, label: str) -> None:
        s, t, moment = self.setup, self.t, f"backward: {label} gradients"
        if s.fsdp:
            t.alloc("temporaries", self.param_bytes * block.params, moment)  # unsharded, until the unit reduces
        elif s.zero_stage >= 2:
            # Gradients flow through the reduce bucket into this process's partition.
            t.transient("temporaries", self.param_bytes * block.params, moment)
            if s.zero_stage == 2:
                t.alloc("gradients", self.param_bytes * block.params / self.shard, moment)
        else:
            t.alloc("gradients", self.param_bytes * block.params, moment)

    def reduce_scatter(self, numel: int, moment: str) -> None:
        """FSDP2: copy a unit's `numel` gradients into an fp32 reduce-scatter input, free them, reduce into
        the sharded gradients. A second buffer of the input's size is live meanwhile: NCCL's stream
        still holds the previous unit's input; gloo (CPU processes) copies the input (measured:
        docs/BENCHMARKS.md). Over a shard group of one the input itself becomes the sharded
        gradients (parallel.ReduceOverOneRank): no second buffer, nothing copied."""
        t = self.t
        t.alloc("temporaries", 4 * numel, moment)
        t.free("temporaries", self.param_bytes * numel)
        if self.shard == 1:
            t.free("temporaries", 4 * numel)
            if not self.setup.cpu_offload:
                t.alloc("gradients", 4 * numel, moment)  # the same bytes, now the gradients
            return
        t.transient("temporaries", 4 * numel, moment)
        if not self.setup.cpu_offload:
            t.alloc("gradients", 4 * numel / self.shard, moment)
        t.free("temporaries", 4 * numel)

    def root_gradients(self) -> None:
        s, t, root = self.setup, self.t, self.shape.root_trainable
        if s.fsdp:
            t.alloc("temporaries", self.param_bytes * root, "backward: root gradients")  # reduced in backward()
        elif s.zero_stage == 2:
            t.alloc("gradients", self.param_bytes * root / self.shard, "backward: root gradients")
        elif s.zero_stage != 3:
            t.alloc("gradients", self.param_bytes * root, "backward: root gradients")

    # ---------------------------------------------------------------- gathering

    def gather(self, unit: _Unit | None, moment: str) -> None:
        """All-gather a unit: its gathered weights stay, and one more buffer of their size is live
        meanwhile: with NCCL the collective's output (or the next unit's, prefetched) until it is
        copied out; with gloo (CPU processes) its staging copy of the output (measured: docs/BENCHMARKS.md)."""
        if unit is None or unit.label in self.gathered_units:
            return
        if unit.label == "root" and not self.setup.fsdp and self.setup.zero_stage != 3:
            return
        nbytes = self.param_bytes * unit.params
        self.t.transient("temporaries", nbytes, moment)
        self.t.alloc("gathered", nbytes, moment)
        self.gathered_units.add(unit.label)

    def release(self, unit: _Unit) -> None:
        if unit.label in self.gathered_units:
            self.t.free("gathered", self.param_bytes * unit.params)
            self.gathered_units.discard(unit.label)

    def releases_after_forward(self, unit: _Unit) -> bool:
        s = self.setup
        if s.fsdp:
            return s.reshard_after_forward and unit.label.startswith("encoder")
        if s.zero_stage == 3:
            return s.first_step or 2 * self.params_after(unit) >= ZERO3_MAX_REUSE_DISTANCE
        return False

    def params_after(self, unit: _Unit) -> int:
        """Parameters gathered after `unit` in forward (ZeRO-3's reuse distance until its backward
        counts them twice: in forward and again in backward)."""
        index = self.units.index(unit)
        return sum(u.params for u in self.units[index + 1:])

    # ---------------------------------------------------------------- optimizer step

    def optimizer_step(self, state: dict[str, int]) -> None:
        s, t = self.setup, self.t
        master_grad = 0
        if s.zero_stage:
            # DeepSpeed flattens this process's gradient partition into a new tensor (bf16: then copies
            # it to fp32, freeing the bf16 one) and hands it to AdamW as the fp32 master's gradient;
            # ZeRO-3 does so per sub-group of at most sub_group_size (1e9) elements.
            partition = self.shape.trainable / self.shard
            if s.zero_stage == 3:
                partition = min(partition, 10**9)
            if s.precision == "bf16":
                t.transient("temporaries", 2 * partition, "step: flattened gradient partition")
            master_grad = 4 * partition
            t.alloc("temporaries", master_grad, "step: fp32 gradient of the master partition")
        if s.first_step and not s.cpu_offload:
            t.alloc("optimizer", state["optimizer"], "step: AdamW state created")
        t.free("temporaries", master_grad)
        if s.zero_stage in (1, 2):
            t.free("gradients", t.live["gradients"])  # DeepSpeed frees them in its step

    # ---------------------------------------------------------------- helpers

    @property
    def uses_autocast(self) -> bool:
        return self.setup.layout.autocast

    def block_matmul_weights(self) -> int:
        shape = self.shape
        return shape.depth * shape.encoder.matmul_weights + shape.decoder_depth * shape.decoder.matmul_weights

    def recomputed_per_token(self, block: BlockShape) -> int:
        """What backward re-materialises of a checkpointed block: all it would save, minus what it kept."""
        kept = block_saved_bytes_per_token(block, self.dtypes, self.setup.activation_checkpointing)
        return block_saved_bytes_per_token(block, self.dtypes, False) - kept

    def components(self, state: dict[str, int]) -> dict[str, int]:
        b, shape, ac = self.batch, self.shape, self.setup.activation_checkpointing
        enc = b * shape.depth * shape.encoder.tokens * block_saved_bytes_per_token(shape.encoder, self.dtypes, ac)
        dec = block_saved_bytes_per_token(shape.decoder, self.dtypes, ac)
        dec *= b * shape.decoder_depth * shape.decoder.tokens
        outer = b * (self.outer.stem + self.outer.bridge + self.outer.head)
        gathered = self.param_bytes * sum(u.params for u in self.units) if self.setup.fsdp else 0
        copies = 2 * (self.shape.root_matmul_weights + self.block_matmul_weights()) if self.uses_autocast else 0
        return {**state, "activations_encoder": enc, "activations_decoder": dec, "activations_outer": outer,
                "gathered_weights": gathered, "weight_copies": copies}


def simulate_step(shape: ModelShape, setup: Setup) -> StepMemory:
    """Memory of one training step on one GPU (or one CPU process of a gloo group)."""
    return _StepSimulation(shape, setup).run()


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    shape: ModelShape
    setup: Setup
    gpu: GPU
    memory: StepMemory
    flops_per_image: int  # executed, recompute included
    utilisation: float
    peak_flops: float | None
    headroom: float = DEFAULT_HEADROOM
    fitting: list[tuple[int, bool]] = field(default_factory=list)
    largest_batch: int = 0

    @property
    def budget(self) -> float:
        return self.gpu.memory_gib * GIB * (1 - self.headroom)

    @property
    def step_seconds(self) -> float | None:
        """Compute time of one micro-batch step per GPU; None without a peak FLOP/s for the GPU."""
        if not self.peak_flops:
            return None
        return self.flops_per_image * self.setup.batch_size / (self.utilisation * self.peak_flops)

    @property
    def images_per_second(self) -> float | None:
        """Images per second one GPU trains on at the plan's utilisation. Gradient accumulation does not
        change it: an optimizer step of k micro-batches takes k micro-batch steps."""
        step = self.step_seconds
        return None if step is None else self.setup.batch_size / step


def plan(model: str | nn.Module, setup: Setup, gpu: GPU, utilisation: float = DEFAULT_UTILISATION,
         headroom: float = DEFAULT_HEADROOM, batches: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024),
         name: str | None = None) -> Plan:
    """Memory, step time and the batches that fit for `model` (a registered name, or a model built on
    the meta device, e.g. from a config, called `name`) trained as `setup` on `gpu`."""
    if not 0 < utilisation <= 1:
        raise ConfigError(f"the MFU (--mfu) must be in (0, 1], got {utilisation}")
    if not 0 <= headroom < 1:
        raise ConfigError(f"the headroom (--headroom) must be in [0, 1), got {headroom}")
    if isinstance(model, str):
        model, name = meta_model(model), model
    shape = shape_of(model, name or "model")
    result = Plan(shape, setup, gpu, simulate_step(shape, setup), flops_per_image(model, setup),
                  utilisation, peak_flops(gpu, setup.precision), headroom)
    result.fitting = [(b, simulate_step(shape, replace(setup, batch_size=b)).peak <= result.budget) for b in batches]
    result.largest_batch = largest_fitting_batch(shape, setup, result.budget)
    return result


# Largest per-GPU batch searched for; a model that fits even then is reported as "65536+".
BATCH_SEARCH_LIMIT = 1 << 16


def largest_fitting_batch(shape: ModelShape, setup: Setup, budget: float, limit: int = BATCH_SEARCH_LIMIT) -> int:
    """The largest per-GPU batch whose peak stays within `budget` bytes (0 if not even one image fits),
    at most `limit`; the peak grows with the batch, so a bisection finds it."""
    def fits(batch: int) -> bool:
        return simulate_step(shape, replace(setup, batch_size=batch)).peak <= budget

    if not fits(1):
        return 0
    low, high = 1, limit
    if fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def flops_per_image(model: nn.Module, setup: Setup) -> int:
    """Training FLOPs the GPU executes per image: with full checkpointing each block runs forward twice;
    selective checkpointing recomputes no matmul."""
    from .metrics import mae_train_flops_per_image

    return mae_train_flops_per_image(model, include_recompute=setup.activation_checkpointing is True)


def peak_flops(gpu: GPU, precision: str) -> float | None:
    from .metrics import dense_peak_flops

    return dense_peak_flops(gpu.device_name, precision)


@dataclass(frozen=True)
class DataFeed:
    """What one GPU's step consumes (images/s, None without a step time) against what CPU loader cores give."""

    images_per_second: float | None
    per_core: float  # images/s one loader core delivers
    cores_per_gpu: int  # loader cores one GPU can have
    device_decode: bool = False  # data.decode=gpu: the cores only read bytes, the GPU decodes

    @property
    def cores_needed(self) -> int | None:
        """Whole cores: a fraction of a core is still a core taken from the node."""
        return None if self.images_per_second is None else math.ceil(self.images_per_second / self.per_core)

    @property
    def data_bound(self) -> bool:
        needed = self.cores_needed
        return needed is not None and needed > self.cores_per_gpu


def data_feed(p: Plan, per_core: float = CPU_LOADER_IMAGES_PER_CORE,
              cores_per_gpu: int = DEFAULT_LOADER_CORES_PER_GPU, device_decode: bool = False) -> DataFeed:
    """The plan's images/s per GPU set against `per_core` images/s per loader core and `cores_per_gpu` cores."""
    if not per_core > 0:
        raise ConfigError(f"the loader rate (--loader-rate) must be positive, got {per_core}")
    if cores_per_gpu < 1:
        raise ConfigError(f"the cores per GPU (--cores-per-gpu) must be at least 1, got {cores_per_gpu}")
    return DataFeed(p.images_per_second, per_core, cores_per_gpu, device_decode)


# --------------------------------------------------------------------------- report


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}" if nbytes else "-"


def describe_setup(setup: Setup) -> str:
    """The layout as the trainer's strategy line names it, then what else shapes the step."""
    line = f"{setup.layout.describe()} on {setup.world_size} GPU(s)"
    if setup.fsdp:
        kept = "resharded after forward" if setup.reshard_after_forward else "gathered weights kept for backward"
        line += f"; {setup.blocks_per_unit} encoder blocks per unit, {kept}"
    ac = {False: "no activation checkpointing", True: "full activation checkpointing",
          "selective": "selective activation checkpointing"}[setup.activation_checkpointing]
    return f"{line}; batch {setup.batch_size} per GPU ({setup.batch_size * setup.world_size} in all), {ac}"


def _memory_rows(p: Plan) -> list[tuple[str, int | None, int | None]]:
    """(label, whole size, live at the peak) of each part of the memory; None where it does not apply."""
    c, live, shape, setup = p.memory.components, p.memory.at_peak, p.shape, p.setup
    state_dtype = "fp32" if setup.fsdp or setup.whole or setup.precision == "fp32" else "bf16"
    grad_dtype = "fp32" if setup.fsdp else state_dtype
    shards = setup.shard_degree
    sharded = {  # which state each strategy divides over its shard group
        "parameters": setup.fsdp or setup.zero_stage == 3,
        "gradients": setup.fsdp or setup.zero_stage >= 2,
        "optimizer": setup.fsdp or setup.zero_stage >= 1,
    }

    def state(label: str, key: str) -> str:
        where = ", in host memory" if setup.cpu_offload else ""
        share = f", 1/{shards} of it" if shards > 1 and sharded[key] else ""
        return f"{label}{share}{where}"

    return [
        (state(f"parameters ({state_dtype}", "parameters") + ")", c["parameters"], live["parameters"]),
        (state(f"gradients ({grad_dtype}", "gradients") + ")", c["gradients"], live["gradients"]),
        (state("AdamW moments (fp32", "optimizer") + ")", c["optimizer"], live["optimizer"]),
        (state("fp32 master weights (ZeRO", "optimizer") + ")", c["master"], live["master"]),
        ("DDP gradient buckets", live["ddp_buckets"], live["ddp_buckets"]),
        ("ZeRO reduce bucket", live["zero_buckets"], live["zero_buckets"]),
        ("gathered weights (FSDP2 units, ZeRO-3 modules)", c["gathered_weights"], live["gathered"]),
        ("autocast bf16 weight copies", c["weight_copies"], live["weight_copies"]),
        (f"activations: encoder, {shape.depth} blocks x {shape.visible_tokens} tokens", c["activations_encoder"],
         None),
        (f"activations: decoder, {shape.decoder_depth} blocks x {shape.decoder_tokens} tokens",
         c["activations_decoder"], None),
        ("activations: patch embedding, masking, loss", c["activations_outer"], None),
        ("activations still saved at the peak", None, live["activations"]),
        ("temporaries (collective buffers, backward workspace)", None, live["temporaries"]),
        (f"input batches ({setup.input_batches})", live["batch"], live["batch"]),
    ]


def format_plan(p: Plan, feed: DataFeed | None = None) -> str:
    """The report `maescale plan` prints; `feed` (default: `data_feed(p)`) sets its data line."""
    shape, setup = p.shape, p.setup
    lines = [
        f"{shape.name}: {shape.params / 1e6:.1f} M parameters ({shape.trainable / 1e6:.1f} M trained); encoder "
        f"{shape.depth} x {shape.encoder.width} on {shape.visible_tokens} visible tokens, decoder "
        f"{shape.decoder_depth} x {shape.decoder.width} on {shape.decoder_tokens} tokens",
        f"setup: {describe_setup(setup)}",
        f"GPU: {p.gpu.name}, {p.gpu.memory_gib:.1f} GiB; batches fit while the peak stays within "
        f"{p.budget / GIB:.1f} GiB ({100 * p.headroom:.0f}% kept for the CUDA context, NCCL and fragmentation)",
        "",
        f"{'memory per GPU, GiB':<58} {'whole':>7} {'at peak':>8}",
    ]
    for label, whole, live in _memory_rows(p):
        if whole or live:
            cells = ["" if value is None else _gib(value) for value in (whole, live)]
            lines.append(f"  {label:<56} {cells[0]:>7} {cells[1]:>8}")
    verdict = "fits" if p.memory.peak <= p.budget else "does NOT fit"
    lines.append(f"  {'peak (allocated)':<56} {'':>7} {_gib(p.memory.peak):>8}  {verdict}; at {p.memory.peak_at}")
    if p.memory.host:
        lines.append(f"  host memory per process (offloaded state): {_gib(p.memory.host)} GiB")
    lines += ["", _format_step(p), _format_data(p, feed or data_feed(p)), _format_fitting(p)]
    return "\n".join(lines)


def _format_step(p: Plan) -> str:
    flops = p.flops_per_image
    recompute = " (full checkpointing's recompute included)" if p.setup.activation_checkpointing is True else ""
    head = f"step: {flops / 1e9:.1f} GFLOP per image{recompute} x {p.setup.batch_size}"
    if p.step_seconds is None:
        return head + f"; no {p.setup.precision} peak FLOP/s known for {p.gpu.name}"
    per_gpu = p.images_per_second
    return (f"{head}; at {100 * p.utilisation:.0f}% of {p.peak_flops / 1e12:g} TFLOP/s: "
            f"{1000 * p.step_seconds:.1f} ms, {per_gpu:.0f} images/s per GPU, {per_gpu * p.setup.world_size:.0f} on "
            f"{p.setup.world_size} (compute only: no communication, host or data-loading time)")


def _format_data(p: Plan, feed: DataFeed) -> str:
    rate = f"a CPU loader core gives ~{feed.per_core:,.0f} (--loader-rate)"
    if feed.images_per_second is None:
        return f"data: no step time for {p.gpu.name}, so nothing to set against {rate}"
    if feed.device_decode:
        return (f"data: the step consumes {feed.images_per_second:,.0f} images/s per GPU at {100 * p.utilisation:.0f}% "
                "MFU; with data.decode=gpu the loader cores only read file bytes and the GPU decodes and crops "
                "(its images/s per GPU: benchmarks/gpu_check.sh)")
    if feed.data_bound:
        verdict = (f", more than the {feed.cores_per_gpu} it has (--cores-per-gpu): data-bound unless data.decode=gpu "
                   "(workers only read the bytes, the GPU decodes)")
    else:
        verdict = f" of the {feed.cores_per_gpu} it has (--cores-per-gpu): compute-bound"
    return (f"data: the step consumes {feed.images_per_second:,.0f} images/s per GPU at {100 * p.utilisation:.0f}% "
            f"MFU; {rate}, so each GPU needs {feed.cores_needed:,} loader cores{verdict}")


def _format_fitting(p: Plan) -> str:
    fit = " ".join(str(b) for b, ok in p.fitting if ok) or "none"
    misfit = " ".join(str(b) for b, ok in p.fitting if not ok) or "none"
    return f"batches per GPU that fit: {fit}; too large: {misfit}; largest: {_largest(p)}"


def _largest(p: Plan) -> str:
    return f"{p.largest_batch}+" if p.largest_batch >= BATCH_SEARCH_LIMIT else str(p.largest_batch)


def sweep(setup: Setup, gpu: GPU, utilisation: float = DEFAULT_UTILISATION,
          headroom: float = DEFAULT_HEADROOM) -> list[Plan]:
    """`plan` for every registered model under one setup."""
    from .models import MODEL_SPECS

    return [plan(name, setup, gpu, utilisation, headroom, batches=()) for name in MODEL_SPECS]


def format_sweep(plans: list[Plan]) -> str:
    first = plans[0]
    lines = [f"setup: {describe_setup(first.setup)}; GPU: {first.gpu.name}, batches fit within "
             f"{first.budget / GIB:.1f} GiB; step time at {100 * first.utilisation:.0f}% of peak FLOP/s (compute only)",
             "",
             f"| model | parameters | peak GiB at batch {first.setup.batch_size} | fits | largest batch | ms/step "
             "| images/s per GPU |",
             "|---|---|---|---|---|---|---|"]
    for p in plans:
        ms = f"{1000 * p.step_seconds:.1f}" if p.step_seconds else "-"
        rate = f"{p.images_per_second:.0f}" if p.step_seconds else "-"
        fits = "yes" if p.memory.peak <= p.budget else "no"
        lines.append(f"| {p.shape.name} | {p.shape.params / 1e6:.1f} M | {p.memory.peak / GIB:.2f} | {fits} | "
                     f"{_largest(p)} | {ms} | {rate} |")
    return "\n".join(lines)
