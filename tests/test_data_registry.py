"""A data kind registered from outside maescale trains like a built-in one.

The kind below, written here and nowhere in maescale, is one builder and one `register_kind`
call; `data.kind=grey` then pretrains (training loader, figure images), is checked with its own
rule, and names itself when its optional package is missing. Unknown kinds are refused with
the list of registered ones.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_maescale

from maescale import checkpoint, data_kinds
from maescale.config import ConfigError, describe_keys, load_config, required_extras
from maescale.data import Batch, DataKind, Extra, Loader, build_loader, kind_names, register_kind, sample_mask_seed
from maescale.metrics import read_metrics
from maescale.sizes import image_hw
from maescale.train import pretrain

KIND = "grey"
CLASSES = 4
FAST_RUN = [
    "model.name=mae_vit_micro_patch4", f"data.kind={KIND}", "data.synthetic_size=64", "data.batch_size=8",
    "data.num_workers=0", "schedule.epochs=1", "schedule.warmup_epochs=0", "train.max_steps=2", "train.log_every=1",
]


class GreyLoader:
    """The Loader protocol and nothing more: noisy grey images whose level is the class, in index order."""

    num_classes = CLASSES

    def __init__(self, num_samples: int, *, batch_size: int, img_size, in_chans: int, seed: int, rank: int,
                 world_size: int, train: bool) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shape = (in_chans, *image_hw(img_size))
        self.rank, self.world_size = rank, world_size
        per_rank = num_samples // world_size if train else math.ceil(num_samples / world_size)
        self.batches_per_epoch = per_rank // batch_size if train else math.ceil(per_rank / batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0):
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        return (self._batch(epoch, number) for number in range(start_batch, self.batches_per_epoch))

    def eval_selection(self) -> torch.Tensor:
        return torch.arange(self.num_samples)

    def _batch(self, epoch: int, number: int) -> Batch:
        first = (number * self.world_size + self.rank) * self.batch_size
        indices = torch.arange(first, min(first + self.batch_size, self.num_samples))
        labels = indices % CLASSES
        noise = torch.rand(len(indices), *self.shape, generator=torch.Generator().manual_seed(first))
        images = labels.float().view(-1, 1, 1, 1) / CLASSES + 0.1 * noise
        seeds = torch.tensor([sample_mask_seed(self.seed, epoch, int(i)) for i in indices], dtype=torch.int64)
        return Batch(images, labels, (), seeds)


def check_grey(data_cfg) -> None:
    if data_cfg.synthetic_size < data_cfg.batch_size:
        raise ConfigError(f"data.synthetic_size={data_cfg.synthetic_size} holds no batch of data.kind={KIND}")


@pytest.fixture
def built(monkeypatch) -> list[tuple[bool, str]]:
    """Registers the grey kind for one test (the registry as it was comes back after it); lists
    (train, split) of every loader the kind builds."""
    monkeypatch.setattr(data_kinds, "_KINDS", dict(data_kinds._KINDS))
    calls = []

    def build_grey_loader(data_cfg, *, img_size, in_chans, seed, rank, world_size, train, split, eval_subset):
        calls.append((train, split))
        return GreyLoader(data_cfg.synthetic_size, batch_size=data_cfg.batch_size, img_size=img_size,
                          in_chans=in_chans, seed=seed, rank=rank, world_size=world_size, train=train)

    register_kind(KIND, DataKind(build=build_grey_loader, check=check_grey, help="grey levels, one per class"))
    return calls


def test_a_kind_registered_outside_maescale_pretrains(built, tmp_path):
    out = tmp_path / "run"
    summary = pretrain(load_config(None, [*FAST_RUN, f"output_dir={out}"]))
    assert summary["step"] == 2
    assert summary["checkpoint"] == checkpoint.latest(checkpoint.checkpoint_root(out))
    assert summary["checkpoint"].name == checkpoint.step_name(2)
    assert [row["step"] for row in read_metrics(out)] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in read_metrics(out))
    assert (out / "reconstruction.png").is_file()
    assert (True, "train") in built and (False, "train") in built  # the training loader and the figure images


def test_the_kind_implements_the_loader_protocol(built):
    cfg = load_config(None, FAST_RUN).data
    loader = build_loader(cfg, img_size=[8, 12], in_chans=2, seed=0, train=False)
    assert isinstance(loader, Loader)
    batch = next(loader.epoch(0))
    assert batch.images.shape == (8, 2, 8, 12) and batch.labels.tolist() == [0, 1, 2, 3] * 2


def test_the_kind_checks_its_own_keys(built):
    with pytest.raises(ConfigError, match=f"data.synthetic_size=4 holds no batch of data.kind={KIND}"):
        load_config(None, [*FAST_RUN, "data.synthetic_size=4"])
    with pytest.raises(ConfigError, match="data.batch_size must be positive"):  # the generic checks still run
        load_config(None, [*FAST_RUN, "data.batch_size=0"])


def test_an_unknown_kind_is_refused_with_the_registered_ones(built):
    # Every kind registered in this process, those other tests registered included, sorted.
    assert {"ffcv", "folder", KIND, "synthetic"} <= set(kind_names())
    expected = f"data.kind must be one of {', '.join(map(repr, kind_names()))}, got 'tfrecord'"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, ["data.kind=tfrecord"])
    result = run_maescale("pretrain", "data.kind=tfrecord", ok=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"maescale pretrain: error: {expected}"]


def test_a_taken_name_is_refused(built):
    with pytest.raises(ValueError, match="'folder' is already registered"):
        register_kind("folder", DataKind(build=build_loader))


def test_a_missing_extra_names_the_kind(built, tmp_path):
    register_kind("tape", DataKind(build=build_loader, extra=Extra("maescale_tape_reader", "tape")))
    cfg = load_config(None, [*FAST_RUN, "data.kind=tape"])
    assert ("maescale_tape_reader", "tape", "data.kind=tape") in required_extras(cfg)
    result = run_maescale("pretrain", *FAST_RUN, "data.kind=tape", f"output_dir={tmp_path / 'run'}", ok=False)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("maescale pretrain: error: data.kind=tape needs maescale_tape_reader, which is not")
    assert line.endswith("pip install 'maescale[tape]'")
    assert not (tmp_path / "run").exists()


def test_the_help_lists_the_built_in_kinds():
    [help_text] = [text for key, _, text in describe_keys() if key == "data.kind"]
    for name in ("synthetic", "folder", "ffcv"):
        assert f"{name}: " in help_text


def test_the_config_reads_the_registry_without_torch():
    """The registry lives outside maescale/data so that the config (and `maescale --help`) stay light."""
    code = "import sys, maescale.config; print(sorted(m for m in ('torch', 'maescale.data') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"


def test_every_built_in_builder_name_resolves():
    """The built-in kinds name their builders as strings (the registry stays free of torch): no typo."""
    for name in data_kinds.kind_names():
        assert callable(data_kinds.data_kind(name).builder()), name
