"""``data.kind=shards``: tar shards in the webdataset layout (data/tar_shards.py), streamed.

What an epoch is: one pass over every shard. Its samples form one sequence, the shards in an
order drawn from (seed, epoch), each shard's samples in the order stored. Process r of W reads
the r-th contiguous W-th of that sequence (cut between samples, so processes read about the same
number of shards and share at most a boundary shard, each reading its own part), and cuts its
part into S = max(1, data.num_workers) contiguous streams, one per DataLoader worker: a worker
reads only its stream's shards, each once, front to back. Within a stream, windows of
``data.shuffle_buffer`` samples (rounded to whole batches) are each shuffled by a permutation
drawn from (seed, epoch, window position); batch j of the process comes from stream j mod S.

So ``num_samples`` is the sum of the shards' sample counts (known before reading, from the shard
index or the headers), and an epoch of W processes gives each S x floor(floor(N / W) / S / B)
batches of B: every sample at most once, fewer than S x (B + 1) per process left out of an epoch.
The batches are a pure function of (seed, epoch, W, S): a run resumed at a step reads from the
window holding its next batch, opening no shard of the batches before; resuming with another
process or worker count continues at the same batch number of the new division instead (the
position, not the samples, carries over). Evaluation reads the shards in their stored order, the
positions ``eval_selection()`` deals to this process, as the other kinds do.

A shard that ends early (a truncated file, a failing pipe: command) or a member that does not
decode is reported once and its slots take the next readable picture of the batch, so every
process still yields its full count of batches.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import ConfigError, DataError
from .base import Batch, PlannedLoader
from .device_decode import DeviceDecoder, RawBatch, augmented_batch, file_tensor, fill_unreadable
from .folder import decode_rgb
from .loader import build_transform, report_skipped
from .seeding import Stream, augment_seed, derive_seed, seeded_generator, shuffled_order
from .tar_shards import Sample, ShardList, ShardReader, list_shards


@dataclass(frozen=True)
class StreamShape:
    """How one process's part of a training epoch divides: S streams of whole windows of batches."""

    batch_size: int
    streams: int
    batches_per_stream: int
    window: int  # samples per shuffling window, a multiple of batch_size

    @property
    def stream_length(self) -> int:
        return self.batches_per_stream * self.batch_size


