"""``data.kind=ffcv``: epochs from an FFCV ``.beton`` file, a :class:`~maescale.data.base.Loader` like the others.

The augmentation runs inside FFCV's compiled pipeline on CPU threads: training
decodes a random-resized crop straight from the JPEG (area fraction in
``[data.crop_min_scale, 1]``, aspect ratio log-uniform in [3/4, 4/3] as in MAE),
flips half the images and normalises; evaluation decodes a centre crop of 224/256
of the short side. On a GPU machine the uint8 crops are copied asynchronously to
the current CUDA device and normalised there.

What is deterministic, and what is not:

* the order of every epoch and each rank's share are those of every kind
  (:class:`~maescale.data.base.PlannedLoader`) (a (seed, epoch) permutation, contiguous per-rank slices of each global
  batch), computed here and handed to FFCV; so are ``Batch.seeds`` and hence the
  MAE masks, which equal those of ``data.kind=folder`` on the same images;
  ``epoch(e, start_batch=k)`` is the tail of ``epoch(e)`` for order, labels and masks;
* the crop boxes and flips are drawn by FFCV's own numba RNG in its worker threads,
  unseeded: they differ between runs and after a resume;
* FFCV resizes crops with OpenCV area interpolation, the PIL-based kinds with
  antialiased bicubic: pixels differ slightly between kinds for the same box.

Only 3-channel RGB pictures and square crops: FFCV's image field stores RGB JPEGs (or raw RGB
pixels) and its centre crop is square. Multi-channel or [height, width] data take
``data.kind=folder``.

Ranks get their share from this order, not from FFCV's ``distributed=True`` (which
wraps ``DistributedSampler`` and cannot do ``quasi_random``), so ``data.ffcv_order``
works at any process count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import ConfigError
from ..sizes import image_hw
from .base import Batch, PlannedLoader
from .ffcv_compat import import_ffcv
from .seeding import Stream, derive_seed, sample_mask_seed
from .stats import IMAGENET_STATS, ChannelStats, channel_stats
from .transforms import EVAL_CROP_PCT

# MAE's RandomResizedCrop aspect ratios (width / height), as torchvision's default.
CROP_RATIO = (3 / 4, 4 / 3)
# Evaluation: the centre 0.875 of the short side (224/256), the rule of every kind's eval crop.
EVAL_CROP_FRACTION = EVAL_CROP_PCT


def beton_path(path: str, split: str) -> Path:
    """``path`` itself if it is a ``.beton`` file, else ``<path>/<split>.beton``."""
    root = Path(path).expanduser()
    candidate = root if root.is_file() else root / f"{split}.beton"
    if not candidate.is_file():
        raise FileNotFoundError(
            f"FFCV file not found: {candidate} (data.path must be a .beton file or a folder holding {split}.beton; "
            "write one with `maescale write-beton`)"
        )
    return candidate


def _thread_count(num_workers: int) -> int:
    """FFCV threads: ``data.num_workers`` clamped to [1, numba's thread limit] (more is an error in FFCV)."""
    import numba

    return max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))


def _image_pipeline(
    img_size: int, train: bool, min_scale: float, device: torch.device | None, stats: ChannelStats
) -> list:
    import_ffcv()
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    size = (img_size, img_size)
    if train:
        ops = [RandomResizedCropRGBImageDecoder(size, scale=(min_scale, 1.0), ratio=CROP_RATIO), RandomHorizontalFlip()]
    else:
        ops = [CenterCropRGBImageDecoder(size, ratio=EVAL_CROP_FRACTION)]
    normalise = NormalizeImage(np.array(stats.mean) * 255, np.array(stats.std) * 255, np.float32)
    if device is None:
        # On CPU numba must normalise the numpy batch before it becomes a tensor.
        return [*ops, normalise, ToTensor(), ToTorchImage()]
    return [*ops, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(), normalise]


def _planned_order_class():
    """A TraversalOrder that returns whatever order the loader planned for the next epoch."""
    import_ffcv()
    from ffcv.traversal_order.base import TraversalOrder

    class PlannedOrder(TraversalOrder):
        def __init__(self, loader: Any) -> None:
            super().__init__(loader)
            self.next_indices = np.zeros(0, dtype=np.int64)

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.next_indices

    return PlannedOrder


