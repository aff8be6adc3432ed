"""Convert an ImageNet-layout folder into an FFCV ``.beton`` file (image + label).

Two passes, both over the sorted file list of :class:`ImageFolderDataset`:

1. *check*: a pool of workers decodes every file at 1/8 scale (libjpeg's DCT
   scaling still reads the whole entropy-coded stream, so truncated files fail)
   and the unreadable ones are reported by path and dropped;
2. *write*: FFCV's ``DatasetWriter`` with ONE writer process stores the readable
   images in order, fed by a pool that decodes and resizes them in parallel.

One writer process makes the file a pure function of the folder and the options:
with several, FFCV hands out pages in whatever order its workers finish, so two
runs give files that load the same data but differ byte for byte.

Everything runs in a freshly spawned process: FFCV's writer forks its workers,
and a fork taken after an FFCV loader ran in the same process can deadlock on
numba's lock (as happens when tests write and read in one interpreter).
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Iterator, Literal, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .folder import ImageFolderDataset, is_array_file, load_rgb

WriteMode = Literal["jpg", "raw", "proportion"]
ResizeSide = Literal["short", "long"]

# Images per task handed to a pool worker: large enough to amortise the pickling.
_POOL_CHUNK = 16
# Seeds numpy's RNG in the writer process: FFCV draws which images to compress from it
# in write_mode=proportion, so the choice is the same on every run.
_PROPORTION_SEED = 0


@dataclass(frozen=True)
class BetonOptions:
    """How images are stored; see ``maescale write-beton --help``."""

    max_resolution: int = 256
    resize_side: ResizeSide = "short"
    jpeg_quality: int = 90
    write_mode: WriteMode = "jpg"
    compress_probability: float = 0.5
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.max_resolution <= 0:
            raise ConfigError(f"--max-resolution must be positive, got {self.max_resolution}")
        if self.resize_side not in ("short", "long"):
            raise ConfigError(f"--resize-side must be 'short' or 'long', got {self.resize_side!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")
        if self.write_mode not in ("jpg", "raw", "proportion"):
            raise ConfigError(f"--write-mode must be jpg, raw or proportion, got {self.write_mode!r}")
        if not 0 <= self.compress_probability <= 1:
            raise ConfigError(f"--compress-probability must be in [0, 1], got {self.compress_probability}")
        if self.num_workers <= 0:
            raise ConfigError(f"--workers must be positive, got {self.num_workers}")


@dataclass
class WriteSummary:
    """What ``write_beton`` did: counts, the skipped paths with their errors, the classes."""

    out: str
    written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def resized_shape(height: int, width: int, max_resolution: int, side: ResizeSide) -> tuple[int, int]:
    """(height, width) after shrinking the ``side`` ('short' or 'long') to ``max_resolution``;
    images already small enough keep their size (never upscaled)."""
    reference = min(height, width) if side == "short" else max(height, width)
    if reference <= max_resolution:
        return height, width
    ratio = max_resolution / reference
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def evenly_spaced_subset(count: int, subset: int | None) -> list[int]:
    """``subset`` indices spread evenly over ``range(count)`` (all of them when None), so a
    small subset still samples every class of a sorted folder."""
    if subset is None or subset >= count:
        return list(range(count))
    if subset <= 0:
        raise ValueError(f"subset must be positive, got {subset}")
    return sorted({int(i) for i in np.linspace(0, count - 1, subset).round()})


def refuse_array_files(folder: ImageFolderDataset) -> None:
    """FFCV's image field holds RGB pictures: a folder with multi-channel files is refused, naming the
    kind that reads them."""
    arrays = [path for path in folder.paths if is_array_file(path)]
    if arrays:
        raise DataError(
            f"write-beton stores RGB pictures only, but {folder.root} holds {len(arrays)} multi-channel files "
            f"(.tif/.tiff/.npy, e.g. {arrays[0]}): train on them with data.kind=folder"
        )


def check_readable(path: str) -> str | None:
    """None if ``path`` decodes completely, else the error (decoded at reduced scale: fast)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as error:  # noqa: BLE001 - decoders raise many types on corrupt input
        return f"{type(error).__name__}: {error}"
    return None


