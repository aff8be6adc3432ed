"""Data pipeline: the Loader interface, its kinds (registered in maescale/data_kinds.py: synthetic, folder,
ffcv, and any added with ``register_kind``), MAE augmentation, seeding."""

from ..data_kinds import DataKind, Extra, LoaderBuilder, kind_names, register_kind
from .base import Batch, Loader, PlannedLoader
from .finetune_augment import FinetuneAugment
from .folder import ImageFolderDataset
from .loader import EpochLoader, build_loader, first_images
from .seeding import Stream, derive_seed, sample_mask_seed, seeded_generator
from .synthetic import SyntheticShapes
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MAETrainTransform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Batch",
    "DataKind",
    "EpochLoader",
    "EvalTransform",
    "Extra",
    "FinetuneAugment",
    "ImageFolderDataset",
    "Loader",
    "LoaderBuilder",
    "MAETrainTransform",
    "PlannedLoader",
    "Stream",
    "SyntheticShapes",
    "build_loader",
    "derive_seed",
    "first_images",
    "kind_names",
    "register_kind",
    "sample_mask_seed",
    "seeded_generator",
]
