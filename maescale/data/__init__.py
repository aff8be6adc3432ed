"""Data pipeline: datasets, MAE augmentation and the deterministic epoch loader."""

from .folder import ImageFolderDataset
from .loader import LOADER_BUILDERS, Batch, EpochLoader, UnreadableImageWarning, build_loader, first_images
from .synthetic import SyntheticShapes
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MAETrainTransform

__all__ = [
    "Batch",
    "EpochLoader",
    "EvalTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "LOADER_BUILDERS",
    "MAETrainTransform",
    "SyntheticShapes",
    "UnreadableImageWarning",
    "build_loader",
    "first_images",
]
