"""Typed run configuration: defaults <- YAML file <- dotlist overrides.

Every key is a dataclass field with a help text; loading goes through the
schema, so an unknown key or a value of the wrong type fails with the key's
name (and the closest valid key) before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .data_kinds import data_kind, kind_names, kinds_help
from .errors import ConfigError
from .layout import (
    STRATEGIES,
    check_strategy_settings,
    legacy_override_error,
    translate_legacy_parallel,
    zero_stage_of,
)
from .sizes import image_hw


def opt(default: Any, help: str) -> Any:
    """A config field with a default and a help text shown by `--help`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = opt("mae_vit_tiny_patch4", "Named MAE configuration, e.g. mae_vit_base_patch16.")
    img_size: Optional[Union[int, list[int]]] = opt(
        None,
        "Input resolution: an int for square images or [height, width], each a multiple of the patch size; None "
        "keeps the named model's."
    )
    in_chans: int = opt(
        3,
        "Image channels: 3 for RGB, 1 for grey, any count for multi-channel data (other than 3 needs data.mean and "
        "data.std, or `maescale stats` run on data.path)."
    )
    patch_size: Optional[int] = opt(None, "Patch size; None keeps the named model's.")
    mask_ratio: float = opt(0.75, "Fraction of patches removed before the encoder, in (0, 1).")
    norm_pix_loss: bool = opt(True, "Regress per-patch normalised pixels (the paper's best setting).")
    decoder_embed_dim: Optional[int] = opt(None, "Decoder width; None keeps the named model's.")
    decoder_depth: Optional[int] = opt(None, "Decoder blocks; None keeps the named model's.")
    decoder_num_heads: Optional[int] = opt(None, "Decoder heads; None keeps the named model's.")


@dataclass
class DataConfig:
    kind: str = opt(
        "synthetic",
        "Dataset kind, one of the registered kinds (maescale/data_kinds.py; maescale.data.register_kind adds "
        "one): " + kinds_help() + "."
    )
    path: Optional[str] = opt(
        None,
        "Dataset root for kind=folder: <root>/<class>/*.jpg or a split folder; for kind=ffcv a .beton file or a folder "
        "of <split>.beton; for kind=shards a folder of .tar shards (or of <split>/ folders of them), a brace pattern "
        "(/data/{00000..00999}.tar; https:// addresses, or pipe:CMD for shards a command streams) or a list file "
        "(.txt, one shard a line, or a shard index .json); '{split}' in them stands for the split."
    )
    batch_size: int = opt(64, "Images per process per micro-batch.")
    num_workers: int = opt(
        2,
        "DataLoader worker processes per process (0 = load in the main process); kind=ffcv: decoding threads (0 counts "
        "as 1)."
    )
    decode: Literal["cpu", "gpu"] = opt(
        "cpu",
        "Where pictures are decoded and augmented. cpu: in the worker processes. gpu: the workers only read file "
        "bytes; each batch's JPEGs are decoded and given the crop, flip and normalisation on this process's device "
        "(nvJPEG on a GPU, the CPU without one), for when CPU workers cannot feed the GPUs (`maescale plan` prints "
        "whether they can). kind=folder and kind=shards, RGB pictures."
    )
    shuffle_buffer: int = opt(
        2048,
        "kind=shards: samples each worker shuffles together (rounded to whole batches); larger mixes more shards "
        "into a batch and holds more file bytes in memory (about this many files per worker)."
    )
    synthetic_size: int = opt(20000, "Number of images of the synthetic dataset.")
    crop_min_scale: float = opt(
        0.2,
        "Lower area bound of RandomResizedCrop (paper: 0.2 for pretraining, 0.08 for fine-tuning and linear probing, "
        "the default of the evaluation commands).",
    )
    mean: Optional[list[float]] = opt(
        None,
        "Per-channel mean the images are normalised with, one value per model.in_chans, in the units of the loaded "
        "pixels (pictures / 255, unsigned integer files / their type's maximum, float files as is); null = for "
        "kind=folder the mean in <data.path>/maescale_stats.yaml when present (written by `maescale stats`), else "
        "ImageNet's (0.485, 0.456, 0.406) for 3 channels."
    )
    std: Optional[list[float]] = opt(
        None,
        "Per-channel standard deviation, like data.mean; null = the std of the same file, else ImageNet's (0.229, "
        "0.224, 0.225) for 3 channels."
    )
    ffcv_order: Literal["random", "quasi_random"] = opt(
        "random",
        "kind=ffcv: epoch order; quasi_random shuffles within pages for files larger than RAM (needs "
        "ffcv_os_cache=false)."
    )
    ffcv_os_cache: bool = opt(
        True,
        "kind=ffcv: read through the OS page cache (fastest when the file fits in RAM); false reads pages into process "
        "memory."
    )


