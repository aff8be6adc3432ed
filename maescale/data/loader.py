"""Map-style datasets as :class:`~maescale.data.base.Loader` s, and ``build_loader``.

:class:`EpochLoader` reads the synthetic and folder kinds through a torch ``DataLoader``:
each sample's augmentation comes from a generator seeded with (seed, epoch, index), the
order from data/seeding.py, so worker processes never change a batch. ``build_loader`` is
the one way the commands get data: it checks the data config, then calls the builder of the
kind registered under ``data.kind`` (maescale/data_kinds.py).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import check_data
from ..data_kinds import data_kind
from ..errors import ConfigError
from .base import Batch, Loader, PlannedLoader
from .device_decode import DeviceDecoder, RawBatch, file_tensor
from .finetune_augment import FinetuneAugment
from .folder import ImageFolderDataset, is_array_file
from .seeding import Stream, augment_seed, mask_seed, sample_mask_seed, seeded_generator
from .stats import channel_stats
from .synthetic import SyntheticShapes
from .transforms import EvalTransform, FinetuneTrainTransform, MAETrainTransform

# Batch and sample_mask_seed are imported from here by the benchmarks and tests.
__all__ = ["Batch", "EpochLoader", "build_loader", "first_images", "sample_mask_seed"]

logger = logging.getLogger(__name__)

# Unreadable files already reported by this process: the training loader, the figure images and
# the kNN monitor may all read the same bad file, and a user needs to hear about it once.
_reported_unreadable: set[str] = set()

# The synthetic train and eval splits are fixed datasets, independent of the
# training seed (which only drives order and augmentation), and disjoint.
SYNTHETIC_TRAIN_SEED = 0
SYNTHETIC_EVAL_SEED = 1

SampleKey = tuple[int, int]  # (dataset index, augmentation seed)


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
        return image, int(sample[1]), skipped, mask_seed(sample_seed)


class _FileBytes(Dataset):
    """``data.decode=gpu``: the bytes of ``dataset``'s picture files, decoded later on the device;
    a file that cannot be read is replaced by the next one, as ``ImageFolderDataset`` does."""

    def __init__(self, dataset: ImageFolderDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int, tuple[str, ...], int, str]:
        index, sample_seed = key
        data, label, skipped, path = self.dataset.first_readable(index, _file_bytes)
        return data, label, skipped, sample_seed, path


def _file_bytes(path: str) -> torch.Tensor:
    return file_tensor(Path(path).read_bytes())


def collate_raw(samples: Sequence[tuple[torch.Tensor, int, tuple[str, ...], int, str]]) -> RawBatch:
    return RawBatch(
        [data for data, *_ in samples], torch.tensor([label for _, label, *_ in samples], dtype=torch.int64),
        torch.tensor([seed for *_, seed, _ in samples], dtype=torch.int64), tuple(path for *_, path in samples),
        tuple(path for _, _, skipped, _, _ in samples for path in skipped),
    )


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
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start : start + self.batch_size].tolist()
            yield [(i, augment_seed(self.seed, self.epoch, i)) for i in chunk]


class EpochLoader(PlannedLoader):
    """The :class:`Loader` of a map-style dataset whose items are ``(image, label[, skipped paths])``.

    Train mode shuffles with a (seed, epoch) permutation and drops the tail so every rank gets
    exactly ``batches_per_epoch`` full batches; each global batch is split into contiguous
    per-rank slices. Eval mode keeps dataset order (or ``eval_subset`` evenly spaced images),
    drops nothing, and lets the last batch be short; ranks take interleaved indices, so their
    batch counts may differ by one (not with ``eval_subset``: see ``seeding.eval_selection``).
    An unreadable image is logged once per process, with its path, and counted in ``Batch.skipped``.
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
        decoder: DeviceDecoder | None = None,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.transform = transform
        self.num_workers = int(num_workers)
        self.decoder = decoder
        self._samples = _AugmentedSamples(dataset, transform) if decoder is None else _FileBytes(dataset)
        super().__init__(
            len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, train=train,
            eval_subset=eval_subset,
        )

    @property
    def num_classes(self) -> int:
        return int(self.dataset.num_classes)

    def _read(self, epoch: int, indices: torch.Tensor) -> Iterator[Batch]:
        loader = DataLoader(
            self._samples,
            batch_sampler=_KeyBatches(indices, self.batch_size, self.seed, epoch),
            num_workers=self.num_workers,
            collate_fn=collate_batch if self.decoder is None else collate_raw,
            pin_memory=torch.cuda.is_available() and self.decoder is None,
            persistent_workers=False,
            # Its own generator: otherwise DataLoader draws a base seed from the global RNG
            # at each epoch start, so a run resumed mid-epoch would draw different masks.
            generator=seeded_generator(self.seed, epoch, Stream.LOADER),
        )
        for batch in loader:
            if self.decoder is not None:
                batch = self.decoder(batch)
            report_skipped(batch.skipped)
            yield batch


def report_skipped(skipped: tuple[str, ...]) -> None:
    """Log each unreadable file once per process; done in the main process, because worker
    processes restart every epoch and would repeat themselves."""
    for path in skipped:
        if path not in _reported_unreadable:
            _reported_unreadable.add(path)
            logger.warning("unreadable image %s: replaced by another readable picture", path)


# ---------------------------------------------------------------- the synthetic and folder kinds


