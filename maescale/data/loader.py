"""Deterministic, resumable, per-rank epoch loader.

Everything random about an epoch is a pure function of (seed, epoch, sample
index): the order comes from a generator seeded with (seed, epoch) and each
sample's augmentation from a generator seeded with (seed, epoch, index).
Consequences the trainer relies on:

* worker count does not change a single bit of any batch;
* ``epoch(e, start_batch=k)`` is exactly the tail of ``epoch(e)``, so a run
  restarted from a mid-epoch checkpoint sees the same data as one that never
  stopped;
* each sample's augmentation is independent of world size and rank.
"""

from __future__ import annotations

from dataclasses import replace

import math
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .folder import ImageFolderDataset
from .synthetic import SyntheticShapes
from .transforms import EvalTransform, MAETrainTransform, derive_seed, mask_noise, seeded_generator

# Domain tags keep the order stream and the augmentation streams independent
# even though both derive from the same (seed, epoch).
_ORDER_STREAM = 1
_AUGMENT_STREAM = 2
_LOADER_STREAM = 3
_MASK_STREAM = 4

# The synthetic train and eval splits are fixed datasets, independent of the
# training seed (which only drives order and augmentation), and disjoint.
SYNTHETIC_TRAIN_SEED = 0
SYNTHETIC_EVAL_SEED = 1

SampleKey = tuple[int, int]  # (dataset index, augmentation seed)


class Batch(NamedTuple):
    """One collated batch as the trainer consumes it."""

    images: torch.Tensor  # [B, 3, H, W] float32, normalised with IMAGENET_MEAN/STD
    labels: torch.Tensor  # [B] int64
    skipped: tuple[str, ...]  # unreadable files replaced in this batch
    seeds: torch.Tensor  # [B] int64, per-sample seeds for the trainer's own draws (masks)

    def mask_noise(self, num_patches: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[B, num_patches] uniform noise for MAE masking, drawn on ``device``, a pure function of
        each sample's (seed, epoch, index): masks are the same whatever the number of processes,
        the micro-batch split, a resume or the device, and differ between samples (and so across
        ranks)."""
        return mask_noise(self.seeds.to(device, non_blocking=True), num_patches)


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was replaced by the next readable one."""


def collate_batch(samples: Sequence[tuple[torch.Tensor, int, tuple[str, ...], int]]) -> Batch:
    """Stack transformed samples into a :class:`Batch`."""
    images = torch.stack([image for image, _, _, _ in samples])
    labels = torch.tensor([label for _, label, _, _ in samples], dtype=torch.int64)
    skipped = tuple(path for _, _, paths, _ in samples for path in paths)
    seeds = torch.tensor([seed for _, _, _, seed in samples], dtype=torch.int64)
    return Batch(images, labels, skipped, seeds)


class _AugmentedSamples(Dataset):
    """Applies ``transform`` to ``source[index]`` with a generator seeded per sample.

    Indexed by :data:`SampleKey` so the seed travels with the index to whichever
    worker process handles it.
    """

    def __init__(self, source: Dataset, transform: Callable[..., torch.Tensor]) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int, tuple[str, ...], int]:
        index, sample_seed = key
        sample = self.source[index]
        # Folder samples also report the unreadable files passed over.
        skipped = tuple(sample[2]) if len(sample) > 2 else ()
        image = self.transform(sample[0], torch.Generator().manual_seed(sample_seed))
        return image, int(sample[1]), skipped, derive_seed(sample_seed, _MASK_STREAM)


class _KeyBatches:
    """Lazily chunks this rank's indices into batches of (index, seed) keys.

    Lazy so an ImageNet-sized epoch never materialises millions of key tuples.
    """

    def __init__(self, indices: torch.Tensor, batch_size: int, seed: int, epoch: int) -> None:
        self.indices = indices
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start : start + self.batch_size].tolist()
            yield [(i, derive_seed(self.seed, self.epoch, i, _AUGMENT_STREAM)) for i in chunk]


def shuffled_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of ``epoch``: a permutation of ``range(size)`` seeded by (seed, epoch)."""
    return torch.randperm(size, generator=seeded_generator(seed, epoch, _ORDER_STREAM))


def rank_share(order: torch.Tensor, batches: int, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of a training ``order``: ``batches`` full batches, tail dropped.

    Global batch g is order[g*B*W : (g+1)*B*W]; rank r takes its r-th slice of B. So
    W processes of batch B see exactly the samples of one process of batch B*W.
    """
    used = batches * batch_size * world_size
    return order[:used].view(batches, world_size, batch_size)[:, rank].reshape(-1)