@dataclass
class OptimConfig:
    blr: float = opt(1.5e-4, "Base learning rate; lr = blr * effective_batch / 256.")
    lr: Optional[float] = opt(None, "Absolute learning rate; overrides blr when set.")
    min_lr: float = opt(0.0, "Floor of the cosine schedule.")
    weight_decay: float = opt(0.05, "AdamW weight decay (not applied to biases and 1-D parameters).")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.95, "AdamW beta2 (paper: 0.95).")
    clip_grad: Optional[float] = opt(None, "Clip the global gradient norm to this value; None = no clipping.")
    fused: bool = opt(
        True,
        "Use the fused AdamW kernel: one kernel for all parameters, faster than the per-tensor loop on CPU and GPU "
        "(measured in docs/BENCHMARKS.md); false uses torch's default implementation."
    )


@dataclass
class ScheduleConfig:
    epochs: int = opt(800, "Training epochs; the cosine schedule spans all of them.")
    warmup_epochs: float = opt(40, "Linear warmup length in epochs, applied per iteration.")


@dataclass
class TrainConfig:
    max_steps: Optional[int] = opt(
        None,
        "Stop after this many optimizer steps (schedule still spans `epochs`); 0 writes only the step-0 checkpoint, "
        "the model's random initialisation (a baseline for the evaluation commands).",
    )
    accum_iter: int = opt(1, "Micro-batches accumulated per optimizer step.")
    precision: Literal["fp32", "bf16"] = opt("fp32", "bf16 runs the forward under bf16 autocast.")
    compile: bool = opt(False, "torch.compile the model.")
    nonfinite: Literal["stop", "skip"] = opt(
        "stop",
        "On a NaN/inf loss: 'stop' (checked on logging and checkpoint steps, no extra sync) or 'skip' the update "
        "(checks loss and gradients every step: one host sync per step)."
    )
    max_nonfinite_skips: int = opt(
        10,
        "With train.nonfinite=skip: stop once more updates than this were skipped in one run."
    )
    log_every: int = opt(10, "Optimizer steps between metric lines (the only host syncs of the loop).")
    figure_every: Optional[int] = opt(
        None,
        "Optimizer steps between reconstruction figures; the last step always gets one."
    )
    figure_channels: Optional[list[int]] = opt(
        None,
        "Image channels the reconstruction figures show: three indices are drawn as the red, green and blue of one "
        "picture, any other count draws each listed channel as a grey row of its own; null = [0, 1, 2] when "
        "model.in_chans >= 3, else every channel in grey."
    )


@dataclass
class ParallelConfig:
    strategy: Literal[tuple(STRATEGIES)] = opt(
        "ddp",
        "How the processes share the model (maescale/layout.py): "
        + "; ".join(f"{name}: {what}" for name, what in STRATEGIES.items())
        + ". On one process ddp and fsdp2 train the model whole (nothing to shard; the checkpoints resume "
        "sharded), unless parallel.cpu_offload."
    )
    activation_checkpointing: Literal[False, True, "selective"] = opt(
        False,
        "true recomputes each transformer block in the backward pass (least memory, ~1/3 more compute); "
        "selective keeps each block's matmul and attention outputs and recomputes the rest (norms, GELU, adds: "
        "a few % more compute for part of the saving)."
    )
    replicate_degree: Optional[int] = opt(
        None,
        "hsdp: groups the model is replicated across, each sharding it over its processes; must divide the "
        "process count; null = the number of nodes (shard inside a node, replicate across nodes)."
    )
    cpu_offload: bool = opt(
        False,
        "fsdp2/hsdp: keep sharded weights, gradients and optimizer state in host memory and step the optimizer "
        "there (fits larger models on fewer GPUs, slower steps)."
    )
    backend: Literal["auto", "nccl", "gloo"] = opt(
        "auto",
        "Process-group backend: auto picks nccl when every process on the node has a GPU of its own, "
        "otherwise gloo with the processes computing on the CPU (e.g. 2-process tests on a 1-GPU machine); "
        "nccl or gloo forces it."
    )
    blocks_per_unit: int = opt(
        4,
        "fsdp2/hsdp: encoder blocks sharded together as one unit (one all-gather and one reduce-scatter per "
        "step each); fewer units cost less host time per step (docs/ARCHIVE.md), each holds that many "
        "gathered blocks at a time."
    )
    reshard_after_forward: bool = opt(
        False,
        "fsdp2/hsdp: true frees the encoder's gathered weights after forward and gathers them again in backward "
        "(least memory, for models whose bf16 weights do not fit beside the activations); false keeps them "
        "until backward (one all-gather per unit per step instead of two, measured faster: docs/ARCHIVE.md)."
    )


