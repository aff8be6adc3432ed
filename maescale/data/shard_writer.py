"""Write an ImageNet-layout folder as tar shards in the webdataset layout (``maescale write-shards``).

``write_shards(src, out)`` reads the pictures of ``src`` (``<class>/...`` or ``<split>/<class>/...``,
as :class:`ImageFolderDataset` lists them, class folders sorted into label ids) and writes
``out/00000.tar``, ``out/00001.tar``, ... with ``samples_per_shard`` samples each (the last may hold
fewer), then ``out/shards.json``, the index data/tar_shards.py reads (shard names, sample counts,
``num_classes`` and the class names). ``data.kind=shards data.path=out`` trains on them; writing
``--out ROOT/train`` and ``--out ROOT/val`` lets ``data.path=ROOT`` serve both splits.

Sample ``i`` (in writing order) is three consecutive tar members under the key ``000000000 + i``
(nine digits, more for larger sets), unique across the whole set:

- ``<key>.jpg`` / ``.png`` / ``.webp``: the ORIGINAL file bytes, not re-encoded (the extension
  lowercased, ``.jpeg`` stored as ``.jpg``); a ``.bmp`` picture, which webdataset readers do not
  take, is converted to a lossless PNG of its RGB pixels (what data.kind=folder decodes) and counted;
- ``<key>.cls``: the label, ASCII decimal;
- ``<key>.json``: ``{"path": <path relative to the split folder>, "class": <class name>}``.

**Why shuffled.** A folder lists its images class by class, and a shard loader reads shards front
to back, mixing only a window of samples: shards written in folder order would each hold one or two
classes, and every batch would be nearly one class. The samples are written in a permutation drawn
from ``seed`` (``torch.randperm``), so every shard is a random draw of the whole set.

**Deterministic and safe.** Members carry fixed metadata (mtime 0, uid/gid 0, no user names, mode
0o644) and the order depends only on the file list and the seed, so the same folder and options
give byte-identical shards, whatever the worker count. Unreadable files (Pillow cannot fully
decode them: ``load_rgb``) are left out and reported; the keys and counts cover the written ones.
``out`` must be empty or absent, so two runs never mix their shards. Shards are written under
``NNNNN.tar.partial`` names, which no shard listing matches, renamed when all are complete, and
``shards.json`` comes last (written aside and renamed): a crash leaves no set that looks complete.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .folder import ImageFolderDataset, is_array_file, load_rgb
from .tar_shards import INDEX_NAME, Shard, write_index

PARTIAL = ".partial"
# Stored extension of each picture extension; .bmp is converted (see the module docstring).
STORED_EXTENSION = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "png"}
CONVERTED = frozenset({".bmp"})
MIN_KEY_DIGITS, MIN_SHARD_DIGITS = 9, 5
REPORTED_UNREADABLE = 3


@dataclass
class ShardsSummary:
    """What ``write_shards`` did."""

    out: str
    shards: list[Shard]
    classes: list[str]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    """(path relative to the split folder, error) of each file left out, in writing order."""
    converted: int = 0
    """.bmp pictures stored as PNG."""

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)


class Picture(NamedTuple):
    """One source file, read in a loader worker: its stored bytes and extension, or the error."""

    index: int  # into the folder's file list
    data: bytes
    extension: str
    error: str | None


class _Pictures(Dataset):
    """``dataset[i]``: the :class:`Picture` of the ``order[i]``-th file, checked by a full decode."""

    def __init__(self, paths: list[str], order: list[int]) -> None:
        self.paths, self.order = paths, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> Picture:
        index = self.order[position]
        suffix = os.path.splitext(self.paths[index])[1].lower()
        try:
            return Picture(index, *read_picture(self.paths[index], suffix), None)
        except Exception as error:  # noqa: BLE001 - decoders raise many types on corrupt input
            return Picture(index, b"", "", f"{type(error).__name__}: {error}")


def read_picture(path: str, suffix: str) -> tuple[bytes, str]:
    """(bytes to store, stored extension) of a picture; raises if Pillow cannot fully decode it."""
    image = load_rgb(path)
    if suffix in CONVERTED:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), STORED_EXTENSION[suffix]
    return Path(path).read_bytes(), STORED_EXTENSION[suffix]


def _unchanged(item: Any) -> Any:
    return item


# ---------------------------------------------------------------- checks before any work


def check_options(samples_per_shard: int, num_workers: int) -> None:
    if samples_per_shard <= 0:
        raise ConfigError(f"--samples-per-shard must be positive, got {samples_per_shard}")
    if num_workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {num_workers}")


def open_folder(src: str | os.PathLike, split: str | None) -> ImageFolderDataset:
    """The source folder; a missing one, or one holding multi-channel files, is a one-line error."""
    try:
        folder = ImageFolderDataset(src, split=split)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--src {src}: {error}") from None
    arrays = [path for path in folder.paths if is_array_file(path)]
    if arrays:
        raise DataError(
            f"--src {src}: shards hold RGB pictures only, but {folder.root} holds {len(arrays)} multi-channel files "
            f"(.tif/.tiff/.npy, e.g. {arrays[0]}): train on them with data.kind=folder"
        )
    return folder


def check_out(out: Path, folder: ImageFolderDataset) -> None:
    """``out`` must be absent or an empty folder, and outside the images it is written from."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file: name a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"--out {out} is not empty: name a new or empty folder (shard sets are never mixed)")
    if out.resolve().is_relative_to(folder.root.resolve()):
        raise DataError(f"--out {out} is inside the image folder {folder.root}: it would become a class")


