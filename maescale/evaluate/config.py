"""Typed configuration of the evaluation protocols (linprobe, knn, finetune).

One tree for the three commands: each reads `encoder`, `data` and the splits, plus its own
section. Loaded like the pretraining config (defaults <- YAML <- key=value overrides), so an
unknown key or a wrong type fails with the key's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..config import (
    CheckpointConfig,
    DataConfig,
    KnnConfig,
    ParallelConfig,
    Pool,
    check_data,
    check_image_size,
    knn_checks,
    opt,
    pool_option,
    raise_first_failure,
)
from ..data_kinds import data_kind
from ..errors import ConfigError
from ..layout import check_strategy_settings, zero_stage_of


@dataclass
class EncoderConfig:
    ckpt: Optional[str] = opt(
        None,
        "Weights to evaluate: a maescale checkpoint folder (output_dir/checkpoints/step_XXXXXXXX, any strategy), "
        "a .safetensors file (export --format consolidated or timm) or an official MAE .pth ({'model': state_dict}); "
        "null = random initialisation, the baseline.",
    )
    model: Optional[str] = opt(
        None,
        "Named MAE configuration; null takes it from the checkpoint's run config.yaml "
        "(needed for files and random init).",
    )
    pool: Pool = pool_option()
    img_size: Optional[Union[int, list[int]]] = opt(
        None,
        "Resolution the encoder runs at: an int or [height, width], multiples of its patch size; the fixed sin-cos "
        "position table is recomputed for the new patch grid. null keeps the checkpoint's (its run's model.img_size).",
    )


@dataclass
class LinprobeConfig:
    batch_size: int = opt(16384, "Global batch of the head (paper: 16384); lr = blr * batch_size / 256.")
    blr: Optional[float] = opt(
        None,
        "Base learning rate of LARS; null keeps the paper's budget on any data size: 0.1 x 1.28M images x 90 epochs "
        "/ (training images x linprobe.epochs), as LARS moves the head by about blr x images x epochs / 256 x 1e-3 "
        "of its norm.",
    )
    lr: Optional[float] = opt(None, "Absolute learning rate; overrides blr when set.")
    min_lr: float = opt(0.0, "Floor of the cosine schedule.")
    weight_decay: float = opt(0.0, "LARS weight decay (paper: 0).")
    momentum: float = opt(0.9, "LARS momentum.")
    epochs: int = opt(90, "Training epochs of the head (paper: 90).")
    warmup_epochs: float = opt(10, "Linear warmup in epochs (paper: 10).")
    augment: bool = opt(
        False,
        "RandomResizedCrop + flip on the training images, as the paper does: runs the frozen encoder at every step. "
        "false extracts the center-crop features once and trains the head on them (same head, lr rule and schedule; "
        "far cheaper on CPU).",
    )


@dataclass
class FinetuneConfig:
    img_size: Optional[Union[int, list[int]]] = opt(
        None,
        "Fine-tuning resolution, an int or [height, width]; the position embedding starts from the sin-cos table "
        "of the new patch grid. None keeps the encoder's."
    )
    blr: float = opt(
        5e-4,
        "Base learning rate of AdamW (paper: 5e-4 for ViT-B, 1e-3 for L/H); lr = blr * global batch / 256."
    )
    lr: Optional[float] = opt(None, "Absolute learning rate; overrides blr when set.")
    min_lr: float = opt(1e-6, "Floor of the cosine schedule.")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases, norms, tokens and position embeddings).")
    layer_decay: float = opt(
        0.75,
        "Layer-wise lr decay: block i of L gets decay^(L + 1 - (i + 1)) (paper: 0.65 for ViT-B, 0.75 for L/H)."
    )
    drop_path: float = opt(0.1, "Stochastic depth rate of the last block (paper: 0.1 for ViT-B, 0.2 for L/H).")
    mixup: float = opt(0.8, "Mixup alpha; 0 turns mixup off (paper: 0.8).")
    cutmix: float = opt(1.0, "CutMix alpha; 0 turns cutmix off (paper: 1.0).")
    label_smoothing: float = opt(0.1, "Label smoothing (paper: 0.1).")
    rand_augment_ops: int = opt(
        2,
        "RandAugment: ops applied to each training crop (timm's rand-m9-mstd0.5-inc1 set, each with probability "
        "0.5, drawn per sample from the run's seed); 0 turns it off, e.g. for a quick check on tiny images or for "
        "images of other than 3 channels (paper: RandAug (9, 0.5), 2 ops).",
    )
    rand_augment_magnitude: float = opt(9.0, "RandAugment magnitude, of 10 (paper: 9).")
    rand_augment_magnitude_std: float = opt(
        0.5, "Standard deviation of the magnitude, drawn per op and clipped to [0, 10] (paper: 0.5)."
    )
    random_erasing: float = opt(
        0.25,
        "Probability of erasing a random rectangle of a training image (2-33% of it, all channels) with noise; "
        "0 turns it off, e.g. for a quick check on tiny images (paper: 0.25).",
    )
    epochs: int = opt(100, "Training epochs (paper: 100 for ViT-B, 50 for L/H).")
    warmup_epochs: float = opt(5, "Linear warmup in epochs (paper: 5).")
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps (the schedule still spans `epochs`).")
    clip_grad: Optional[float] = opt(None, "Clip the global gradient norm to this value; None = no clipping.")
    beta2: float = opt(0.999, "AdamW beta2 (paper: 0.999 fine-tuning; 0.95 training from scratch, Table 11).")
    ema_decay: Optional[float] = opt(
        None,
        "Keep an exponential moving average of the weights with this decay and evaluate and save it (e.g. 0.9999, "
        "the paper's from-scratch recipe); null = off, as the paper's fine-tuning."
    )
    precision: Literal["fp32", "bf16"] = opt("fp32", "bf16: autocast for a whole model, bf16 compute under FSDP2.")
    log_every: int = opt(10, "Optimizer steps between metric lines.")


@dataclass
class EvalConfig:
    output_dir: str = opt("runs/eval", "Folder for config.yaml, metrics.jsonl and the outputs of the protocol.")
    seed: int = opt(0, "Seed of the data order, augmentation, head initialisation and of a random-init encoder.")
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # Linear probing and fine-tuning crop with the usual RandomResizedCrop scale (0.08, 1).
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_min_scale=0.08))
    train_split: str = opt("train", "Split of data.path (or synthetic split) the head / kNN bank is trained on.")
    val_split: str = opt("val", "Split evaluated with a center crop, e.g. 'test' for CIFAR-10.")
    allow_same_images: bool = opt(
        False,
        "Evaluate even when train_split and val_split read the same images (e.g. a data.path without split folders, "
        "which serves every split from its root): the accuracy is then measured on the training images.",
    )
    linprobe: LinprobeConfig = field(default_factory=LinprobeConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Fine-tuning only: how the processes share the classifier, and its checkpoints.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        """Reject impossible values with the key's name, before any work starts."""
        lp, ft = self.linprobe, self.finetune
        check_data(self.data)
        if not self.allow_same_images:
            refuse_same_images(self.data, ("train_split", self.train_split), ("val_split", self.val_split),
                               "allow_same_images")
        check_image_size(self.encoder.img_size, "encoder.img_size")
        check_image_size(ft.img_size, "finetune.img_size")
        check_strategy_settings(self.parallel.strategy, self.parallel.replicate_degree, self.parallel.cpu_offload)
        raise_first_failure(
            [
                (
                    self.encoder.ckpt is not None or self.encoder.model,
                    "encoder.model is required when encoder.ckpt is null (random init)",
                ),
                (lp.batch_size > 0, "linprobe.batch_size must be positive"),
                (
                    (lp.blr is None or lp.blr > 0) and (lp.lr is None or lp.lr > 0),
                    "linprobe.blr and linprobe.lr must be positive",
                ),
                (
                    lp.epochs > 0 and 0 <= lp.warmup_epochs <= lp.epochs,
                    "linprobe.warmup_epochs must be in [0, linprobe.epochs]",
                ),
                *knn_checks(self.knn, "knn"),
                (ft.blr > 0 and (ft.lr is None or ft.lr > 0), "finetune.blr and finetune.lr must be positive"),
                (0 < ft.layer_decay <= 1, "finetune.layer_decay must be in (0, 1]"),
                (0 <= ft.drop_path < 1, "finetune.drop_path must be in [0, 1)"),
                (ft.mixup >= 0 and ft.cutmix >= 0, "finetune.mixup and finetune.cutmix must be >= 0"),
                (0 <= ft.label_smoothing < 1, "finetune.label_smoothing must be in [0, 1)"),
                (ft.rand_augment_ops >= 0, "finetune.rand_augment_ops must be >= 0"),
                (
                    0 <= ft.rand_augment_magnitude <= 10 and ft.rand_augment_magnitude_std >= 0,
                    "finetune.rand_augment_magnitude must be in [0, 10] and finetune.rand_augment_magnitude_std >= 0",
                ),
                (0 <= ft.random_erasing <= 1, "finetune.random_erasing must be in [0, 1]"),
                (
                    ft.epochs > 0 and 0 <= ft.warmup_epochs <= ft.epochs,
                    "finetune.warmup_epochs must be in [0, finetune.epochs]",
                ),
                (ft.max_steps is None or ft.max_steps > 0, "finetune.max_steps must be positive or null"),
                (ft.log_every > 0, "finetune.log_every must be positive"),
                (0 < ft.beta2 < 1, "finetune.beta2 must be in (0, 1)"),
                (ft.ema_decay is None or 0 < ft.ema_decay < 1, "finetune.ema_decay must be in (0, 1) or null"),
                (not zero_stage_of(self.parallel.strategy),
                 f"parallel.strategy={self.parallel.strategy} is for pretraining: maescale finetune runs ddp, "
                 "fsdp2 or hsdp"),
                (self.parallel.activation_checkpointing in (False, True),
                 "parallel.activation_checkpointing: maescale finetune takes true or false (selective is for "
                 "pretraining)"),
                (self.checkpoint.every_steps > 0 and self.checkpoint.keep_last > 0,
                 "checkpoint.every_steps and checkpoint.keep_last must be positive"),
                # timm's Mixup pairs each image with its mirror in the batch.
                (
                    ft.mixup == ft.cutmix == 0 or self.data.batch_size % 2 == 0,
                    "data.batch_size must be even with finetune.mixup or finetune.cutmix",
                ),
            ]
        )


def images_of_split(data: DataConfig, split: str) -> str:
    """Which images `split` of `data` reads, as its kind resolves it: two splits with the same answer
    read the same images."""
    return data_kind(data.kind).images_of_split(data, split)


def refuse_same_images(data: DataConfig, train: tuple[str, str], val: tuple[str, str], allow_key: str) -> None:
    """A ConfigError when the (key, split) pairs `train` and `val` read the same images: an accuracy
    measured on the training images is no validation, unless `allow_key` says so."""
    (train_key, train_split), (val_key, val_split) = train, val
    source = images_of_split(data, train_split)
    if source != images_of_split(data, val_split):
        return
    raise ConfigError(
        f"{train_key}={train_split!r} and {val_key}={val_split!r} both read {source}: "
        f"give data.path separate {train_split}/ and {val_split}/ folders or name splits that differ, or set "
        f"{allow_key}=true to measure on the training images anyway"
    )