@dataclass
class CheckpointConfig:
    every_steps: int = opt(1000, "Optimizer steps between checkpoints; one is also written at the end.")
    keep_last: int = opt(3, "Number of step checkpoints to keep (older ones are deleted).")
    resume: str = opt(
        "auto",
        "'auto' resumes from the newest complete checkpoint in output_dir, 'none' starts fresh, or a checkpoint folder "
        "path."
    )


Pool = Literal["cls", "mean"]


def pool_option() -> Any:
    """The image feature of the kNN monitor and the evaluation commands: one default for both."""
    return opt(
        "mean",
        "Feature of an image: the mean of the patch tokens, or the cls token (the paper's linear probe). On CIFAR-10 "
        "mean is 3-4 points better in kNN and equal in the linear probe (docs/RESULTS.md).",
    )


@dataclass
class KnnConfig:
    k: int = opt(20, "Neighbours that vote (Wu et al. 2018; DINO, Caron et al. 2021: 20).")
    temperature: float = opt(0.07, "Vote weight exp(cosine / temperature) (same references: 0.07).")


@dataclass
class MonitorConfig(KnnConfig):
    """The kNN protocol of `maescale knn` (k, temperature, pool) on fewer images, during pretraining."""

    knn_every: Optional[int] = opt(
        None,
        "Optimizer steps between kNN checks of the encoder on labelled held-out images (null = off; one also runs "
        "at the end): top-1/top-5 go to metrics.jsonl as knn_top1/knn_top5.",
    )
    bank_split: str = opt(
        "train",
        "Split whose center crops form the kNN bank (folder: <data.path>/<split>; synthetic: train or val)."
    )
    val_split: str = opt("val", "Split classified by its neighbours in the bank (e.g. val, or test for CIFAR-10).")
    bank_images: int = opt(5000, "Evenly spaced images of bank_split encoded at each check.")
    val_images: int = opt(1000, "Evenly spaced images of val_split classified at each check.")
    allow_same_images: bool = opt(
        False,
        "Check even when bank_split and val_split read the same images (e.g. a data.path without split folders): "
        "the kNN accuracy is then measured on bank images.",
    )
    pool: Pool = pool_option()


@dataclass
class Config:
    output_dir: str = opt("runs/demo", "Run folder: config.yaml, metrics.jsonl, tensorboard/, figures/, checkpoints/.")
    seed: int = opt(0, "Seed of the data order, augmentation, masks and initialisation.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


DERIVED = "derived"


# ---------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), schema: type = None
) -> Any:
    """Build a validated config from defaults, an optional YAML file and `key=value` overrides.

    `schema` is the root dataclass (default: the pretraining Config); other roots, such as the
    evaluation config, bring their own `validate()` method.
    """
    cfg = (schema or Config)()
    if path is not None:
        tree = read_yaml_file(Path(path))
        tree.pop(DERIVED, None)  # informational values written by save_resolved
        if isinstance(tree.get("parallel"), dict):
            tree["parallel"] = translate_legacy_parallel(tree["parallel"], str(path))
        _merge_tree(cfg, tree, prefix="")
    for item in overrides:
        key, value = _split_override(item)
        set_key(cfg, key, _parse_yaml(value, f"override {item!r}") if value != "" else "")
    validate(cfg) if isinstance(cfg, Config) else cfg.validate()
    return cfg


