"""Seeds, random streams and epoch order: the pure functions of (seed, epoch, index) every loader shares.

Every random draw of a run derives from the run's seed through :func:`derive_seed`, mixed with
one of the :class:`Stream` tags so that the draws of different purposes (order, augmentation,
masks, ...) never share a stream even when they derive from the same (seed, epoch). A new
purpose gets a new tag here; the enum refuses a value used twice.

Consequences the trainer relies on: the worker count does not change a bit of any batch;
``epoch(e, start_batch=k)`` is exactly the tail of ``epoch(e)``, so a run resumed mid-epoch sees
the data of one that never stopped; each sample's augmentation and mask are independent of the
number of processes and of the rank.
"""

from __future__ import annotations

import enum

import torch

from ..errors import DataError


@enum.unique
class Stream(enum.IntEnum):
    """Domain tags mixed into seeds, one per purpose."""

    ORDER = 1  # the (seed, epoch) permutation of the training samples
    AUGMENT = 2  # per-sample crop and flip draws
    LOADER = 3  # torch DataLoader's own base seed
    MASK = 4  # per-sample MAE masking noise
    HEAD_ORDER = 5  # linear probe: batch order of the cached features
    MIXUP = 6  # fine-tuning: timm's Mixup draws (numpy's global RNG, seeded per step)
    QUASI_RANDOM = 7  # FFCV's page-local shuffle (data.ffcv_order=quasi_random)
    DROP_PATH = 8  # fine-tuning: stochastic depth (torch's global RNG, seeded per step)
    SHUFFLE_BUFFER = 9  # kind=shards: the permutation of each shuffling window


# ---------------------------------------------------------------- hashing

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One round of the SplitMix64 finaliser: a cheap, well-mixing 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(*parts: int) -> int:
    """Hash integers (e.g. seed, epoch, sample index, stream) into one 63-bit seed.

    Seeding a generator with ``seed + index`` would make neighbouring samples of
    neighbouring seeds share streams; hashing keeps every tuple independent.
    """
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def _as_int64(value: int) -> int:
    """The int64 with the bits of a uint64 constant (torch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors read as uint64 (`>>` is arithmetic on int64)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """`_splitmix64` elementwise on an int64 tensor (integer products wrap modulo 2^64)."""
    x = x + _as_int64(0x9E3779B97F4A7C15)
    x = (x ^ _shift_right(x, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _as_int64(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def mask_noise(seeds: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, num_patches] uniform noise in [0, 1) from [B] int64 seeds, on the seeds' device.

    Element (i, j) is the top 24 bits of ``_splitmix64(_splitmix64(seeds[i]) ^ j)``: a
    counter-based hash, so the noise is a pure function of the sample and the patch, drawn
    on the GPU in a few integer kernels for the whole batch (no generator per sample on the
    host, no copy of the noise to the device).
    """
    patch = torch.arange(num_patches, dtype=torch.int64, device=seeds.device)
    bits = _splitmix64_tensor(_splitmix64_tensor(seeds.to(torch.int64)).unsqueeze(1) ^ patch)
    return _shift_right(bits, 40).to(torch.float32) * 2.0**-24


# ---------------------------------------------------------------- per-sample seeds


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the crop and flip of dataset sample ``index`` in ``epoch``."""
    return derive_seed(seed, epoch, index, Stream.AUGMENT)


def mask_seed(sample_augment_seed: int) -> int:
    """Seed of a sample's MAE mask, derived from its augmentation seed."""
    return derive_seed(sample_augment_seed, Stream.MASK)


def sample_mask_seed(seed: int, epoch: int, index: int) -> int:
    """The mask seed of dataset sample ``index`` in ``epoch`` (what ``Batch.seeds`` holds)."""
    return mask_seed(augment_seed(seed, epoch, index))


# ---------------------------------------------------------------- epoch order


def shuffled_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of ``epoch``: a permutation of ``range(size)`` seeded by (seed, epoch)."""
    return torch.randperm(size, generator=seeded_generator(seed, epoch, Stream.ORDER))


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
        raise DataError(f"an eval subset of {subset} of {num_samples} images leaves nothing for {world_size} processes")
    return torch.arange(count) * num_samples // count
