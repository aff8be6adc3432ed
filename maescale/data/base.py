"""What every data kind gives its users: :class:`Batch` and the :class:`Loader` protocol.

The trainer, the evaluation commands, the kNN monitor and the figures read data only through
this interface, so a new kind (webdataset, DALI, ...) implements :class:`Loader` and registers
its builder with ``register_kind`` (maescale/data_kinds.py) without touching, or reading, the
other kinds.
:class:`PlannedLoader` implements everything but the reading itself with the shared order of
data/seeding.py; subclassing it gives a new kind the same order, rank split and masks as the
existing ones.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Protocol, runtime_checkable

import torch

from ..errors import DataError
from .seeding import eval_selection, mask_noise, rank_share, shuffled_order


class Batch(NamedTuple):
    """One collated batch as the trainer consumes it."""

    images: torch.Tensor  # [B, C, H, W] float32, normalised per channel (data/stats.py: ImageNet's for RGB)
    labels: torch.Tensor  # [B] int64
    skipped: tuple[str, ...]  # unreadable files replaced in this batch
    seeds: torch.Tensor  # [B] int64, per-sample seeds for the trainer's own draws (masks)

    def mask_noise(self, num_patches: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[B, num_patches] uniform noise for MAE masking, drawn on ``device``, a pure function of
        each sample's (seed, epoch, index): masks are the same whatever the number of processes,
        the micro-batch split, a resume or the device, and differ between samples (and so across
        ranks)."""
        return mask_noise(self.seeds.to(device, non_blocking=True), num_patches)


@runtime_checkable
class Loader(Protocol):
    """The batches one process sees, epoch by epoch, as every command reads them.

    Train mode (``build_loader(train=True)``): each epoch is a (seed, epoch) shuffle, cut into
    ``batches_per_epoch`` full batches per process (the tail dropped), augmented. Eval mode:
    ``eval_selection()`` in order (the whole split or an evenly spaced subset), dealt to the
    processes index by index, center crops, the last batch may be short.
    """

    batch_size: int
    """Images per batch of this process."""
    batches_per_epoch: int
    """Batches of this process in one epoch (eval mode: the longest share)."""
    num_samples: int
    """Images in the split."""
    num_classes: int
    """Classes of the split's labels (labels are in ``range(num_classes)``)."""

    def __len__(self) -> int:
        """``batches_per_epoch``."""

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_batch`` on; a bad ``start_batch`` raises at the
        call; closing the iterator early frees what the kind holds (threads, workers)."""

    def eval_selection(self) -> torch.Tensor:
        """Eval mode: the indices visited by all processes together, in order; process r holds
        positions r, r + world_size, ... of it (how gathered features are put back in order)."""


class PlannedLoader:
    """A :class:`Loader` minus the reading: order, rank shares, batch counts and argument checks.

    Subclasses set ``num_samples`` before calling ``__init__`` (or pass it) and implement
    ``_read(epoch, indices)``, yielding the batches of ``indices`` in order; ``global_order``
    may be overridden for an order of their own (FFCV's quasi-random one).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        eval_subset: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if eval_subset is not None and train:
            raise ValueError("eval_subset applies to eval-mode loaders (train=False) only")
        self.num_samples = int(num_samples)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size, self.train = int(rank), int(world_size), bool(train)
        self.eval_subset = eval_subset
        self.batches_per_epoch = self._count_batches()

    def _count_batches(self) -> int:
        if self.train:
            return self.num_samples // (self.batch_size * self.world_size)
        return math.ceil(len(self.rank_indices(0)) / self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def require_a_full_batch(self, source: str) -> None:
        """Train mode: refuse an epoch without one full batch, naming the keys to change."""
        if self.train and self.batches_per_epoch == 0:
            raise DataError(
                f"data.batch_size={self.batch_size} x {self.world_size} process(es) exceeds the "
                f"{self.num_samples} training images of {source}: an epoch would have no full batch"
            )

    def global_order(self, epoch: int) -> torch.Tensor:
        """Every sample index of a training ``epoch`` in visiting order, before the rank split."""
        return shuffled_order(self.num_samples, self.seed, epoch)

    def rank_indices(self, epoch: int) -> torch.Tensor:
        """Dataset indices this rank visits in ``epoch``, in order (int64 tensor)."""
        if not self.train:
            return self.eval_selection()[self.rank :: self.world_size]
        return rank_share(self.global_order(epoch), self.batches_per_epoch, self.batch_size, self.rank, self.world_size)

    def eval_selection(self) -> torch.Tensor:
        """Eval mode: every dataset index visited, by all ranks together, in order."""
        return eval_selection(self.num_samples, self.eval_subset, self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Iterate over the batches of ``epoch`` from batch ``start_batch`` on.

        Not a generator itself, so a bad ``start_batch`` raises at the call.
        """
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        return self._read(epoch, self.rank_indices(epoch)[start_batch * self.batch_size :])

    def _read(self, epoch: int, indices: torch.Tensor) -> Iterator[Batch]:
        raise NotImplementedError
