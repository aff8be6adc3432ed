"""Multi-channel image files: TIFF / GeoTIFF stacks and ``.npy`` arrays as [C, H, W] float32 tensors.

Values: unsigned integers are divided by their type's maximum (uint8 / 255, uint16 / 65535, ...)
so that they land in [0, 1] as pictures do; signed integers and floats are kept as they are.
The per-channel normalisation that follows (data/stats.py) takes care of the scale either way.

Layout: a 2-D array is one channel; a 3-D array is channel-last (H x W x C, as most GeoTIFF
writers and ``np.save`` of an image give) or channel-first (C x H x W, band-separate TIFFs, page
stacks), told apart by which end axis has the configured channel count. When both have it
(e.g. 6 x 40 x 6 for 6 channels) the file is refused rather than guessed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import DataError, MissingExtraError, install_hint

ARRAY_EXTENSIONS = frozenset({".tif", ".tiff", ".npy"})

# tifffile logs what is wrong with a damaged file and then raises; the loader reports the raised
# error once with the file's path, so the logged line would only say it twice.
logging.getLogger("tifffile").setLevel(logging.CRITICAL)


class ChannelLayoutError(DataError):
    """An array whose shape does not hold the configured number of channels unambiguously."""


def load_array(path: str, channels: int) -> torch.Tensor:
    """[channels, H, W] float32 from a ``.tif``/``.tiff``/``.npy`` file; raises if it is unreadable,
    of another channel count or layout, of a non-numeric type, or holds NaN / inf values."""
    array = _read_npy(path) if path.lower().endswith(".npy") else _read_tiff(path)
    return torch.from_numpy(to_float32(channels_first(array, channels, path), path))


def _read_npy(path: str) -> np.ndarray:
    # Memory-mapped: only the pixels are read, once, by the conversion to float32.
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _read_tiff(path: str) -> np.ndarray:
    import tifffile

    try:
        return tifffile.imread(path)
    except (KeyError, ValueError) as error:
        # tifffile decodes LZW, JPEG, PackBits, ... only through the imagecodecs package.
        if "imagecodecs" in str(error):
            raise MissingExtraError(f"{path}: {error}: {install_hint('tiff')}") from error
        raise


def channels_first(array: np.ndarray, channels: int, path: str) -> np.ndarray:
    """``array`` as [channels, H, W] (a view), deciding the layout by the channel count."""
    if array.ndim == 2 and channels == 1:
        return array[np.newaxis]
    if array.ndim == 3:
        first, last = array.shape[0] == channels, array.shape[-1] == channels
        if first and last:
            raise ChannelLayoutError(
                f"{path}: shape {array.shape} could be channel-first or channel-last with {channels} channels; "
                "store it with the spatial axes larger than the channel count, or save it channel-last"
            )
        if last:
            return np.moveaxis(array, -1, 0)
        if first:
            return array
    raise ChannelLayoutError(
        f"{path}: shape {array.shape} has no axis of {channels} channels (the model's in_chans); expected "
        f"H x W x {channels} or {channels} x H x W" + (" or H x W" if channels == 1 else "")
    )


def to_float32(array: np.ndarray, path: str) -> np.ndarray:
    """A contiguous float32 copy: unsigned integers scaled by their type's maximum, the rest as is."""
    if array.dtype.kind == "u":
        scaled = np.divide(array, np.iinfo(array.dtype).max, dtype=np.float32, order="C")
    elif array.dtype.kind in "bif":
        scaled = np.array(array, dtype=np.float32, order="C")  # a copy, never a view of a mapped file
    else:
        raise DataError(f"{path}: pixel type {array.dtype} is not a number")
    # No-data pixels of GeoTIFFs are often NaN: one would turn the whole loss into NaN.
    if array.dtype.kind == "f" and not np.isfinite(scaled).all():
        raise DataError(f"{path}: holds NaN or infinite values")
    return scaled
