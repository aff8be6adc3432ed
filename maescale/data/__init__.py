"""Data pipeline: the Loader interface, its kinds (synthetic, folder, ffcv), MAE augmentation, seeding."""

from .base import Batch, Loader, PlannedLoader
from .folder import ImageFolderDataset
from .loader import LOADER_BUILDERS, EpochLoader, build_loader, first_images
from .seeding import Stream, derive_seed, sample_mask_seed, seeded_generator
from .synthetic import SyntheticShapes
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MAETrainTransform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LOADER_BUILDERS",
    "Batch",
    "EpochLoader",
    "EvalTransform",
    "ImageFolderDataset",
    "Loader",
    "MAETrainTransform",
    "PlannedLoader",
    "Stream",
    "SyntheticShapes",
    "build_loader",
    "derive_seed",
    "first_images",
    "sample_mask_seed",
    "seeded_generator",
]
