"""Per-channel mean and std: the ones a run normalises with, and ``maescale stats``, which measures them.

A loader normalises with, in this order:

1. ``data.mean`` / ``data.std`` when set;
2. for ``data.kind=folder``, ``<data.path>/maescale_stats.yaml``, written by ``maescale stats``;
3. ImageNet's for 3 channels (the synthetic kind repeats them for its extra channels, which
   repeat R, G, B).

Any other channel count without 1 or 2 is an error that says how to get them. The values are
those the transforms see: pictures / 255, unsigned integer files / their type's maximum,
other files as they are (data/arrays.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .folder import ImageFolderDataset, read_image
from .seeding import eval_selection
from .transforms import IMAGENET_MEAN, IMAGENET_STD

STATS_FILE = "maescale_stats.yaml"


class ChannelStats(NamedTuple):
    mean: tuple[float, ...]
    std: tuple[float, ...]


IMAGENET_STATS = ChannelStats(IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------- the statistics a run uses


def default_stats_path(data_path: str) -> Path:
    """Where ``maescale stats`` writes by default and where ``data.kind=folder`` looks."""
    return Path(data_path).expanduser() / STATS_FILE


def channel_stats(data_cfg: Any, channels: int) -> ChannelStats:
    """The per-channel mean and std a loader of ``data_cfg`` normalises ``channels`` channels with."""
    if data_cfg.mean is not None:  # check_data: data.mean and data.std come together
        return _matching(ChannelStats(tuple(data_cfg.mean), tuple(data_cfg.std)), channels, "data.mean/data.std")
    if data_cfg.kind == "folder" and default_stats_path(data_cfg.path).is_file():
        stats_file = default_stats_path(data_cfg.path)
        return _matching(read_stats_file(stats_file), channels, str(stats_file))
    if data_cfg.kind == "synthetic":
        return ChannelStats(_repeated(IMAGENET_MEAN, channels), _repeated(IMAGENET_STD, channels))
    if channels == 3:
        return IMAGENET_STATS
    raise ConfigError(
        f"{channels}-channel images need their per-channel mean and std: run `maescale stats --data.path "
        f"{data_cfg.path} --channels {channels}` (it writes {default_stats_path(data_cfg.path)}, which "
        f"data.kind=folder reads when data.mean is unset), or set data.mean and data.std ({channels} values each)"
    )


def _repeated(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    return tuple(values[c % len(values)] for c in range(channels))


def _matching(stats: ChannelStats, channels: int, source: str) -> ChannelStats:
    if len(stats.mean) != channels:
        raise ConfigError(
            f"{source} hold statistics of {len(stats.mean)} channels, but the model takes {channels} (in_chans)"
        )
    return stats


def read_stats_file(path: Path) -> ChannelStats:
    """The mean and std a file of ``maescale stats`` holds; anything else is a DataError naming it."""
    try:
        tree = yaml.safe_load(path.read_text())
        stats = ChannelStats(tuple(float(v) for v in tree["mean"]), tuple(float(v) for v in tree["std"]))
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
        raise DataError(f"{path}: not a statistics file of `maescale stats` ({problem})") from None
    if len(stats.mean) != len(stats.std) or not stats.mean or min(stats.std) <= 0:
        raise DataError(f"{path}: needs mean and std lists of equal length with every std > 0")
    return stats


# ---------------------------------------------------------------- maescale stats


@dataclass
class StatsSummary:
    """What ``measure_channel_stats`` found: the statistics, how many images, the files passed over."""

    root: str
    images: int
    mean: list[float]
    std: list[float]
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _RunningMoments:
    """Per-channel count, mean and sum of squared deviations over all pixels seen, merged image by
    image (Chan et al.'s pairwise update: no cancellation, unlike sum-of-squares)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count)


def image_moments(image: Image.Image | torch.Tensor) -> tuple[int, np.ndarray, np.ndarray]:
    """(pixels per channel, per-channel mean, per-channel sum of squared deviations) of one decoded
    image, in float64, with the values the transforms see (pictures / 255)."""
    if isinstance(image, Image.Image):
        pixels = np.moveaxis(np.asarray(image, dtype=np.float32) / 255, -1, 0)
    else:
        pixels = image.numpy()
    flat = pixels.reshape(pixels.shape[0], -1)
    # One channel at a time: a float64 copy of a whole large tile would double its memory.
    mean = np.array([channel.mean(dtype=np.float64) for channel in flat])
    m2 = np.array([np.square(channel - m, dtype=np.float64).sum() for channel, m in zip(flat, mean)])
    return flat.shape[1], mean, m2


class _FileMoments(Dataset):
    """``dataset[i]``: (path, moments or None, error or None) of the i-th chosen file, read in a worker."""

    def __init__(self, paths: list[str], channels: int) -> None:
        self.paths, self.channels = paths, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, tuple | None, str | None]:
        path = self.paths[index]
        try:
            return path, image_moments(read_image(path, self.channels)), None
        except Exception as error:  # noqa: BLE001 - decoders raise many types on corrupt input
            return path, None, f"{type(error).__name__}: {error}"


def _unchanged(item: Any) -> Any:
    return item


def measure_channel_stats(
    root: str, *, channels: int = 3, split: str | None = "train", max_images: int | None = None, num_workers: int = 0
) -> StatsSummary:
    """Per-channel mean and std over every pixel of the images under ``root`` (its ``split`` folder when
    present), or of ``max_images`` evenly spaced ones; unreadable files are skipped and listed."""
    if max_images is not None and max_images <= 0:
        raise ConfigError(f"--max-images must be positive, got {max_images}")
    if num_workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {num_workers}")
    folder = ImageFolderDataset(root, split=split, channels=channels)
    folder.check_first_array()
    paths = [folder.paths[i] for i in eval_selection(len(folder), max_images, 1).tolist()]
    files = DataLoader(_FileMoments(paths, channels), batch_size=None, num_workers=num_workers, collate_fn=_unchanged)
    moments, skipped = _RunningMoments(channels), []
    for path, image, error in tqdm(files, desc="measuring images", unit="img", dynamic_ncols=True):
        if error is None:
            moments.add(*image)
        else:
            skipped.append((path, error))
    if moments.count == 0:
        raise DataError(f"none of the {len(paths)} images under {folder.root} could be read")
    return StatsSummary(str(folder.root), len(paths) - len(skipped), moments.mean.tolist(), moments.std().tolist(),
                        skipped)


def write_stats_file(summary: StatsSummary, out: str | Path) -> Path:
    """Write ``summary`` as YAML (mean, std, and where they come from) to ``out``."""
    out = Path(out).expanduser()
    tree = {"mean": summary.mean, "std": summary.std, "images": summary.images, "root": summary.root,
            "skipped": len(summary.skipped)}
    header = ("# Per-channel statistics written by `maescale stats` (pictures / 255, unsigned integer files / their\n"
              "# type's maximum, other files as is); data.kind=folder reads <data.path>/maescale_stats.yaml.\n")
    try:
        out.write_text(header + yaml.safe_dump(tree, sort_keys=False))
    except OSError as error:
        raise DataError(f"cannot write {out} ({error}): pass --out, or set data.mean and data.std") from None
    return out


def format_floats(values: list[float]) -> str:
    """``[0.123457,...]``: a list that a key=value override (no spaces: one shell word) reads back."""
    return "[" + ",".join(f"{v:.6g}" for v in values) + "]"