# ---------------------------------------------------------------- writing


def shuffled_order(count: int, seed: int) -> list[int]:
    """The writing order: a permutation of ``range(count)`` drawn from ``seed``."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file header with fixed metadata, so equal inputs give equal bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def sample_members(key: str, picture: Picture, label: int, path: str, class_name: str) -> list[tuple[str, bytes]]:
    """(member name, content) of one sample: the picture, its label, its origin."""
    origin = json.dumps({"path": path, "class": class_name}).encode()
    return [(f"{key}.{picture.extension}", picture.data), (f"{key}.cls", str(label).encode()), (f"{key}.json", origin)]


class _ShardSet:
    """Shards being written into ``out``: each under its partial name until :meth:`publish`."""

    def __init__(self, out: Path, samples_per_shard: int, max_shards: int) -> None:
        self.out, self.samples_per_shard = out, samples_per_shard
        self.digits = max(MIN_SHARD_DIGITS, len(str(max_shards - 1)))
        self.shards: list[Shard] = []
        self.written = 0
        """Samples added so far: the number (key) of the next one."""
        self._tar: tarfile.TarFile | None = None
        self._path = ""
        self._in_shard = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._path = str(self.out / f"{len(self.shards):0{self.digits}d}.tar")
            self._tar = tarfile.open(self._path + PARTIAL, "w", format=tarfile.USTAR_FORMAT)
        for name, content in members:
            self._tar.addfile(tar_member(name, len(content)), io.BytesIO(content))
        self.written += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self.close_shard()

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self.shards.append(Shard(self._path, self._in_shard))
        self._tar, self._in_shard = None, 0

    def publish(self, num_classes: int, classes: list[str]) -> None:
        """Give every shard its final name, then write the index (aside first, then renamed)."""
        for shard in self.shards:
            os.replace(shard.url + PARTIAL, shard.url)
        staging = write_index(self.out / (INDEX_NAME + PARTIAL), self.shards, num_classes, classes)
        os.replace(staging, self.out / INDEX_NAME)

    def discard(self) -> None:
        """Remove the partial files of a failed run."""
        if self._tar is not None:
            self._tar.close()
        for partial in self.out.glob("*" + PARTIAL):
            if partial.is_dir():
                shutil.rmtree(partial)
            else:
                partial.unlink()


def read_in_order(folder: ImageFolderDataset, order: list[int], num_workers: int) -> Iterable[Picture]:
    pictures = DataLoader(_Pictures(folder.paths, order), batch_size=None, num_workers=num_workers,
                          collate_fn=_unchanged)
    return tqdm(pictures, desc="writing shards", unit="img", dynamic_ncols=True)


def write_samples(pictures: Iterable[Picture], folder: ImageFolderDataset, shards: _ShardSet,
                  summary: ShardsSummary) -> None:
    """Write the readable pictures as consecutive keys; record the unreadable ones in ``summary``."""
    key_digits = max(MIN_KEY_DIGITS, len(str(len(folder) - 1)))
    for picture in pictures:
        relative = Path(folder.paths[picture.index]).relative_to(folder.root).as_posix()
        if picture.error is not None:
            summary.unreadable.append((relative, picture.error))
            continue
        label = folder.labels[picture.index]
        key = f"{shards.written:0{key_digits}d}"
        shards.add(sample_members(key, picture, label, relative, folder.classes[label]))
        summary.converted += os.path.splitext(relative)[1].lower() in CONVERTED
    shards.close_shard()


def write_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = "train",
    samples_per_shard: int = 1000,
    seed: int = 0,
    num_workers: int = 0,
) -> ShardsSummary:
    """Write the pictures under ``src`` (its ``split`` folder when present) as shuffled tar shards and
    a shard index into ``out``; returns a summary (see the module docstring)."""
    check_options(samples_per_shard, num_workers)
    folder = open_folder(src, split)
    out = Path(out).expanduser()
    check_out(out, folder)
    out.mkdir(parents=True, exist_ok=True)
    shards = _ShardSet(out, samples_per_shard, math.ceil(len(folder) / samples_per_shard))
    summary = ShardsSummary(str(out), shards.shards, list(folder.classes))
    try:
        write_samples(read_in_order(folder, shuffled_order(len(folder), seed), num_workers), folder, shards, summary)
        if not shards.shards:
            raise DataError(f"none of the {len(folder)} images under {folder.root} could be read; "
                            f"first errors: {'; '.join(f'{p}: {e}' for p, e in summary.unreadable[:3])}")
        shards.publish(folder.num_classes, list(folder.classes))
    except BaseException:
        shards.discard()
        raise
    return summary


def describe(summary: ShardsSummary) -> str:
    """The line ``maescale write-shards`` prints at the end."""
    line = (f"wrote {len(summary.shards)} shards, {summary.samples:,} samples, {len(summary.classes)} classes to "
            f"{summary.out} ({INDEX_NAME})")
    if summary.converted:
        line += f"; {summary.converted:,} .bmp pictures stored as PNG"
    if summary.unreadable:
        listed = ", ".join(f"{path} ({error})" for path, error in summary.unreadable[:REPORTED_UNREADABLE])
        more = len(summary.unreadable) - REPORTED_UNREADABLE
        line += f"; {len(summary.unreadable):,} unreadable files left out: {listed}" + (
            f" and {more:,} more" if more > 0 else "")
    return line
