"""``data.kind=ffcv``: epochs from an FFCV ``.beton`` file, same interface as :class:`EpochLoader`.

The augmentation runs inside FFCV's compiled pipeline on CPU threads: training
decodes a random-resized crop straight from the JPEG (area fraction in
``[data.crop_min_scale, 1]``, aspect ratio log-uniform in [3/4, 4/3] as in MAE),
flips half the images and normalises; evaluation decodes a centre crop of 224/256
of the short side. On a GPU machine the uint8 crops are copied asynchronously to
the current CUDA device and normalised there.

What is deterministic, and what is not:

* the order of every epoch and each rank's share are the ones :class:`EpochLoader`
  uses (a (seed, epoch) permutation, contiguous per-rank slices of each global
  batch), computed here and handed to FFCV; so are ``Batch.seeds`` and hence the
  MAE masks, which equal those of ``data.kind=folder`` on the same images;
  ``epoch(e, start_batch=k)`` is the tail of ``epoch(e)`` for order, labels and masks;
* the crop boxes and flips are drawn by FFCV's own numba RNG in its worker threads,
  unseeded: they differ between runs and after a resume;
* FFCV resizes crops with OpenCV area interpolation, the PIL-based kinds with
  antialiased bicubic: pixels differ slightly between kinds for the same box.

Ranks get their share from this order, not from FFCV's ``distributed=True`` (which
wraps ``DistributedSampler`` and cannot do ``quasi_random``), so ``data.ffcv_order``
works at any process count.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .ffcv_compat import import_ffcv
from .loader import Batch, eval_selection, rank_share, sample_mask_seed, shuffled_order
from .transforms import IMAGENET_MEAN, IMAGENET_STD, derive_seed

# MAE's RandomResizedCrop aspect ratios (width / height), as torchvision's default.
CROP_RATIO = (3 / 4, 4 / 3)
# Evaluation: resize to img_size / 0.875 and centre crop, i.e. crop 224/256 of the short side.
EVAL_CROP_FRACTION = 224 / 256
# The quasi-random order mixes this stream into its seed, apart from the shuffle's.
_QUASI_RANDOM_STREAM = 5


def beton_path(path: str | None, split: str) -> Path:
    """``path`` itself if it is a ``.beton`` file, else ``<path>/<split>.beton``."""
    if path is None:
        raise ValueError("data.path is required when data.kind is 'ffcv' (a .beton file or a folder of <split>.beton)")
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


def _image_pipeline(img_size: int, train: bool, min_scale: float, device: torch.device | None) -> list:
    import_ffcv()
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    size = (img_size, img_size)
    if train:
        ops = [RandomResizedCropRGBImageDecoder(size, scale=(min_scale, 1.0), ratio=CROP_RATIO), RandomHorizontalFlip()]
    else:
        ops = [CenterCropRGBImageDecoder(size, ratio=EVAL_CROP_FRACTION)]
    normalise = NormalizeImage(np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255, np.float32)
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


class FFCVEpochLoader:
    """Yields the :class:`Batch` es one rank sees in an epoch, read from a ``.beton`` file.

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
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if order not in ("random", "quasi_random"):
            raise ValueError(f"data.ffcv_order must be 'random' or 'quasi_random', got {order!r}")
        if order == "quasi_random" and os_cache:
            raise ValueError("data.ffcv_order=quasi_random needs data.ffcv_os_cache=false (it orders by pages read into process memory)")
        self.path = str(path)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size, self.train = int(rank), int(world_size), bool(train)
        self.order = order
        self.eval_subset = eval_subset
        self._loader = self._build_ffcv_loader(img_size, min_scale, _thread_count(num_workers), os_cache, device)
        self.num_samples = int(self._loader.reader.num_samples)
        self._quasi_random = self._quasi_random_order() if order == "quasi_random" else None
        self.batches_per_epoch = self._count_batches()

    def _build_ffcv_loader(self, img_size: int, min_scale: float, threads: int, os_cache: bool, device) -> Any:
        import_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor

        torch_threads = torch.get_num_threads()  # FFCV sets torch's thread count to its own
        loader = Loader(
            self.path,
            batch_size=self.batch_size,
            num_workers=threads,
            os_cache=os_cache,
            order=OrderOption.SEQUENTIAL,
            seed=derive_seed(self.seed, _QUASI_RANDOM_STREAM) % 2**31,
            pipelines={
                "image": _image_pipeline(img_size, self.train, min_scale, device),
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

    def _count_batches(self) -> int:
        if self.train:
            return self.num_samples // (self.batch_size * self.world_size)
        return math.ceil(len(self.rank_indices(0)) / self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def global_order(self, epoch: int) -> torch.Tensor:
        """Every sample index of ``epoch`` in visiting order, before splitting across ranks."""
        if self._quasi_random is not None:
            return torch.from_numpy(self._quasi_random.sample_order(epoch).astype(np.int64))
        return shuffled_order(self.num_samples, self.seed, epoch)

    def rank_indices(self, epoch: int) -> torch.Tensor:
        """Dataset indices this rank visits in ``epoch``, in order (int64 tensor)."""
        if not self.train:
            return self.eval_selection()[self.rank :: self.world_size]
        return rank_share(self.global_order(epoch), self.batches_per_epoch, self.batch_size, self.rank, self.world_size)

    def eval_selection(self) -> torch.Tensor:
        """Eval mode: every sample index visited, by all ranks together, in order."""
        return eval_selection(self.num_samples, self.eval_subset, self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Iterate over the batches of ``epoch`` from batch ``start_batch`` on (raises at the call
        for a bad ``start_batch``); close the iterator to stop early and free FFCV's thread."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        return self._iterate(epoch, start_batch)

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        indices = self.rank_indices(epoch)[start_batch * self.batch_size :]
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


def build_ffcv_loader(
    data_cfg: Any, *, img_size: int, seed: int, rank: int, world_size: int, train: bool, split: str,
    eval_subset: int | None = None,
) -> FFCVEpochLoader:
    """The ``data.kind=ffcv`` entry of ``LOADER_BUILDERS``."""
    min_scale = float(data_cfg.crop_min_scale)
    if not 0 < min_scale <= 1:
        raise ValueError(f"data.crop_min_scale must be in (0, 1], got {min_scale}")
    loader = FFCVEpochLoader(
        beton_path(data_cfg.path, split),
        img_size=img_size,
        batch_size=data_cfg.batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=data_cfg.num_workers,
        train=train,
        min_scale=min_scale,
        order=getattr(data_cfg, "ffcv_order", "random"),
        os_cache=getattr(data_cfg, "ffcv_os_cache", True),
        device=_cuda_device(),
        eval_subset=eval_subset,
    )
    if train and loader.batches_per_epoch == 0:
        raise ValueError(
            f"data.batch_size={loader.batch_size} x world_size={world_size} exceeds the "
            f"{loader.num_samples} training images in {loader.path}: an epoch would have no full batch"
        )
    return loader