def eval_selection(num_samples: int, subset: int | None, world_size: int) -> torch.Tensor:
    """Dataset indices an eval-mode loader visits, in order, before they are dealt to ranks.

    All of them, or ``subset`` evenly spaced ones (a class-balanced sample of a folder whose
    files are sorted by class), rounded down to a multiple of ``world_size`` so that every
    process encodes the same number of batches: a sharded model needs all of them in
    each forward.
    """
    if subset is None:
        return torch.arange(num_samples)
    count = min(subset, num_samples) // world_size * world_size
    if count == 0:
        raise ValueError(f"an eval subset of {subset} of {num_samples} images leaves nothing for {world_size} processes")
    return torch.arange(count) * num_samples // count


def sample_mask_seed(seed: int, epoch: int, index: int) -> int:
    """The mask seed of dataset sample ``index`` in ``epoch`` (what ``Batch.seeds`` holds)."""
    return derive_seed(derive_seed(seed, epoch, index, _AUGMENT_STREAM), _MASK_STREAM)


class EpochLoader:
    """Yields the batches one rank sees in a given epoch.

    Train mode shuffles with a (seed, epoch) permutation and drops the tail so
    every rank gets exactly ``batches_per_epoch`` full batches; each global batch is
    split into contiguous per-rank slices. Eval mode keeps
    dataset order (or ``eval_subset`` evenly spaced images), drops nothing, and
    lets the last batch be short; ranks take interleaved indices, so their batch
    counts may differ by one (not with ``eval_subset``: see :func:`eval_selection`).
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable[..., torch.Tensor],
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        train: bool = True,
        eval_subset: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.transform = transform
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_workers = int(num_workers)
        self.train = bool(train)
        self.eval_subset = eval_subset
        self._samples = _AugmentedSamples(dataset, transform)
        self._warned_paths: set[str] = set()
        self.batches_per_epoch = self._count_batches()

    def _count_batches(self) -> int:
        if self.train:
            return len(self.dataset) // (self.batch_size * self.world_size)
        return math.ceil(len(self.rank_indices(0)) / self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def rank_indices(self, epoch: int) -> torch.Tensor:
        """Dataset indices this rank visits in ``epoch``, in order (int64 tensor)."""
        if not self.train:
            return self.eval_selection()[self.rank :: self.world_size]
        order = shuffled_order(len(self.dataset), self.seed, epoch)
        return rank_share(order, self.batches_per_epoch, self.batch_size, self.rank, self.world_size)

    def eval_selection(self) -> torch.Tensor:
        """Eval mode: every dataset index visited, by all ranks together, in order."""
        return eval_selection(len(self.dataset), self.eval_subset, self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Iterate over the batches of ``epoch`` from batch ``start_batch`` on.

        Not a generator itself, so a bad ``start_batch`` raises at the call.
        """
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        return self._iterate(epoch, start_batch)

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        indices = self.rank_indices(epoch)[start_batch * self.batch_size :]
        loader = DataLoader(
            self._samples,
            batch_sampler=_KeyBatches(indices, self.batch_size, self.seed, epoch),
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            # Its own generator: otherwise DataLoader draws a base seed from the global RNG
            # at each epoch start, so a run resumed mid-epoch would draw different masks.
            generator=seeded_generator(self.seed, epoch, _LOADER_STREAM),
        )
        for batch in loader:
            self._warn_about(batch.skipped)
            yield batch

    def _warn_about(self, skipped: tuple[str, ...]) -> None:
        """Warn once per unreadable path; done here, in the main process, because
        worker processes restart every epoch and would repeat themselves."""
        for path in skipped:
            if path not in self._warned_paths:
                self._warned_paths.add(path)
                message = f"unreadable image {path} replaced by the next readable file"
                warnings.warn(message, UnreadableImageWarning, stacklevel=3)


LoaderBuilder = Callable[..., EpochLoader]


