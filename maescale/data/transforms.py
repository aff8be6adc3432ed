"""Image transforms for MAE pretraining and evaluation.

Every random decision is drawn from a ``torch.Generator`` handed in by the
caller, never from the global RNG: the loader seeds that generator from
(seed, epoch, sample index), which is what makes batches identical across
worker counts and lets a run resume bit-exactly in the middle of an epoch.

Images have any number of channels C, all cropped, flipped and resized together;
the output size is ``img_size`` (square) or a pair ``(height, width)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..sizes import image_hw
from .finetune_augment import FinetuneAugment, RandAugment, random_erase

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Evaluation keeps the central 0.875 of the resized image: resize 256, crop 224 (MAE's FINETUNE.md, timm).
EVAL_CROP_PCT = 0.875

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
    """Return a [C, H, W] uint8 or float tensor from a PIL image (as RGB) or tensor.

    uint8 stays uint8 so the resize can use torchvision's fast uint8 bicubic kernel.
    """
    if isinstance(img, Image.Image):
        tensor = F.pil_to_tensor(img.convert("RGB") if img.mode != "RGB" else img)
    elif isinstance(img, torch.Tensor):
        tensor = img
    else:
        raise TypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")
    if tensor.ndim != 3:
        raise ValueError(f"expected an image of shape [C, H, W], got {tuple(tensor.shape)}")
    return tensor


def _check_statistics(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _check_channels(image: torch.Tensor, mean: Sequence[float]) -> torch.Tensor:
    if image.shape[0] != len(mean):
        raise ValueError(
            f"an image of {image.shape[0]} channels cannot be normalised with statistics of {len(mean)} channels"
        )
    return image


def _to_normalised_float(
    image: torch.Tensor, mean: Sequence[float], std: Sequence[float], clip: bool = True
) -> torch.Tensor:
    """Scale to float32 (uint8: to [0, 1]) and normalise channel-wise.

    Bicubic overshoots: uint8 saturates at 0 and 255, and ``clip`` does the same for
    float inputs in [0, 1]; without it floats keep any range (values read from files).
    """
    if image.dtype == torch.uint8:
        image = F.to_dtype(image, torch.float32, scale=True)
    else:
        image = image.to(torch.float32)
        if clip:
            image = image.clamp_(0.0, 1.0)
    return F.normalize(image, list(mean), list(std))


class MAETrainTransform:
    """MAE pretraining augmentation: RandomResizedCrop, horizontal flip, normalise.

    Called as ``transform(img, generator)``; the output is a float32
    [C, height, width] tensor and depends only on ``img`` and the state of
    ``generator``. ``ratio`` bounds the crop's aspect ratio relative to the
    output's (width / height), so a rectangular output is no more stretched than
    a square one. ``clip``: see ``_to_normalised_float``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        clip: bool = True,
    ) -> None:
        self.size = image_hw(img_size)
        self.scale = _check_range("scale", scale)
        self.ratio = _check_range("ratio", ratio)
        self.mean, self.std = _check_statistics(mean, std)
        self.clip = clip
        output_aspect = self.size[1] / self.size[0]
        self._box_ratio = (self.ratio[0] * output_aspect, self.ratio[1] * output_aspect)

    def __call__(self, img: Image.Image | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _to_normalised_float(self.crop_and_flip(img, generator), self.mean, self.std, self.clip)

    def crop_and_flip(self, img: Image.Image | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The random-resized crop, flipped half the time, in the input's dtype."""
        image = _check_channels(to_image_tensor(img), self.mean)
        height, width = image.shape[-2:]
        box = sample_crop_box(height, width, self.scale, self._box_ratio, generator)
        image = F.resized_crop(
            image,
            *box,
            size=list(self.size),
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        if torch.rand(1, generator=generator).item() < 0.5:
            image = F.horizontal_flip(image)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class FinetuneTrainTransform(MAETrainTransform):
    """Fine-tuning augmentation, timm's order: crop and flip, RandAugment on the 8-bit crop,
    normalise, random erasing; every draw from ``generator`` (data/finetune_augment.py)."""

    def __init__(self, img_size: int | Sequence[int], augment: FinetuneAugment, **kwargs) -> None:
        super().__init__(img_size, **kwargs)
        self.erasing = augment.random_erasing
        self.rand_augment = None
        if augment.rand_augment_ops > 0:
            fill = [round(255 * m) for m in self.mean]  # the mean colour, as timm fills
            self.rand_augment = RandAugment(
                augment.rand_augment_ops, augment.rand_augment_magnitude, augment.rand_augment_magnitude_std, fill
            )

    def __call__(self, img: Image.Image | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        image = self.crop_and_flip(img, generator)
        if self.rand_augment is not None:
            image = self.rand_augment(image, generator)
        image = _to_normalised_float(image, self.mean, self.std, self.clip)
        return random_erase(image, self.erasing, generator)


def cover_size(height: int, width: int, target: tuple[int, int]) -> list[int]:
    """[h, w] of the aspect-preserving resize of a height x width image that just covers ``target``
    (a centre crop of ``target`` then fits); for a square target, torchvision's short-side rule."""
    target_h, target_w = target
    if target_h * width >= target_w * height:  # the height needs the larger scale factor
        return [target_h, max(target_w, int(target_h * width / height))]
    return [max(target_h, int(target_w * height / width)), target_w]


class EvalTransform:
    """Deterministic eval transform: resize to cover size / crop_pct, centre crop to size.

    For a square size that is the usual rule (short side to img_size / crop_pct), rounded down as
    timm does: 224 -> 256, 32 -> 36.
    Accepts (and ignores) a generator so the loader can call every transform
    the same way.
    """

    def __init__(
        self,
        img_size: int | Sequence[int],
        crop_pct: float = EVAL_CROP_PCT,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        clip: bool = True,
    ) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size = image_hw(img_size)
        self.crop_pct = float(crop_pct)
        self.resize_size = tuple(int(math.floor(side / crop_pct)) for side in self.size)
        self.mean, self.std = _check_statistics(mean, std)
        self.clip = clip

    def __call__(
        self, img: Image.Image | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        image = _check_channels(to_image_tensor(img), self.mean)
        height, width = image.shape[-2:]
        image = F.resize(
            image, cover_size(height, width, self.resize_size), interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        image = F.center_crop(image, list(self.size))
        return _to_normalised_float(image, self.mean, self.std, self.clip)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, crop_pct={self.crop_pct})"