class FFCVEpochLoader(PlannedLoader):
    """The :class:`~maescale.data.base.Loader` of a ``.beton`` file.

    Train mode: shuffled (``order='random'``) or page-local shuffled
    (``order='quasi_random'``, for files larger than RAM with ``os_cache=False``)
    order, tail dropped so every rank gets ``batches_per_epoch`` full batches. Eval
    mode: file order (or ``eval_subset`` evenly spaced samples), interleaved across
    ranks, last batch may be short.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        img_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        train: bool = True,
        min_scale: float = 0.2,
        order: str = "random",
        os_cache: bool = True,
        device: torch.device | None = None,
        eval_subset: int | None = None,
        stats: ChannelStats = IMAGENET_STATS,
    ) -> None:
        if order not in ("random", "quasi_random"):
            raise ValueError(f"order must be 'random' or 'quasi_random', got {order!r}")
        self.path = str(path)
        self.order = order
        self.stats = stats
        self._loader = self._build_ffcv_loader(
            img_size, int(batch_size), int(seed), bool(train), min_scale, _thread_count(num_workers), os_cache, device
        )
        self._quasi_random = self._quasi_random_order() if order == "quasi_random" else None
        super().__init__(
            int(self._loader.reader.num_samples), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
            train=train, eval_subset=eval_subset,
        )

    def _build_ffcv_loader(
        self, img_size: int, batch_size: int, seed: int, train: bool, min_scale: float, threads: int, os_cache: bool,
        device: torch.device | None,
    ) -> Any:
        import_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor

        torch_threads = torch.get_num_threads()  # FFCV sets torch's thread count to its own
        loader = Loader(
            self.path,
            batch_size=batch_size,
            num_workers=threads,
            os_cache=os_cache,
            order=OrderOption.SEQUENTIAL,
            seed=derive_seed(seed, Stream.QUASI_RANDOM) % 2**31,
            pipelines={
                "image": _image_pipeline(img_size, train, min_scale, device, self.stats),
                "label": [IntDecoder(), ToTensor(), Squeeze(1)],
            },
            # Our order already ends with full batches in train mode; eval keeps the short tail.
            drop_last=False,
        )
        torch.set_num_threads(torch_threads)
        loader.traversal_order = _planned_order_class()(loader)
        return loader

    def _quasi_random_order(self) -> Any:
        from ffcv.traversal_order.quasi_random import QuasiRandom

        return QuasiRandom(self._loader)

    @property
    def num_classes(self) -> int:
        """1 + the largest stored label (write-beton numbers the sorted class folders from 0)."""
        reader = self._loader.reader
        labels = reader.metadata[f"f{reader.field_names.index('label')}"]
        return int(labels.max()) + 1 if len(labels) else 0

    def global_order(self, epoch: int) -> torch.Tensor:
        """Every sample index of ``epoch`` in visiting order, before splitting across ranks."""
        if self._quasi_random is not None:
            return torch.from_numpy(self._quasi_random.sample_order(epoch).astype(np.int64))
        return super().global_order(epoch)

    def _read(self, epoch: int, indices: torch.Tensor) -> Iterator[Batch]:
        """The batches of ``indices``; close the iterator to stop early and free FFCV's thread."""
        if len(indices) == 0:
            return
        self._loader.traversal_order.next_indices = indices.numpy().astype(np.uint64)  # FFCV's index type
        torch_threads = torch.get_num_threads()
        batches = iter(self._loader)
        try:
            for number, (images, labels) in enumerate(batches):
                torch.set_num_threads(torch_threads)  # undo FFCV's change, made when its thread starts
                chunk = indices[number * self.batch_size : (number + 1) * self.batch_size].tolist()
                seeds = torch.tensor([sample_mask_seed(self.seed, epoch, i) for i in chunk], dtype=torch.int64)
                # Copies: FFCV refills its output buffers a few batches later, and the trainer
                # may hold several micro-batches at once.
                yield Batch(
                    images.clone(memory_format=torch.contiguous_format),
                    labels.to(torch.int64, copy=True),
                    (),
                    seeds,
                )
        finally:
            batches.close()
            torch.set_num_threads(torch_threads)


def _cuda_device() -> torch.device | None:
    """The current CUDA device (Accelerate sets it per process), or None on CPU-only machines."""
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


def refuse_unless_rgb_square(img_size: int | list[int], in_chans: int) -> int:
    """The side of the square crops, or a ConfigError naming the kind that reads such data."""
    if in_chans != 3:
        raise ConfigError(
            f"data.kind=ffcv reads 3-channel RGB images only, but the model takes {in_chans} channels "
            "(model.in_chans): use data.kind=folder, which reads multi-channel .tif/.tiff and .npy files"
        )
    height, width = image_hw(img_size)
    if height != width:
        raise ConfigError(
            f"data.kind=ffcv crops square images only, but the model takes {height} x {width}: use data.kind=folder"
        )
    return height


def build_ffcv_loader(
    data_cfg: Any, *, img_size: int | list[int], in_chans: int = 3, seed: int, rank: int, world_size: int,
    train: bool, split: str, eval_subset: int | None = None,
) -> FFCVEpochLoader:
    """The builder of ``data.kind=ffcv`` (maescale/data_kinds.py); ``data_cfg`` already checked. It
    takes no ``augment`` (so ``build_loader`` refuses fine-tuning's RandAugment and erasing): FFCV
    augments inside its compiled pipeline, with its own unseeded random numbers."""
    side = refuse_unless_rgb_square(img_size, in_chans)
    path = beton_path(data_cfg.path, split)
    loader = FFCVEpochLoader(
        path,
        img_size=side,
        batch_size=data_cfg.batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=data_cfg.num_workers,
        train=train,
        min_scale=data_cfg.crop_min_scale,
        order=data_cfg.ffcv_order,
        os_cache=data_cfg.ffcv_os_cache,
        device=_cuda_device(),
        eval_subset=eval_subset,
        stats=channel_stats(data_cfg, in_chans),
    )
    loader.require_a_full_batch(str(path))
    return loader
