"""Image transforms for MAE pretraining and evaluation.

Every random decision is drawn from a ``torch.Generator`` handed in by the
caller, never from the global RNG: the loader seeds that generator from
(seed, epoch, sample index), which is what makes batches identical across
worker counts and lets a run resume bit-exactly in the middle of an epoch.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's RandomResizedCrop makes this many attempts before falling back.
CROP_ATTEMPTS = 10

class CropBox(NamedTuple):
    """A crop rectangle in pixel coordinates of the source image."""

    top: int
    left: int
    height: int
    width: int


def _check_range(name: str, bounds: Sequence[float]) -> tuple[float, float]:
    """Validate a (low, high) pair of positive floats."""
    low, high = (float(b) for b in bounds)
    if not 0 < low <= high:
        raise ValueError(f"{name} must satisfy 0 < low <= high, got {tuple(bounds)}")
    return low, high


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> CropBox:
    """Draw a RandomResizedCrop box with torchvision's sampling rule.

    Up to ``CROP_ATTEMPTS`` tries of an area fraction uniform in ``scale`` and an
    aspect ratio (width / height) log-uniform in ``ratio``; if none fits, a
    centre crop of the whole image clamped to the ratio range.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    # One draw for all attempts: a single small op is far cheaper than 40.
    draws = torch.rand(CROP_ATTEMPTS, 4, generator=generator).tolist()
    for u_area, u_ratio, u_top, u_left in draws:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = min(int(u_top * (height - crop_h + 1)), height - crop_h)
            left = min(int(u_left * (width - crop_w + 1)), width - crop_w)
            return CropBox(top, left, crop_h, crop_w)
    return _fallback_center_box(height, width, ratio)


def _fallback_center_box(height: int, width: int, ratio: tuple[float, float]) -> CropBox:
    """Largest centred box whose aspect ratio is clamped into ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, max(1, round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, max(1, round(height * ratio[1]))
    else:
        crop_h, crop_w = height, width
    return CropBox((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)


def to_image_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """Return a [3, H, W] uint8 or float tensor from a PIL image or tensor.

    Float tensors are expected in [0, 1]; uint8 stays uint8 so the resize can
    use torchvision's fast uint8 bicubic kernel.
    """
    if isinstance(img, Image.Image):
        tensor = F.pil_to_tensor(img.convert("RGB") if img.mode != "RGB" else img)
    elif isinstance(img, torch.Tensor):
        tensor = img
    else:
        raise TypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3, H, W], got {tuple(tensor.shape)}")
    return tensor


def _to_normalised_float(
    image: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Scale to float32 in [0, 1] and normalise channel-wise."""
    if image.dtype == torch.uint8:
        image = F.to_dtype(image, torch.float32, scale=True)
    else:
        # Bicubic overshoots on float inputs; clamp like the uint8 path does.
        image = image.to(torch.float32).clamp_(0.0, 1.0)
    return F.normalize(image, list(mean), list(std))


class MAETrainTransform:
    """MAE pretraining augmentation: RandomResizedCrop, horizontal flip, normalise.

    Called as ``transform(img, generator)``; the output is a float32
    [3, img_size, img_size] tensor and depends only on ``img`` and the state of
    ``generator``.
    """

    def __init__(
        self,
        img_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.img_size = int(img_size)
        self.scale = _check_range("scale", scale)
        self.ratio = _check_range("ratio", ratio)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, img: Image.Image | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        image = to_image_tensor(img)
        height, width = image.shape[-2:]
        box = sample_crop_box(height, width, self.scale, self.ratio, generator)
        image = F.resized_crop(
            image,
            *box,
            size=[self.img_size, self.img_size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        if torch.rand(1, generator=generator).item() < 0.5:
            image = F.horizontal_flip(image)
        return _to_normalised_float(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"MAETrainTransform(img_size={self.img_size}, scale={self.scale}, ratio={self.ratio})"


class EvalTransform:
    """Deterministic eval transform: resize short side to img_size / crop_pct, centre crop.

    Accepts (and ignores) a generator so the loader can call every transform
    the same way.
    """

    def __init__(
        self,
        img_size: int,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.img_size = int(img_size)
        self.crop_pct = float(crop_pct)
        self.resize_size = int(math.floor(img_size / crop_pct))
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(
        self, img: Image.Image | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        image = to_image_tensor(img)
        image = F.resize(
            image, [self.resize_size], interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        image = F.center_crop(image, [self.img_size, self.img_size])
        return _to_normalised_float(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(img_size={self.img_size}, crop_pct={self.crop_pct})"
