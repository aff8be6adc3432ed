"""``data.decode=gpu``: the workers read file bytes, the training process decodes and augments on its device.

On a GPU, torchvision's batched ``decode_jpeg(..., device="cuda")`` decodes a whole batch of JPEGs
with nvJPEG, and the crop, flip and normalisation then run there too, so the CPU cores only read
files. Without a GPU the same code decodes on the CPU: one path, tested everywhere.

The augmentation is the CPU path's own transform object (data/transforms.py), applied to the
decoded uint8 tensor on the device with a generator seeded by the sample's (seed, epoch, index):
the same crop boxes and flips as ``data.decode=cpu``, and the same pixels up to the decoders'
rounding (nvJPEG's IDCT vs libjpeg-turbo's) and the device's resize kernel.

A file that does not decode is replaced by the next decodable picture of its batch (its label
with it; the slot keeps its own crop and mask draws) and reported, as the folder kind replaces an
unreadable file by the next one.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

from ..errors import DataError
from .base import Batch
from .folder import decode_rgb
from .seeding import mask_seed

Item = TypeVar("Item")

JPEG_MAGIC = b"\xff\xd8"


class RawBatch(NamedTuple):
    """What a worker hands over under ``data.decode=gpu``: file bytes, not pictures."""

    files: list[torch.Tensor]  # uint8 [n_bytes] per sample: the encoded picture
    labels: torch.Tensor  # [B] int64
    augment_seeds: torch.Tensor  # [B] int64, each sample's (seed, epoch, index) augmentation seed
    names: tuple[str, ...]  # each file's name, to report one that does not decode
    skipped: tuple[str, ...]  # unreadable files already replaced by the worker


def decode_device() -> torch.device:
    """This process's GPU (the one Accelerate made current), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def file_tensor(data: bytes) -> torch.Tensor:
    """File bytes as the uint8 tensor torchvision's decoders read."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def fill_unreadable(items: Sequence[Item | None], labels: Sequence[int], batch_of: str) -> tuple[list[Item], list[int]]:
    """Replace each missing item (None) by the next present one of the batch, cyclically, label included."""
    present = [i for i, item in enumerate(items) if item is not None]
    if not present:
        raise DataError(f"no readable picture in a batch of {len(items)}: {batch_of}")
    filled_items, filled_labels = [], []
    for slot, item in enumerate(items):
        source = slot if item is not None else next((i for i in present if i > slot), present[0])
        filled_items.append(items[source])
        filled_labels.append(labels[source])
    return filled_items, filled_labels


def decode_pictures(files: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """[3, H, W] uint8 RGB pictures on ``device``, None where a file does not decode. JPEGs are
    decoded together on the device; other pictures (PNG, WebP, ...) one by one on the CPU by Pillow,
    as the workers decode them under data.decode=cpu."""
    pictures: list[torch.Tensor | None] = [None] * len(files)
    jpegs = [i for i, data in enumerate(files) if bytes(data[:2].tolist()) == JPEG_MAGIC]
    for i, picture in zip(jpegs, _decode_jpegs([files[i] for i in jpegs], device)):
        pictures[i] = picture
    for i in sorted(set(range(len(files))) - set(jpegs)):
        picture = decode_rgb(files[i].numpy().tobytes())
        pictures[i] = None if picture is None else pil_to_tensor(picture).to(device)
    return pictures


def _decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    if not files:
        return []
    try:
        return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the batch (torchvision's error for corrupt or truncated files)
        return [_decode_jpeg_or_none(data, device) for data in files]


def _decode_jpeg_or_none(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


class DeviceDecoder:
    """Turns a worker's :class:`RawBatch` into the :class:`Batch` the trainer reads, on ``device``."""

    def __init__(self, transform: Callable[..., torch.Tensor], device: torch.device | None = None) -> None:
        self.transform = transform
        self.device = device  # None: the current device at each batch, as the launcher set it by then

    def __call__(self, raw: RawBatch) -> Batch:
        pictures = decode_pictures(raw.files, self.device or decode_device())
        return augmented_batch(pictures, raw.labels.tolist(), raw.augment_seeds.tolist(), raw.names, raw.skipped,
                               self.transform)


def augmented_batch(pictures: Sequence[Any], labels: Sequence[int], seeds: Sequence[int], names: Sequence[str],
                    skipped: tuple[str, ...], transform: Callable[..., torch.Tensor]) -> Batch:
    """The :class:`Batch` of decoded ``pictures`` (None where a file did not decode: replaced by the next
    picture of the batch and reported by its name), each augmented with its own seed, wherever decoded."""
    undecodable = tuple(name for name, picture in zip(names, pictures) if picture is None)
    pictures, labels = fill_unreadable(pictures, labels, ", ".join(names[:3]))
    images = torch.stack([
        transform(picture, torch.Generator().manual_seed(seed)) for picture, seed in zip(pictures, seeds)
    ])
    mask_seeds = torch.tensor([mask_seed(seed) for seed in seeds], dtype=torch.int64)
    return Batch(images, torch.tensor(labels, dtype=torch.int64), skipped + undecodable, mask_seeds)
