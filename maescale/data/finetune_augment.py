"""Fine-tuning's extra augmentation (He et al. 2021, Table 9): RandAugment (9, 0.5) and random erasing 0.25.

timm's ``rand-m9-mstd0.5-inc1`` and ``RandomErasing(mode='pixel')`` draw from Python's, numpy's and
torch's global random state, which differs between DataLoader workers and after a resume. These are
the same operations (timm's increasing-magnitude op set, its magnitude rules, probability 0.5 per
op, the fill of the mean colour; erasing of 2-33% of the area with aspect ratios in [0.3, 3.3],
filled with unit Gaussian noise after normalisation), with every decision drawn from the generator
the loader seeds per sample with (seed, epoch, index): an augmented image depends on nothing else.
One difference: torchvision's tensor kernels rotate, shear and translate bilinearly (timm: bicubic).

RandAugment is defined on 8-bit RGB pictures (contrast, saturation, solarize ... assume them), so
it refuses other images; random erasing works on any number of channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..errors import ConfigError, DataError

MAX_LEVEL = 10.0  # RandAugment magnitudes run from 0 to 10
OP_PROBABILITY = 0.5  # timm's default chance of applying each chosen op
ERASE_AREA = (0.02, 1 / 3)  # fraction of the image one erasing covers
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
ERASE_ATTEMPTS = 10


@dataclass(frozen=True)
class FinetuneAugment:
    """What fine-tuning adds to the crop and flip of training images (``finetune.*`` keys)."""

    rand_augment_ops: int = 2
    rand_augment_magnitude: float = 9.0
    rand_augment_magnitude_std: float = 0.5
    random_erasing: float = 0.25

    @classmethod
    def from_config(cls, finetune_cfg: Any) -> FinetuneAugment:
        return cls(
            finetune_cfg.rand_augment_ops, finetune_cfg.rand_augment_magnitude,
            finetune_cfg.rand_augment_magnitude_std, finetune_cfg.random_erasing,
        )

    @property
    def active(self) -> bool:
        return self.rand_augment_ops > 0 or self.random_erasing > 0

    def check_channels(self, in_chans: int) -> None:
        if self.rand_augment_ops > 0 and in_chans != 3:
            raise ConfigError(
                f"finetune.rand_augment_ops must be 0 for {in_chans}-channel images: RandAugment's colour ops are "
                "defined on RGB pictures (finetune.random_erasing works on any channel count)"
            )


# ---------------------------------------------------------------- RandAugment's ops

Op = Callable[[torch.Tensor, float, bool, list[float]], torch.Tensor]


def _signed(value: float, negate: bool) -> float:
    return -value if negate else value


def _enhance_factor(level: float, negate: bool) -> float:
    """timm's increasing enhancement: 1 -/+ up to 0.9, kept >= 0.1."""
    return max(0.1, 1.0 + _signed(level / MAX_LEVEL * 0.9, negate))


def _affine(image: torch.Tensor, fill: list[float], **kwargs: Any) -> torch.Tensor:
    params = {"angle": 0.0, "translate": [0.0, 0.0], "scale": 1.0, "shear": [0.0, 0.0], **kwargs}
    return F.affine(image, interpolation=InterpolationMode.BILINEAR, fill=fill, **params)


def _on_axis(value: float, axis: int) -> list[float]:
    """[value, 0] for x (axis 0), [0, value] for y."""
    return [value, 0.0] if axis == 0 else [0.0, value]


def _shear(axis: int) -> Op:
    def shear(image, level, negate, fill):
        # PIL's shear about the top-left corner, as timm applies it.
        degrees = math.degrees(math.atan(_signed(level / MAX_LEVEL * 0.3, negate)))
        return _affine(image, fill, shear=_on_axis(degrees, axis), center=[0.0, 0.0])

    return shear


def _translate(axis: int) -> Op:
    def translate(image, level, negate, fill):
        pixels = _signed(level / MAX_LEVEL * 0.45, negate) * image.shape[-1 - axis]
        # PIL's affine maps output x to input x + pixels: the content moves by -pixels.
        return _affine(image, fill, translate=_on_axis(-pixels, axis))

    return translate