class EpochPlan:
    """Where each batch of one process's epoch comes from, as positions in the epoch's sequence."""

    def __init__(self, loader: ShardLoader, epoch: int) -> None:
        self.loader, self.epoch = loader, epoch
        shards = loader.shard_list.shards
        self.order = shuffled_order(len(shards), loader.seed, epoch) if loader.train else torch.arange(len(shards))
        self.order = self.order.tolist()
        self.starts = [0, *itertools.accumulate(shards[i].samples for i in self.order)]
        self._permutations: dict[int, list[int]] = {}

    def locate(self, position: int) -> tuple[int, int]:
        """(shard's place in this epoch's order, sample number in that shard) of a position."""
        place = bisect.bisect_right(self.starts, position) - 1
        return place, position - self.starts[place]

    def url(self, place: int) -> str:
        return self.loader.shard_list.shards[self.order[place]].url

    def dataset_index(self, position: int) -> int:
        """The sample's index in the shards' stored order: what its augmentation is seeded with."""
        place, member = self.locate(position)
        return self.loader.shard_offsets[self.order[place]] + member

    def batch_positions(self, batch: int) -> list[int]:
        size = self.loader.batch_size
        if not self.loader.train:
            return self.loader.rank_eval_positions[batch * size : (batch + 1) * size].tolist()
        window_start, length = self.window_of(batch)
        stream, in_stream = batch % self.loader.shape.streams, batch // self.loader.shape.streams
        offset = in_stream * size - (window_start - self.stream_start(stream))
        return [window_start + i for i in self.permutation(window_start, length)[offset : offset + size]]

    def read_unit(self, batch: int) -> tuple[int, list[int]]:
        """(identity, ascending positions) of what a worker reads for ``batch``: its shuffling window
        in training, the batch itself in evaluation."""
        if not self.loader.train:
            return batch, sorted(self.batch_positions(batch))
        window_start, length = self.window_of(batch)
        return window_start, list(range(window_start, window_start + length))

    def stream_start(self, stream: int) -> int:
        shape, loader = self.loader.shape, self.loader
        per_process = loader.num_samples // loader.world_size
        return loader.rank * per_process + stream * (per_process // shape.streams)

    def window_of(self, batch: int) -> tuple[int, int]:
        """(first position, length) of the shuffling window holding training ``batch``."""
        shape = self.loader.shape
        stream, in_stream = batch % shape.streams, batch // shape.streams
        window_offset = in_stream * shape.batch_size // shape.window * shape.window
        length = min(shape.window, shape.stream_length - window_offset)
        return self.stream_start(stream) + window_offset, length

    def permutation(self, window_start: int, length: int) -> list[int]:
        if window_start not in self._permutations:
            generator = torch.Generator().manual_seed(
                derive_seed(self.loader.seed, self.epoch, window_start, Stream.SHUFFLE_BUFFER)
            )
            self._permutations = {window_start: torch.randperm(length, generator=generator).tolist()}
        return self._permutations[window_start]


class SequenceReader:
    """Reads positions of an epoch's sequence in ascending order, keeping one shard open between calls.

    Missing samples (a shard that ended early) come back as None; each such shard is noted once in
    ``ended_early``.
    """

    def __init__(self, plan: EpochPlan) -> None:
        self.plan = plan
        self.ended_early: list[str] = []
        self._place: int | None = None
        self._reader: ShardReader | None = None
        self._samples: Iterator[Sample] | None = None
        self._next_member = 0
        self._target = 0

    def read(self, positions: Sequence[int]) -> dict[int, Sample | None]:
        return {position: self._sample_at(*self.plan.locate(position)) for position in positions}

    def _sample_at(self, place: int, member: int) -> Sample | None:
        if place != self._place or member < self._next_member:
            self._open(place)
        self._target = member
        while self._samples is not None and self._next_member <= member:
            sample = next(self._samples, None)
            if sample is None:
                self._end_shard()
                break
            self._next_member += 1
            if self._next_member > member:
                return sample
        return None

    def _open(self, place: int) -> None:
        self.close()
        self._place, self._next_member = place, 0
        try:
            self._reader = ShardReader(self.plan.url(place))
        except Exception as error:  # noqa: BLE001 - tarfile raises many types on a file that is not a tar
            self._note(place, f"{type(error).__name__}: {error}")
            return
        self._samples = self._reader.samples(read=lambda ordinal: ordinal == self._target)

    def _end_shard(self) -> None:
        """The open shard gave fewer samples than its count says."""
        place, reason = self._place, self._reader.ended_early or "its tar file ends there"
        self._note(place, reason, read=self._next_member)
        self._samples = None

    def _note(self, place: int, reason: str, read: int = 0) -> None:
        shard = self.plan.loader.shard_list.shards[self.plan.order[place]]
        self.ended_early.append(f"{shard.url}: {read} of {shard.samples} samples read ({reason})")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._samples = None, None


def _identity(item: Any) -> Any:
    return item


class ShardBatches(IterableDataset):
    """The batches of one epoch, ``start_batch`` on; DataLoader worker k of K makes batches
    start_batch + k, + K, ... so that its round robin hands them out in order."""

    def __init__(self, loader: ShardLoader, epoch: int, start_batch: int) -> None:
        self.loader, self.epoch, self.start_batch = loader, epoch, start_batch

    def __iter__(self) -> Iterator[Batch | RawBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = EpochPlan(self.loader, self.epoch)
        reader = SequenceReader(plan)
        unit_id, unit, spare = None, {}, None
        try:
            for batch in range(self.start_batch + worker, self.loader.batches_per_epoch, workers):
                identity, positions = plan.read_unit(batch)
                if identity != unit_id:
                    unit_id, unit = identity, reader.read(positions)
                    spare = next((s for s in unit.values() if s is not None), spare)
                yield self._assemble(plan, batch, unit, spare, reader)
        finally:
            reader.close()

    def _assemble(self, plan: EpochPlan, batch: int, unit: dict, spare: Sample | None, reader: SequenceReader):
        """The batch's samples, missing ones (a shard that ended early) taking the next sample of the
        batch, or a sample read before when the whole batch is missing."""
        positions = plan.batch_positions(batch)
        samples = [unit[p] for p in positions]
        if spare is not None and all(sample is None for sample in samples):
            samples[0] = spare
        samples, _ = fill_unreadable(samples, [0] * len(positions), _batch_name(plan, positions))
        seeds = [augment_seed(self.loader.seed, self.epoch, plan.dataset_index(p)) for p in positions]
        ended_early, reader.ended_early = tuple(reader.ended_early), []
        if self.loader.decoder is not None:
            return RawBatch([file_tensor(s.data) for s in samples], torch.tensor([s.label for s in samples]),
                            torch.tensor(seeds, dtype=torch.int64), tuple(s.name for s in samples), ended_early)
        return augmented_batch([decode_rgb(s.data) for s in samples], [s.label for s in samples], seeds,
                               [s.name for s in samples], ended_early, self.loader.transform)

def _batch_name(plan: EpochPlan, positions: list[int]) -> str:
    return f"the samples of {plan.url(plan.locate(positions[0])[0])} on"


class ShardLoader(PlannedLoader):
    """The :class:`~maescale.data.base.Loader` of ``data.kind=shards`` (see the module docstring)."""

    def __init__(
        self,
        shard_list: ShardList,
        transform: Callable[..., torch.Tensor],
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        train: bool = True,
        eval_subset: int | None = None,
        shuffle_buffer: int = 2048,
        decoder: DeviceDecoder | None = None,
    ) -> None:
        self.shard_list, self.transform, self.decoder = shard_list, transform, decoder
        self.num_workers = int(num_workers)
        self.shard_offsets = [0, *itertools.accumulate(shard.samples for shard in shard_list.shards)][:-1]
        streams = max(1, self.num_workers)
        per_stream = shard_list.num_samples // world_size // streams
        window = max(1, round(shuffle_buffer / batch_size)) * batch_size
        self.shape = StreamShape(batch_size, streams, per_stream // batch_size, window)
        super().__init__(
            shard_list.num_samples, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, train=train,
            eval_subset=eval_subset,
        )

    @cached_property
    def rank_eval_positions(self) -> torch.Tensor:
        """Evaluation: the positions this process reads (the sequence is the shards in stored order)."""
        return self.eval_selection()[self.rank :: self.world_size]

    def _count_batches(self) -> int:
        if self.train:
            return self.shape.streams * self.shape.batches_per_stream
        return super()._count_batches()

    @property
    def num_classes(self) -> int:
        if self.shard_list.num_classes is None:
            raise DataError(
                f"the shards of data.path={self.shard_list.source} do not say how many classes they hold: "
                f"give num_classes in their shard index"
            )
        return int(self.shard_list.num_classes)

    def rank_indices(self, epoch: int) -> torch.Tensor:
        """Dataset indices this process visits in ``epoch``, batch by batch (no file is read)."""
        if not self.train:
            return super().rank_indices(epoch)
        plan = EpochPlan(self, epoch)
        positions = [p for batch in range(self.batches_per_epoch) for p in plan.batch_positions(batch)]
        return torch.tensor([plan.dataset_index(p) for p in positions], dtype=torch.int64)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        return self._batches(epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        loader = DataLoader(
            ShardBatches(self, epoch, start_batch), batch_size=None, num_workers=self.num_workers,
            collate_fn=_identity, pin_memory=torch.cuda.is_available() and self.decoder is None,
            generator=seeded_generator(self.seed, epoch, Stream.LOADER),  # leaves the global RNG alone
        )
        for batch in loader:
            if self.decoder is not None:
                batch = self.decoder(batch)
            report_skipped(batch.skipped)
            yield batch


def build_shard_loader(
    data_cfg: Any, *, split: str, img_size: int | Sequence[int], in_chans: int, seed: int, rank: int,
    world_size: int, train: bool, eval_subset: int | None, augment: Any = None,
) -> ShardLoader:
    if in_chans != 3:
        raise ConfigError(f"data.kind=shards reads RGB pictures, but model.in_chans={in_chans}: use data.kind=folder")
    shard_list = list_shards(data_cfg.path, split)
    transform = build_transform(data_cfg, img_size, in_chans, train, augment)
    loader = ShardLoader(
        shard_list, transform, batch_size=data_cfg.batch_size, seed=seed, rank=rank, world_size=world_size,
        num_workers=data_cfg.num_workers, train=train, eval_subset=eval_subset,
        shuffle_buffer=data_cfg.shuffle_buffer, decoder=DeviceDecoder(transform) if data_cfg.decode == "gpu" else None,
    )
    if train and loader.batches_per_epoch == 0:
        raise DataError(
            f"the {shard_list.num_samples} samples of data.path={shard_list.source} over {world_size} process(es) x "
            f"{loader.shape.streams} worker stream(s) leave fewer than data.batch_size={data_cfg.batch_size} per "
            f"stream: an epoch would have no full batch; lower data.batch_size or data.num_workers"
        )
    return loader
