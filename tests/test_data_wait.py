"""`data_wait` in metrics.jsonl: the seconds per step the training loop spent blocked on its batches.

Real short pretraining runs through the CLI, in this process: the synthetic kind barely waits; a
kind registered here that sleeps before each batch shows the sleep; and a run whose loop body is
slow (a kNN check, a checkpoint and a figure after every step) does not count that body as waiting.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from conftest import maescale_printed

from maescale import data_kinds
from maescale.data import DataKind, register_kind
from maescale.data.loader import build_synthetic_loader
from maescale.metrics import read_metrics

SLEEP_SECONDS = 0.2  # before each batch of the slow kind: far above what a synthetic micro batch takes
RUN = [
    "model.name=mae_vit_micro_patch4", "data.synthetic_size=48", "data.batch_size=8", "data.num_workers=0",
    "schedule.epochs=1", "schedule.warmup_epochs=0", "train.max_steps=4", "train.log_every=2",
    "checkpoint.every_steps=100",
]
# After every step: a kNN check, a checkpoint and a figure, all in the loop body (none of it data wait).
BUSY_BODY = ["train.log_every=1", "checkpoint.every_steps=1", "train.figure_every=1", "monitor.knn_every=1",
             "monitor.bank_images=16", "monitor.val_images=8", "monitor.k=5"]


class SleepyLoader:
    """The synthetic loader, sleeping before it hands out each batch: a loader that cannot keep up."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # batch_size, batches_per_epoch, num_samples, num_classes, eval_selection

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int, start_batch: int = 0):
        batches = self.inner.epoch(epoch, start_batch)
        try:
            for batch in batches:
                time.sleep(SLEEP_SECONDS)
                yield batch
        finally:
            batches.close()


@pytest.fixture
def slow_kind(monkeypatch) -> str:
    """A data kind, registered for one test (the registry comes back as it was), whose loader sleeps."""
    monkeypatch.setattr(data_kinds, "_KINDS", dict(data_kinds._KINDS))
    name = f"slow-{uuid.uuid4().hex[:8]}"

    def build_sleepy_loader(data_cfg, **kwargs):
        return SleepyLoader(build_synthetic_loader(data_cfg, **kwargs))

    register_kind(name, DataKind(build=build_sleepy_loader, help="synthetic shapes, slowly"))
    return name


def training_rows(out: Path) -> list[dict]:
    """The rows with a loss (the kNN monitor logs rows of its own)."""
    return [row for row in read_metrics(out) if "loss" in row]


def pretrain(out: Path, *overrides: str) -> list[dict]:
    maescale_printed("pretrain", *RUN, f"output_dir={out}", *overrides)
    return training_rows(out)


def test_every_training_row_has_a_data_wait(tmp_path):
    rows = pretrain(tmp_path / "run", "data.kind=synthetic")
    assert [row["step"] for row in rows] == [2, 4]
    assert all(row["data_wait"] >= 0 for row in rows)


def test_a_slow_loader_shows_in_data_wait(slow_kind, tmp_path):
    fast = pretrain(tmp_path / "fast", "data.kind=synthetic")
    slow = pretrain(tmp_path / "slow", f"data.kind={slow_kind}")
    assert [row["step"] for row in slow] == [2, 4]
    # Each step waited at least the sleep: data_wait is per step, not per window.
    assert all(SLEEP_SECONDS * 0.95 <= row["data_wait"] < SLEEP_SECONDS * 3 for row in slow), slow
    assert all(row["data_wait"] < SLEEP_SECONDS / 4 for row in fast), fast


def test_the_loop_body_is_not_data_wait(tmp_path):
    rows = pretrain(tmp_path / "run", "data.kind=synthetic", *BUSY_BODY)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for before, after in zip(rows, rows[1:]):
        # From one row to the next: the kNN check, checkpoint and figure of a step, then the next step.
        wall_per_step = after["time"] - before["time"]
        assert after["data_wait"] < wall_per_step / 4, (after, wall_per_step)