def _positive_int(data_cfg: Any, key: str, minimum: int = 1) -> int:
    """Read ``data_cfg.<key>`` as an int >= minimum, naming ``data.<key>`` on error."""
    value = getattr(data_cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _train_or_eval_transform(data_cfg: Any, img_size: int, train: bool) -> Callable[..., torch.Tensor]:
    if not train:
        return EvalTransform(img_size)
    min_scale = float(getattr(data_cfg, "crop_min_scale", 0.2))
    if not 0 < min_scale <= 1:
        raise ValueError(f"data.crop_min_scale must be in (0, 1], got {min_scale}")
    return MAETrainTransform(img_size, scale=(min_scale, 1.0))


def _epoch_loader(
    data_cfg: Any, dataset: Dataset, *, img_size: int, seed: int, rank: int, world_size: int, train: bool,
    eval_subset: int | None,
) -> EpochLoader:
    """Wrap a dataset with the right transform and check the epoch is not empty."""
    loader = EpochLoader(
        dataset,
        _train_or_eval_transform(data_cfg, img_size, train),
        batch_size=_positive_int(data_cfg, "batch_size"),
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=_positive_int(data_cfg, "num_workers", minimum=0),
        train=train,
        eval_subset=eval_subset,
    )
    if train and loader.batches_per_epoch == 0:
        raise ValueError(
            f"data.batch_size={loader.batch_size} x world_size={world_size} exceeds the "
            f"{len(dataset)} training images: an epoch would have no full batch"
        )
    return loader


def _build_synthetic(
    data_cfg: Any, *, img_size: int, seed: int, rank: int, world_size: int, train: bool, split: str,
    eval_subset: int | None = None,
) -> EpochLoader:
    size = _positive_int(data_cfg, "synthetic_size")
    dataset_seed = SYNTHETIC_TRAIN_SEED if split == "train" else SYNTHETIC_EVAL_SEED
    dataset = SyntheticShapes(size, img_size, seed=dataset_seed)
    return _epoch_loader(
        data_cfg, dataset, img_size=img_size, seed=seed, rank=rank, world_size=world_size, train=train,
        eval_subset=eval_subset,
    )


def _build_folder(
    data_cfg: Any, *, img_size: int, seed: int, rank: int, world_size: int, train: bool, split: str,
    eval_subset: int | None = None,
) -> EpochLoader:
    if data_cfg.path is None:
        raise ValueError("data.path is required when data.kind is 'folder'")
    dataset = ImageFolderDataset(data_cfg.path, split=split)
    return _epoch_loader(
        data_cfg, dataset, img_size=img_size, seed=seed, rank=rank, world_size=world_size, train=train,
        eval_subset=eval_subset,
    )


def _build_ffcv(data_cfg: Any, **kwargs: Any) -> EpochLoader:
    # Imported here: FFCV is an optional extra and takes seconds to import.
    from .ffcv_loader import build_ffcv_loader

    return build_ffcv_loader(data_cfg, **kwargs)


# One entry per data.kind. Builders return an EpochLoader or an object with the same
# interface (epoch(e, start_batch), batches_per_epoch, batch_size), like FFCVEpochLoader.
LOADER_BUILDERS: dict[str, LoaderBuilder] = {
    "synthetic": _build_synthetic,
    "folder": _build_folder,
    "ffcv": _build_ffcv,
}


def build_loader(
    data_cfg: Any,
    *,
    img_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
    split: str | None = None,
    eval_subset: int | None = None,
) -> EpochLoader:
    """Build the epoch loader described by ``data_cfg`` for one rank.

    ``train`` chooses augmentation, shuffling and tail dropping; ``split`` chooses the
    images ("train" or "val", default: "train" when ``train`` else "val"), so that
    un-augmented training images (e.g. for reconstruction figures) are one call away.
    ``eval_subset`` (eval mode only) visits that many evenly spaced images of the split.
    """
    split = split or ("train" if train else "val")
    builder = LOADER_BUILDERS.get(data_cfg.kind)
    if builder is None:
        known = ", ".join(sorted(LOADER_BUILDERS))
        raise ValueError(f"unknown data.kind {data_cfg.kind!r}; known kinds: {known}")
    if eval_subset is not None and train:
        raise ValueError("eval_subset applies to eval-mode loaders (train=False) only")
    return builder(
        data_cfg, img_size=img_size, seed=seed, rank=rank, world_size=world_size, train=train, split=split,
        eval_subset=eval_subset,
    )


def first_images(data_cfg: Any, *, img_size: int, seed: int, count: int, split: str = "train") -> torch.Tensor:
    """The first ``count`` images of ``split``, un-augmented ([count, 3, H, W], normalised):
    a fixed set to reconstruct in figures."""
    data_cfg = replace(data_cfg, batch_size=count, num_workers=0)
    loader = build_loader(data_cfg, img_size=img_size, seed=seed, train=False, split=split)
    return next(iter(loader.epoch(0))).images
