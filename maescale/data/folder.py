"""ImageNet-layout folder reader that survives unreadable files.

Layout: ``root/<class>/**/<image>`` with class folders sorted into label ids.
``root`` may also hold split folders (``root/train/<class>/...``); pass
``split`` to pick one. Pictures (JPEG, PNG, ...) are read as 8-bit RGB;
multi-channel files (TIFF / GeoTIFF, ``.npy``) as [C, H, W] float32 tensors
of the configured channel count (data/arrays.py).

A corrupt, truncated or non-image file never crashes a long pretraining run:
the dataset substitutes the next readable sample and reports the bad path so
the loader can warn about it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError, MissingExtraError
from .arrays import ARRAY_EXTENSIONS, ChannelLayoutError, load_array

# Pictures, decoded by Pillow into RGB.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
FOLDER_EXTENSIONS = IMAGE_EXTENSIONS | ARRAY_EXTENSIONS
SPLIT_NAMES = ("train", "val")
EXPECTED_LAYOUT = "root/<class>/<image>.jpg (or root/<split>/<class>/<image>.jpg)"

T = TypeVar("T")

# Pillow modes holding more than 8 bits per pixel; convert("RGB") would clip
# them to white instead of scaling, so they are rescaled first.
_WIDE_INTEGER_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class FolderSample(NamedTuple):
    """One decoded sample and the unreadable paths passed over to find it."""

    image: Image.Image | torch.Tensor  # RGB picture, or [C, H, W] float32 from a multi-channel file
    label: int
    skipped: tuple[str, ...]


def resolve_root(root: str | os.PathLike, split: str | None = None) -> Path:
    """Return the folder holding the class folders, checking that it exists.

    With ``split`` given and ``root/<split>`` present, that split folder is used.
    If ``root`` holds other split folders but not this one, that is an error
    rather than silently treating ``train``/``val`` as class names.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    if split is None:
        return path
    if (path / split).is_dir():
        return path / split
    if any((path / name).is_dir() for name in SPLIT_NAMES):
        raise FileNotFoundError(f"split folder not found: {path / split}")
    return path


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in FOLDER_EXTENSIONS


def is_array_file(path: str) -> bool:
    """True for the multi-channel files (TIFF, .npy), read by data/arrays.py rather than Pillow."""
    return os.path.splitext(path)[1].lower() in ARRAY_EXTENSIONS


def _list_images(class_dir: Path) -> list[str]:
    """All image files below ``class_dir``, recursively, in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        # Sorting in place makes os.walk descend in a deterministic order.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_file(f))
    return found


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (L, P, CMYK, RGBA, I;16, ...) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_INTEGER_MODES:
        # 16-bit samples: keep the top 8 bits so the picture keeps its contrast.
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    elif image.mode == "P":
        # Going through RGBA handles palette transparency without a warning.
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open, fully decode and convert one image; raises if it is unreadable.

    ``load()`` forces the whole file to decode now, so a truncated JPEG raises
    here instead of yielding a half-grey picture (LOAD_TRUNCATED_IMAGES stays off).
    """
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def decode_rgb(data: bytes) -> Image.Image | None:
    """The 8-bit RGB picture a file's bytes hold, as ``load_rgb`` reads it; None if it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except Exception:  # noqa: BLE001 - Pillow raises many types on corrupt input
        return None


def read_image(path: str, channels: int) -> Image.Image | torch.Tensor:
    """The decoded file at ``path``: an RGB picture, or a [channels, H, W] float32 tensor for a
    multi-channel file; raises if it is unreadable."""
    return load_array(path, channels) if is_array_file(path) else load_rgb(path)


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/``; ``dataset[i]`` returns a :class:`FolderSample`.

    Unreadable files are replaced by the next readable sample (index + 1,
    + 2, ..., wrapping around), whose label is used; the bad paths are listed
    in ``FolderSample.skipped``. Multi-channel files must have ``channels``
    channels (a file of another count counts as unreadable); pictures need
    ``channels=3``.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, channels: int = 3) -> None:
        self.root = resolve_root(root, split)
        self.channels = int(channels)
        self.classes = sorted(
            entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith(".")
        )
        self.paths: list[str] = []
        self.labels: list[int] = []
        for label, name in enumerate(self.classes):
            images = _list_images(self.root / name)
            self.paths.extend(images)
            self.labels.extend([label] * len(images))
        if not self.paths:
            extensions = ", ".join(sorted(FOLDER_EXTENSIONS))
            raise DataError(
                f"no images ({extensions}) found under {self.root}; expected layout {EXPECTED_LAYOUT}"
            )
        self._refuse_pictures_unless_rgb()

    def _refuse_pictures_unless_rgb(self) -> None:
        if self.channels == 3:
            return
        picture = next((path for path in self.paths if not is_array_file(path)), None)
        if picture is not None:
            raise DataError(
                f"{picture}: pictures (JPEG, PNG, ...) are read as 3-channel RGB, but the model takes {self.channels} "
                f"channels: store {self.channels}-channel images as .tif/.tiff or .npy files"
            )

    def check_first_array(self) -> None:
        """Read the first multi-channel file now, so that a wrong channel count or an ambiguous layout
        (a mistake about the whole folder) stops the command at once instead of skipping every file."""
        first = next((path for path in self.paths if is_array_file(path)), None)
        if first is None:
            return
        try:
            load_array(first, self.channels)
        except (ChannelLayoutError, MissingExtraError):
            raise
        except Exception:  # noqa: BLE001 - a merely corrupt file is skipped, and reported, when the loader reads it
            return

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> FolderSample:
        image, label, skipped, _ = self.first_readable(index, lambda path: read_image(path, self.channels))
        return FolderSample(image, label, skipped)

    def first_readable(self, index: int, read: Callable[[str], T]) -> tuple[T, int, tuple[str, ...], str]:
        """``read`` of image ``index``'s file, or of the next file it does not fail on (wrapping
        around): (what it read, that file's label, the paths passed over, that file's path)."""
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images under {self.root}")
        skipped: list[str] = []
        errors: list[str] = []
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            path = self.paths[candidate]
            try:
                value = read(path)
            except Exception as error:  # noqa: BLE001 - decoders raise many types on corrupt input
                skipped.append(path)
                errors.append(f"{path}: {type(error).__name__}: {error}")
                continue
            return value, self.labels[candidate], tuple(skipped), path
        raise DataError(
            f"none of the {len(self.paths)} images under {self.root} could be read; "
            f"first errors: {'; '.join(errors[:3])}"
        )