def _rotate(image, level, negate, fill):
    angle = _signed(level / MAX_LEVEL * 30.0, negate)
    return F.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=fill)


def _posterize(image, level, negate, fill):
    return F.posterize(image, 4 - int(level / MAX_LEVEL * 4))


def _solarize(image, level, negate, fill):
    threshold = 256 - min(256, int(level / MAX_LEVEL * 256))
    return image if threshold > 255 else F.solarize(image, threshold)


def _solarize_add(image, level, negate, fill):
    added = (image.to(torch.int16) + min(128, int(level / MAX_LEVEL * 110))).clamp_(max=255).to(torch.uint8)
    return torch.where(image < 128, added, image)


def _enhance(adjust: Callable[[torch.Tensor, float], torch.Tensor]) -> Op:
    return lambda image, level, negate, fill: adjust(image, _enhance_factor(level, negate))


# timm's _RAND_INCREASING_TRANSFORMS, in its order.
RAND_AUGMENT_OPS: dict[str, Op] = {
    "AutoContrast": lambda image, *_: F.autocontrast(image),
    "Equalize": lambda image, *_: F.equalize(image),
    "Invert": lambda image, *_: F.invert(image),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(F.adjust_saturation),
    "ContrastIncreasing": _enhance(F.adjust_contrast),
    "BrightnessIncreasing": _enhance(F.adjust_brightness),
    "SharpnessIncreasing": _enhance(F.adjust_sharpness),
    "ShearX": _shear(0),
    "ShearY": _shear(1),
    "TranslateXRel": _translate(0),
    "TranslateYRel": _translate(1),
}


class RandAugment:
    """``ops`` ops drawn with replacement, each applied with probability 0.5 at a magnitude drawn
    from N(magnitude, magnitude_std) clipped to [0, 10]; geometric ops fill with ``fill``."""

    def __init__(self, ops: int, magnitude: float, magnitude_std: float, fill: Sequence[float]) -> None:
        self.ops, self.magnitude, self.magnitude_std = int(ops), float(magnitude), float(magnitude_std)
        self.fill = [float(value) for value in fill]
        self._table = list(RAND_AUGMENT_OPS.values())

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.shape[0] != 3:
            raise DataError(
                f"finetune.rand_augment_ops needs 8-bit RGB pictures, got a {image.shape[0]}-channel {image.dtype} "
                "image (an array file): set finetune.rand_augment_ops=0"
            )
        chosen = torch.randint(len(self._table), (self.ops,), generator=generator).tolist()
        # A fixed number of draws per op, applied or not, so no decision shifts the next one's stream.
        draws = torch.rand(self.ops, 2, generator=generator).tolist()
        noise = torch.randn(self.ops, generator=generator).tolist()
        for op, (u_apply, u_sign), z in zip(chosen, draws, noise):
            if u_apply < OP_PROBABILITY:
                level = min(max(self.magnitude + self.magnitude_std * z, 0.0), MAX_LEVEL)
                image = self._table[op](image, level, u_sign < 0.5, self.fill)
        return image

    def __repr__(self) -> str:
        return f"RandAugment(ops={self.ops}, magnitude={self.magnitude}, magnitude_std={self.magnitude_std})"


def random_erase(image: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """timm's RandomErasing(mode='pixel') of a normalised [C, H, W] image: with ``probability``, one
    rectangle over all channels replaced by N(0, 1) noise; in place, and returned."""
    if probability <= 0 or torch.rand(1, generator=generator).item() >= probability:
        return image
    channels, height, width = image.shape
    for u_area, u_ratio, u_top, u_left in torch.rand(ERASE_ATTEMPTS, 4, generator=generator).tolist():
        target_area = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u_area)
        aspect = math.exp(ERASE_LOG_RATIO[0] + (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]) * u_ratio)
        box_h, box_w = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if box_h < height and box_w < width:
            top = min(int(u_top * (height - box_h + 1)), height - box_h)
            left = min(int(u_left * (width - box_w + 1)), width - box_w)
            noise = torch.randn(channels, box_h, box_w, generator=generator, dtype=image.dtype)
            image[:, top : top + box_h, left : left + box_w] = noise
            break
    return image