def load_resized(path: str, max_resolution: int, side: ResizeSide) -> np.ndarray:
    """[H, W, 3] uint8 RGB, shrunk with area interpolation (what FFCV itself uses)."""
    import cv2

    image = np.asarray(load_rgb(path))
    height, width = resized_shape(image.shape[0], image.shape[1], max_resolution, side)
    if (height, width) == image.shape[:2]:
        return np.ascontiguousarray(image)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


class _ResizedStream:
    """The indexable dataset FFCV's single writer process reads, in order.

    Its pool starts lazily in the writer process (the object is pickled into it) and
    decodes ahead of the writer, so the parallel work is decode + resize while FFCV
    only encodes and copies.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], options: BetonOptions) -> None:
        self.paths = list(paths)
        self.labels = list(labels)
        self.options = options
        self._results: Iterator[np.ndarray] | None = None
        self._next_index = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if index != self._next_index:
            raise RuntimeError(f"images must be read in order: asked for {index}, expected {self._next_index}")
        if self._results is None:
            pool = multiprocessing.get_context("fork").Pool(self.options.num_workers)
            args = [(p, self.options.max_resolution, self.options.resize_side) for p in self.paths]
            self._results = pool.imap(_load_resized_args, args, chunksize=_POOL_CHUNK)
        self._next_index += 1
        return next(self._results), self.labels[index]


def _load_resized_args(args: tuple[str, int, ResizeSide]) -> np.ndarray:
    return load_resized(*args)


def _check_all(paths: Sequence[str], num_workers: int) -> list[str | None]:
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        results = pool.imap(check_readable, paths, chunksize=_POOL_CHUNK)
        return list(tqdm(results, total=len(paths), desc="checking images", unit="img", dynamic_ncols=True))


def _write_in_this_process(
    src: str, out: str, options: BetonOptions, subset: int | None, split: str | None
) -> WriteSummary:
    from .ffcv_compat import import_ffcv

    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    folder = ImageFolderDataset(src, split=split)
    chosen = evenly_spaced_subset(len(folder), subset)
    paths = [folder.paths[i] for i in chosen]
    labels = [folder.labels[i] for i in chosen]
    errors = _check_all(paths, options.num_workers)
    skipped = [(path, error) for path, error in zip(paths, errors) if error is not None]
    keep = [i for i, error in enumerate(errors) if error is None]
    if not keep:
        raise DataError(f"none of the {len(paths)} images under {folder.root} could be read")
    stream = _ResizedStream([paths[i] for i in keep], [labels[i] for i in keep], options)
    fields = {
        # Images arrive already resized, so FFCV's own (long-side) resize is off.
        "image": RGBImageField(
            write_mode=options.write_mode,
            max_resolution=None,
            jpeg_quality=options.jpeg_quality,
            compress_probability=options.compress_probability,
        ),
        "label": IntField(),
    }
    np.random.seed(_PROPORTION_SEED)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    DatasetWriter(str(out), fields, num_workers=1).from_indexed_dataset(stream, chunksize=_POOL_CHUNK)
    return WriteSummary(str(out), len(keep), skipped, list(folder.classes))


def _child_main(queue, *args) -> None:
    try:
        queue.put(("ok", _write_in_this_process(*args)))
    except DataError as error:
        queue.put(("data error", str(error)))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which re-raises
        queue.put(("error", f"{type(error).__name__}: {error}"))


def _wait_for_result(queue, child) -> tuple[str, object]:
    """The child's (status, payload); an error if it dies without answering (e.g. killed)."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            if not child.is_alive():
                return "error", f"the writer process exited with code {child.exitcode}"


def write_beton(
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: BetonOptions = BetonOptions(),
    *,
    subset: int | None = None,
    split: str | None = None,
) -> WriteSummary:
    """Write the images under ``src`` (``<class>/*.jpg``, or ``<split>/<class>/*.jpg`` with
    ``split``) to ``out`` with an ``image`` and a ``label`` field; returns a summary.

    Runs in a spawned process (see the module docstring); errors come back as exceptions.
    """
    from .ffcv_compat import import_ffcv

    import_ffcv()  # a missing extra is reported here, before any work
    refuse_array_files(ImageFolderDataset(src, split=split))  # fail here, with the folder's own message
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_main, args=(queue, str(src), str(out), options, subset, split))
    child.start()
    status, payload = _wait_for_result(queue, child)
    child.join()
    if status == "data error":
        raise DataError(payload)
    if status == "error":
        raise RuntimeError(f"writing {out} failed: {payload}")
    return payload