def read_yaml_file(path: Path) -> dict:
    """The mapping a YAML config file holds; a missing file or bad YAML is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    tree = _parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(tree).__name__}")
    return tree


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.blr=1e-4")
    key, value = item.split("=", 1)
    key, value = key.strip(), value.strip()
    legacy = legacy_override_error(key, value)
    if legacy:
        raise ConfigError(legacy)
    return key, value


def _merge_tree(node: Any, tree: dict, prefix: str) -> None:
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and dataclasses.is_dataclass(_child(node, key, full)):
            _merge_tree(getattr(node, key), value, prefix=f"{full}.")
        else:
            set_key(node, key, value, full_key=full)


def _child(node: Any, key: str, full_key: str) -> Any:
    names = [f.name for f in dataclasses.fields(node)]
    if key not in names:
        raise ConfigError(_unknown_key_message(full_key, key, names))
    return getattr(node, key)


def _unknown_key_message(full_key: str, key: str, names: list[str]) -> str:
    prefix = full_key[: -len(key)]
    by_lower = {name.lower(): name for name in names}
    close = [by_lower[m] for m in difflib.get_close_matches(key.lower(), list(by_lower), n=1)]
    hint = (
        f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys here: {', '.join(prefix + n for n in names)}"
    )
    return f"unknown config key {full_key!r}{hint}"


def set_key(node: Any, key: str, value: Any, full_key: str | None = None) -> None:
    """Set a dotted `key` under dataclass `node`, converting `value` to the field's type."""
    full_key = full_key or key
    *parents, leaf = key.split(".")
    walked = full_key[: len(full_key) - len(key)]
    for part in parents:
        walked += part
        node = _child(node, part, walked)
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"config key {walked!r} is a value, not a section")
        walked += "."
    _child(node, leaf, walked + leaf)
    hint = typing.get_type_hints(type(node))[leaf]
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"config key {walked + leaf!r} is a section; set its keys, e.g. {walked + leaf}.<key>=...")
    setattr(node, leaf, _coerce(value, hint, walked + leaf))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type `hint`, converting only lossless cases (int->float, '1e-4'->float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce_to_first_fit(value, [a for a in args if a is not type(None)], key)
    if origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    elif origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _coerce_to_first_fit(value: Any, hints: list[Any], key: str) -> Any:
    """`value` as the first of `hints` it converts to (e.g. an int, else a list of ints)."""
    if len(hints) == 1:
        return _coerce(value, hints[0], key)  # its own message is the most precise
    for hint in hints:
        try:
            return _coerce(value, hint, key)
        except ConfigError:
            continue
    expected = " or ".join(_type_name(hint) for hint in hints)
    raise ConfigError(f"{key} must be {expected}, got {value!r} ({type(value).__name__})")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


# ---------------------------------------------------------------- validation


def raise_first_failure(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first check that is False."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _device_decode_kinds() -> str:
    return ", ".join(name for name in kind_names() if data_kind(name).device_decode)


def check_data(data: DataConfig) -> None:
    """The data checks of every command and of `build_loader`: their one home. The kind must be
    registered (maescale/data_kinds.py); the checks of its own keys follow the generic ones."""
    kind = data_kind(data.kind)
    raise_first_failure([
        (data.batch_size > 0, "data.batch_size must be positive"),
        (data.num_workers >= 0, "data.num_workers must be >= 0"),
        (0.0 < data.crop_min_scale <= 1.0, "data.crop_min_scale must be in (0, 1]"),
        ((data.mean is None) == (data.std is None),
         "data.mean and data.std go together: set both (one value per image channel each) or neither"),
        (len(data.mean or ()) == len(data.std or ()),
         f"data.mean has {len(data.mean or ())} values but data.std {len(data.std or ())}: one per image channel each"),
        (data.mean is None or len(data.mean) > 0, "data.mean and data.std need one value per image channel"),
        (all(value > 0 for value in data.std or ()), f"data.std values must be positive, got {data.std}"),
        (data.shuffle_buffer > 0, "data.shuffle_buffer must be positive"),
        (data.decode == "cpu" or kind.device_decode,
         f"data.decode=gpu needs a kind whose workers hand over picture files ({_device_decode_kinds()}); "
         f"data.kind={data.kind} does not: use data.decode=cpu"),
    ])
    kind.check(data)


def check_image_size(size: Any, key: str, patch_size: int | None = None) -> None:
    """`size` (the config value of `key`) is null, an int or [height, width], each side a multiple of
    `patch_size` when that is known."""
    if size is None:
        return
    try:
        height, width = image_hw(size, key)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if patch_size is not None and (height % patch_size or width % patch_size):
        raise ConfigError(f"{key}={size} is not divisible by patch_size={patch_size}")


def knn_checks(knn: KnnConfig, section: str) -> list[tuple[bool, str]]:
    return [
        (knn.k > 0, f"{section}.k must be positive"),
        (knn.temperature > 0, f"{section}.temperature must be positive"),
    ]


def validate(cfg: Config) -> None:
    """Reject impossible values with the key's name, before any work starts."""
    check_data(cfg.data)
    raise_first_failure(
        [
            (0.0 < cfg.model.mask_ratio < 1.0, "model.mask_ratio must be in (0, 1)"),
            (cfg.optim.blr > 0, "optim.blr must be positive"),
            (cfg.optim.lr is None or cfg.optim.lr > 0, "optim.lr must be positive"),
            (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (cfg.optim.clip_grad is None or cfg.optim.clip_grad > 0, "optim.clip_grad must be positive or null"),
            (cfg.schedule.epochs > 0, "schedule.epochs must be positive"),
            (
                0 <= cfg.schedule.warmup_epochs <= cfg.schedule.epochs,
                "schedule.warmup_epochs must be in [0, schedule.epochs]",
            ),
            (
                cfg.train.max_steps is None or cfg.train.max_steps >= 0,
                "train.max_steps must be >= 0 or null (0 writes the step-0 checkpoint: the random initialisation)",
            ),
            (cfg.train.accum_iter > 0, "train.accum_iter must be positive"),
            (cfg.train.log_every > 0, "train.log_every must be positive"),
            (
                cfg.train.figure_every is None or cfg.train.figure_every > 0,
                "train.figure_every must be positive or null",
            ),
            (cfg.parallel.blocks_per_unit > 0, "parallel.blocks_per_unit must be positive"),
            (cfg.train.max_nonfinite_skips >= 0, "train.max_nonfinite_skips must be >= 0"),
            (
                cfg.train.nonfinite == "stop" or not zero_stage_of(cfg.parallel.strategy),
                f"train.nonfinite=skip is not available with parallel.strategy={cfg.parallel.strategy} "
                "(DeepSpeed's engine steps inside backward)",
            ),
            (cfg.checkpoint.every_steps > 0, "checkpoint.every_steps must be positive"),
            (cfg.checkpoint.keep_last > 0, "checkpoint.keep_last must be positive"),
            (cfg.monitor.knn_every is None or cfg.monitor.knn_every > 0, "monitor.knn_every must be positive or null"),
            (cfg.monitor.bank_images > 0, "monitor.bank_images must be positive"),
            (cfg.monitor.val_images > 0, "monitor.val_images must be positive"),
            *knn_checks(cfg.monitor, "monitor"),
            (cfg.model.in_chans >= 1, "model.in_chans must be >= 1"),
            *figure_channel_checks(cfg.train.figure_channels, cfg.model.in_chans),
        ]
    )
    check_image_size(cfg.model.img_size, "model.img_size", cfg.model.patch_size)
    check_strategy_settings(cfg.parallel.strategy, cfg.parallel.replicate_degree, cfg.parallel.cpu_offload)


def figure_channel_checks(channels: list[int] | None, in_chans: int) -> list[tuple[bool, str]]:
    return [
        (channels is None or len(channels) > 0, "train.figure_channels must name at least one channel, or be null"),
        (all(0 <= c < in_chans for c in channels or ()),
         f"train.figure_channels={channels} names channels outside 0..{in_chans - 1} (model.in_chans={in_chans})"),
    ]


def required_extras(cfg: Any) -> list[tuple[str, str, str]]:
    """(module, extra, what needs it) for the optional packages a config uses."""
    needed = []
    strategy = getattr(getattr(cfg, "parallel", None), "strategy", "ddp")
    if zero_stage_of(strategy):
        needed.append(("deepspeed", "deepspeed", f"parallel.strategy={strategy}"))
    extra = data_kind(cfg.data.kind).extra
    if extra:
        needed.append((extra.module, extra.extra, f"data.kind={cfg.data.kind}"))
    return needed


# ---------------------------------------------------------------- output


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Config, path: str | Path, derived: dict) -> None:
    """Write the config plus derived values (lr, effective batch) next to the run."""
    tree = to_dict(cfg)
    tree[DERIVED] = derived
    Path(path).write_text(yaml.safe_dump(tree, sort_keys=False))


def describe_keys(node: Any = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf key, for `--help`."""
    node = Config() if node is None else node
    rows = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_keys(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("help", "")))
    return rows
