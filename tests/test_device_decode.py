"""data.decode=gpu: workers read bytes, the training process decodes and augments on its device.

Here the device is the CPU (the same code as on a GPU); the CUDA test runs where a GPU is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import maescale_printed
from PIL import Image

from maescale.config import load_config
from maescale.data import build_loader
from maescale.data.device_decode import RawBatch, fill_unreadable
from maescale.data.loader import EpochLoader
from maescale.data.shard_loader import ShardBatches
from maescale.errors import ConfigError, DataError

BATCH = 6


def photo(seed: int, size=(52, 40)) -> np.ndarray:
    """A smooth random picture with detail (crops of it differ visibly wherever they are taken)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC))


@pytest.fixture(scope="module")
def picture_folder(tmp_path_factory) -> Path:
    """root/<class>/ of 22 JPEGs (baseline, progressive, greyscale) and 2 PNGs, in 2 classes."""
    root = tmp_path_factory.mktemp("pictures")
    for index in range(24):
        folder = root / f"class_{index % 2}"
        folder.mkdir(exist_ok=True)
        image = Image.fromarray(photo(index, size=(52 + index, 40)))
        if index in (5, 17):
            image.save(folder / f"{index:02d}.png")
        elif index == 9:
            image.convert("L").save(folder / f"{index:02d}.jpg", quality=85)
        else:
            image.save(folder / f"{index:02d}.jpg", quality=90, progressive=index % 3 == 0)
    return root


@pytest.fixture(scope="module")
def shard_folder(picture_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "train"
    maescale_printed("write-shards", "--src", picture_folder, "--out", out, "--samples-per-shard", 5)
    return out


def data_cfg(kind: str, path: Path, decode: str, *overrides: str):
    return load_config(None, [f"data.kind={kind}", f"data.path={path}", f"data.batch_size={BATCH}",
                              f"data.decode={decode}", "data.num_workers=0", "data.shuffle_buffer=12",
                              *overrides]).data


def both_paths(kind: str, path: Path, train: bool, *overrides: str):
    """The batches of one epoch decoded in the workers and on the device."""
    return [list(build_loader(data_cfg(kind, path, decode, *overrides), img_size=32, seed=4, train=train,
                              split="train").epoch(1)) for decode in ("cpu", "gpu")]


@pytest.mark.parametrize("kind", ["folder", "shards"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_device_path_gives_the_worker_path_batches(picture_folder, shard_folder, kind, train):
    """Same samples, labels, crops and flips (seeded by (seed, epoch, index)), and the same pixels: on the
    CPU both decoders are libjpeg-turbo, so only the resize's rounding may differ."""
    path = picture_folder if kind == "folder" else shard_folder
    cpu, device = both_paths(kind, path, train)
    assert len(cpu) == len(device) > 0
    for a, b in zip(cpu, device):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.seeds, b.seeds)
        assert (a.images - b.images).abs().max() < 0.02


def test_crop_geometry_is_the_worker_paths_under_every_draw(picture_folder):
    """Without decoder rounding (PNG files only), the two paths agree bit for bit: the same crop boxes."""
    pngs = picture_folder.parent / "pngs"
    for index in range(8):
        (pngs / f"c{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(100 + index, size=(60 + 3 * index, 44))).save(pngs / f"c{index % 2}" / f"{index}.png")
    cpu, device = both_paths("folder", pngs, True, "data.batch_size=4")
    assert all(torch.equal(a.images, b.images) for a, b in zip(cpu, device))


def test_workers_hand_over_file_bytes_only(picture_folder, shard_folder):
    folder = build_loader(data_cfg("folder", picture_folder, "gpu"), img_size=32, seed=0)
    assert isinstance(folder, EpochLoader) and folder.decoder is not None
    raw = folder._samples[(0, 1)]
    assert raw[0].dtype == torch.uint8 and bytes(raw[0][:2].tolist()) == b"\xff\xd8"  # the JPEG file itself
    shards = build_loader(data_cfg("shards", shard_folder, "gpu"), img_size=32, seed=0)
    batch = next(iter(ShardBatches(shards, 0, 0)))
    assert isinstance(batch, RawBatch) and len(batch.files) == BATCH and batch.files[0].ndim == 1


def test_an_undecodable_file_is_replaced_by_the_next_picture_of_its_batch(picture_folder, tmp_path, caplog):
    broken = tmp_path / "broken"
    for path in sorted(picture_folder.rglob("*.*")):
        target = broken / path.relative_to(picture_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    bad = broken / "class_0" / "02.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    loader = build_loader(data_cfg("folder", broken, "gpu"), img_size=32, seed=0, train=False, split="train")
    with caplog.at_level(logging.WARNING, logger="maescale"):
        batches = list(loader.epoch(0))
    assert sum(len(b.images) for b in batches) == 24 and all(torch.isfinite(b.images).all() for b in batches)
    assert [name for b in batches for name in b.skipped] == [str(bad)]
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    # the slot took the next picture of its batch (04.jpg follows 02.jpg in class_0)
    first = batches[0]
    assert torch.equal(first.images[1], first.images[2])


def test_filling_takes_the_next_present_item_cyclically():
    assert fill_unreadable([None, "a", None, "b", None], [0, 1, 2, 3, 4], "x") == (
        ["a", "a", "b", "b", "a"], [1, 1, 3, 3, 1])
    with pytest.raises(DataError, match="no readable picture"):
        fill_unreadable([None, None], [0, 1], "x")


def test_kinds_without_picture_files_refuse_device_decoding(tmp_path):
    with pytest.raises(ConfigError, match=r"picture files \(folder, shards\); data.kind=synthetic does not"):
        load_config(None, ["data.kind=synthetic", "data.decode=gpu"])
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "x.npy", np.zeros((4, 8, 8), np.float32))
    cfg = data_cfg("folder", tmp_path, "gpu")
    with pytest.raises(ConfigError, match="decodes pictures, not multi-channel files"):
        build_loader(cfg, img_size=8, in_chans=4, seed=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_batches_are_decoded_there_and_match_the_cpu_path(picture_folder, shard_folder):
    for kind, path in (("folder", picture_folder), ("shards", shard_folder)):
        for train in (True, False):
            cpu, device = both_paths(kind, path, train)
            for a, b in zip(cpu, device):
                assert b.images.is_cuda and torch.equal(a.labels, b.labels)
                difference = (a.images - b.images.cpu()).abs()
                # nvJPEG's IDCT and the GPU's float resize round differently from libjpeg-turbo and
                # the CPU's uint8 resize: a few levels of 255 at most, mostly none
                assert difference.mean() < 0.03 and difference.max() < 0.5