def build_transform(
    data_cfg: Any, img_size: int | Sequence[int], in_chans: int, train: bool, augment: FinetuneAugment | None
) -> Callable[..., torch.Tensor]:
    mean, std = channel_stats(data_cfg, in_chans)
    # Pictures stay uint8 and saturate by themselves; floats read from files keep whatever range they have.
    if not train:
        return EvalTransform(img_size, mean=mean, std=std, clip=False)
    kwargs = dict(scale=(data_cfg.crop_min_scale, 1.0), mean=mean, std=std, clip=False)
    if augment is None or not augment.active:
        return MAETrainTransform(img_size, **kwargs)
    augment.check_channels(in_chans)
    return FinetuneTrainTransform(img_size, augment, **kwargs)


def _dataset_loader(data_cfg: Any, dataset: Dataset, source: str, **kwargs: Any) -> EpochLoader:
    transform = build_transform(
        data_cfg, kwargs.pop("img_size"), kwargs.pop("in_chans"), kwargs["train"], kwargs.pop("augment")
    )
    loader = EpochLoader(
        dataset, transform, batch_size=data_cfg.batch_size, num_workers=data_cfg.num_workers,
        decoder=DeviceDecoder(transform) if data_cfg.decode == "gpu" else None, **kwargs,
    )
    loader.require_a_full_batch(source)
    return loader


def build_synthetic_loader(
    data_cfg: Any, *, split: str, img_size: int, in_chans: int, augment: FinetuneAugment | None = None, **kwargs: Any
) -> EpochLoader:
    dataset_seed = SYNTHETIC_TRAIN_SEED if split == "train" else SYNTHETIC_EVAL_SEED
    dataset = SyntheticShapes(data_cfg.synthetic_size, img_size, seed=dataset_seed, channels=in_chans)
    return _dataset_loader(
        data_cfg, dataset, f"the synthetic {split} split", img_size=img_size, in_chans=in_chans, augment=augment,
        **kwargs,
    )


def build_folder_loader(
    data_cfg: Any, *, split: str, in_chans: int, augment: FinetuneAugment | None = None, **kwargs: Any
) -> EpochLoader:
    dataset = ImageFolderDataset(data_cfg.path, split=split, channels=in_chans)
    dataset.check_first_array()
    array_file = next((path for path in dataset.paths if is_array_file(path)), None)
    if data_cfg.decode == "gpu" and array_file is not None:
        raise ConfigError(f"data.decode=gpu decodes pictures, not multi-channel files like {array_file}: "
                          f"use data.decode=cpu")
    return _dataset_loader(data_cfg, dataset, str(dataset.root), in_chans=in_chans, augment=augment, **kwargs)


# ---------------------------------------------------------------- every kind


def build_loader(
    data_cfg: Any,
    *,
    img_size: int | Sequence[int],
    in_chans: int = 3,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
    split: str | None = None,
    eval_subset: int | None = None,
    augment: FinetuneAugment | None = None,
) -> Loader:
    """Build the :class:`Loader` described by ``data_cfg`` (a ``DataConfig``) for one rank.

    ``train`` chooses augmentation, shuffling and tail dropping; ``split`` chooses the
    images ("train" or "val", default: "train" when ``train`` else "val"), so that
    un-augmented training images (e.g. for reconstruction figures) are one call away.
    ``eval_subset`` (eval mode only) visits that many evenly spaced images of the split.
    ``img_size`` (an int or [height, width]) and ``in_chans`` are the model's: batches are
    [B, in_chans, height, width], normalised with the statistics of data/stats.py.
    ``augment`` (train mode): fine-tuning's RandAugment and random erasing, handed only to the kinds
    that take an ``augment`` argument, and only when it does something.
    """
    check_data(data_cfg)  # the kind's own checks included
    builder = data_kind(data_cfg.kind).builder()
    extra = _augment_argument(builder, data_cfg.kind, augment if train else None)
    return builder(
        data_cfg, img_size=img_size, in_chans=in_chans, seed=seed, rank=rank, world_size=world_size, train=train,
        split=split or ("train" if train else "val"), eval_subset=eval_subset, **extra,
    )


def _augment_argument(builder: Callable[..., Loader], kind: str, augment: FinetuneAugment | None) -> dict:
    """``{"augment": augment}`` when there is one to apply; a kind whose builder cannot take it is refused."""
    if augment is None or not augment.active:
        return {}
    parameters = inspect.signature(builder).parameters.values()  # named, not **kwargs: taken means applied
    if not any(parameter.name == "augment" for parameter in parameters):
        raise ConfigError(
            f"data.kind={kind} does not apply finetune.rand_augment_ops or finetune.random_erasing: set both to 0"
        )
    return {"augment": augment}


def first_images(
    data_cfg: Any, *, img_size: int | Sequence[int], seed: int, count: int, split: str = "train", in_chans: int = 3
) -> torch.Tensor:
    """``count`` evenly spaced images of ``split``, un-augmented ([count, in_chans, H, W], normalised,
    on the CPU whatever device the kind decodes to): a fixed set to reconstruct in figures. Evenly
    spaced rather than the first ones, because a folder lists its images class by class: the first
    ``count`` would all show one class."""
    data_cfg = replace(data_cfg, batch_size=count, num_workers=0)
    loader = build_loader(
        data_cfg, img_size=img_size, in_chans=in_chans, seed=seed, train=False, split=split, eval_subset=count
    )
    with closing(loader.epoch(0)) as batches:  # frees the kind's workers or threads at once
        return next(batches).images.cpu()
