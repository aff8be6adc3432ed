"""ImageNet-layout folder reader that survives unreadable files.

Layout: ``root/<class>/**/<image>`` with class folders sorted into label ids.
``root`` may also hold split folders (``root/train/<class>/...``); pass
``split`` to pick one.

A corrupt, truncated or non-image file never crashes a long pretraining run:
the dataset substitutes the next readable sample and reports the bad path so
the loader can warn about it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SPLIT_NAMES = ("train", "val")
EXPECTED_LAYOUT = "root/<class>/<image>.jpg (or root/<split>/<class>/<image>.jpg)"

# Pillow modes holding more than 8 bits per pixel; convert("RGB") would clip
# them to white instead of scaling, so they are rescaled first.
_WIDE_INTEGER_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class FolderSample(NamedTuple):
    """One decoded sample and the unreadable paths passed over to find it."""

    image: Image.Image
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
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


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


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/``; ``dataset[i]`` returns a :class:`FolderSample`.

    Unreadable files are replaced by the next readable sample (index + 1,
    + 2, ..., wrapping around), whose label is used; the bad paths are listed
    in ``FolderSample.skipped``.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None) -> None:
        self.root = resolve_root(root, split)
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
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(
                f"no images ({extensions}) found under {self.root}; expected layout {EXPECTED_LAYOUT}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> FolderSample:
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images under {self.root}")
        skipped: list[str] = []
        errors: list[str] = []
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            path = self.paths[candidate]
            try:
                image = load_rgb(path)
            except Exception as error:  # noqa: BLE001 - decoders raise many types on corrupt input
                skipped.append(path)
                errors.append(f"{path}: {type(error).__name__}: {error}")
                continue
            return FolderSample(image, self.labels[candidate], tuple(skipped))
        raise DataError(
            f"none of the {len(self.paths)} images under {self.root} could be read; "
            f"first errors: {'; '.join(errors[:3])}"
        )
