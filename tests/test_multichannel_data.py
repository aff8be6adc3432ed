"""Multi-channel data on real files: TIFF stacks and .npy arrays of 1 and 6 channels, 40 x 60 pixels,
uint16 / uint8 / float32, read by data.kind=folder; `maescale stats`; what FFCV and missing
statistics refuse."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from maescale.__main__ import main
from maescale.config import DataConfig, load_config
from maescale.data import build_loader
from maescale.data.arrays import ChannelLayoutError, load_array
from maescale.data.ffcv_writer import refuse_array_files
from maescale.data.folder import ImageFolderDataset
from maescale.data.stats import STATS_FILE, read_stats_file
from maescale.data.transforms import EvalTransform, cover_size
from maescale.errors import ConfigError, DataError, MissingExtraError

HEIGHT, WIDTH = 40, 60
CHANNELS = 6
OUTPUT = [16, 24]  # [height, width] of the crops
MEAN6, STD6 = [0.5] * CHANNELS, [0.25] * CHANNELS


def random_pixels(seed: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "u":
        return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 3 + 10).astype(dtype)  # floats well outside [0, 1]


def truncated_copy(source: Path, target: Path) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def write_multispectral_folder(root: Path) -> Path:
    """tif/ holds uint16 TIFFs, channel-last; npy/ float32 arrays, channel-first; each also one bad file
    (a truncated TIFF, an array with a NaN pixel): BAD6."""
    (root / "tif").mkdir(parents=True)
    (root / "npy").mkdir()
    for i in range(3):
        tifffile.imwrite(root / "tif" / f"{i}.tif", random_pixels(i, (HEIGHT, WIDTH, CHANNELS), np.uint16))
        np.save(root / "npy" / f"{i}.npy", random_pixels(10 + i, (CHANNELS, HEIGHT, WIDTH), np.float32))
    truncated_copy(root / "tif" / "0.tif", root / "tif" / "3_truncated.tif")
    holey = random_pixels(20, (CHANNELS, HEIGHT, WIDTH), np.float32)
    holey[2, 5, 5] = np.nan
    np.save(root / "npy" / "3_nan.npy", holey)
    return root


@pytest.fixture(scope="module")
def root6(tmp_path_factory) -> Path:
    return write_multispectral_folder(tmp_path_factory.mktemp("multispectral"))


BAD6 = ("tif/3_truncated.tif", "npy/3_nan.npy")


def reference_pixels(path: Path) -> np.ndarray:
    """[C, H, W] float64 of a good file of ``root6``, computed here from its known layout."""
    if path.suffix == ".tif":
        return np.moveaxis(tifffile.imread(path), -1, 0) / 65535.0
    return np.load(path).astype(np.float64)


def data_cfg(root: Path, **overrides) -> DataConfig:
    return DataConfig(**{"kind": "folder", "path": str(root), "batch_size": 2, "num_workers": 0, **overrides})


def unreadable_notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]


# ---------------------------------------------------------------- reading files


def test_channel_first_and_channel_last_files_read_the_same(tmp_path):
    pixels = random_pixels(0, (CHANNELS, HEIGHT, WIDTH), np.uint16)
    tifffile.imwrite(tmp_path / "first.tif", pixels)
    tifffile.imwrite(tmp_path / "last.tiff", np.moveaxis(pixels, 0, -1))
    np.save(tmp_path / "last.npy", np.moveaxis(pixels, 0, -1))
    expected = torch.from_numpy(pixels.astype(np.float32) / 65535)
    for name in ("first.tif", "last.tiff", "last.npy"):
        image = load_array(str(tmp_path / name), CHANNELS)
        assert image.shape == (CHANNELS, HEIGHT, WIDTH) and image.dtype == torch.float32
        assert torch.equal(image, expected), name


def test_values_are_scaled_by_type(tmp_path):
    np.save(tmp_path / "u8.npy", np.full((HEIGHT, WIDTH), 51, np.uint8))
    np.save(tmp_path / "u16.npy", np.full((HEIGHT, WIDTH), 13107, np.uint16))
    np.save(tmp_path / "f32.npy", np.full((HEIGHT, WIDTH), -7.5, np.float32))
    np.save(tmp_path / "i16.npy", np.full((HEIGHT, WIDTH), -300, np.int16))
    values = {name: load_array(str(tmp_path / f"{name}.npy"), 1) for name in ("u8", "u16", "f32", "i16")}
    assert all(v.shape == (1, HEIGHT, WIDTH) for v in values.values())
    assert values["u8"].unique().tolist() == [pytest.approx(0.2)]  # 51 / 255
    assert values["u16"].unique().tolist() == [pytest.approx(0.2)]  # 13107 / 65535
    assert values["f32"].unique().tolist() == [-7.5] and values["i16"].unique().tolist() == [-300.0]


def test_wrong_or_ambiguous_channel_axis_is_refused(tmp_path):
    np.save(tmp_path / "four.npy", np.zeros((HEIGHT, WIDTH, 4), np.float32))
    with pytest.raises(ChannelLayoutError, match=r"four.npy: shape \(40, 60, 4\) has no axis of 6 channels"):
        load_array(str(tmp_path / "four.npy"), CHANNELS)
    np.save(tmp_path / "cube.npy", np.zeros((CHANNELS, HEIGHT, CHANNELS), np.float32))
    with pytest.raises(ChannelLayoutError, match="could be channel-first or channel-last"):
        load_array(str(tmp_path / "cube.npy"), CHANNELS)
    # A whole folder of the wrong count stops the loader at once, with the same message.
    (tmp_path / "class").mkdir()
    (tmp_path / "four.npy").rename(tmp_path / "class" / "four.npy")
    with pytest.raises(ChannelLayoutError, match="has no axis of 6 channels"):
        build_loader(data_cfg(tmp_path, mean=MEAN6, std=STD6), img_size=OUTPUT, in_chans=CHANNELS, seed=0)


def test_pictures_need_three_channels(tmp_path):
    (tmp_path / "class").mkdir()
    Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "class" / "photo.png")
    with pytest.raises(DataError, match="photo.png: pictures .* 3-channel RGB, but the model takes 6"):
        ImageFolderDataset(tmp_path, channels=CHANNELS)


def test_compressed_tiff_without_imagecodecs_names_the_extra(tmp_path):
    if importlib.util.find_spec("imagecodecs") is not None:
        pytest.skip("imagecodecs is installed: tifffile would decode the file instead")
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, random_pixels(0, (HEIGHT, WIDTH, CHANNELS), np.uint16))
    with tifffile.TiffFile(path) as tiff:
        offset = tiff.pages[0].tags["Compression"].valueoffset
    data = bytearray(path.read_bytes())
    data[offset : offset + 2] = (5).to_bytes(2, "little")  # the tag now says LZW
    path.write_bytes(bytes(data))
    with pytest.raises(MissingExtraError, match=r"lzw.tif: .*imagecodecs.*maescale\[tiff\]"):
        load_array(str(path), CHANNELS)


# ---------------------------------------------------------------- loader batches


def test_loader_batches_have_every_channel_at_the_model_size(root6):
    cfg = data_cfg(root6, mean=MEAN6, std=STD6)
    for train in (True, False):
        loader = build_loader(cfg, img_size=OUTPUT, in_chans=CHANNELS, seed=0, train=train, split="train")
        batches = list(loader.epoch(0))
        assert batches and all(b.images.shape[1:] == (CHANNELS, *OUTPUT) for b in batches)
        assert all(b.images.dtype == torch.float32 and torch.isfinite(b.images).all() for b in batches)
    assert sum(len(b.labels) for b in batches) == 8  # eval mode: every file (bad ones substituted)


def test_crops_vary_by_epoch_and_repeat_for_a_seed(root6):
    cfg = data_cfg(root6, mean=MEAN6, std=STD6, batch_size=4)

    def by_index(seed: int, epoch: int) -> dict[int, torch.Tensor]:
        loader = build_loader(cfg, img_size=OUTPUT, in_chans=CHANNELS, seed=seed)
        images = torch.cat([b.images for b in loader.epoch(epoch)])
        return dict(zip(loader.rank_indices(epoch).tolist(), images))

    first, again, later = by_index(0, 0), by_index(0, 0), by_index(0, 1)
    assert first.keys() == again.keys() and all(torch.equal(first[i], again[i]) for i in first)
    shared = first.keys() & later.keys()
    assert shared and all(not torch.equal(first[i], later[i]) for i in shared)


def test_bad_files_are_skipped_and_reported_once(tmp_path, caplog):
    # A folder of its own: each process reports a path once, and other tests read root6's bad files.
    root6 = write_multispectral_folder(tmp_path)
    loader = build_loader(data_cfg(root6, mean=MEAN6, std=STD6), img_size=OUTPUT, in_chans=CHANNELS, seed=0,
                          train=False)
    with caplog.at_level(logging.WARNING, logger="maescale"):
        skipped = [path for _ in range(2) for batch in loader.epoch(0) for path in batch.skipped]
    bad = sorted(str(root6 / name) for name in BAD6)
    assert sorted(skipped) == sorted(bad * 2)  # counted in every epoch...
    notices = unreadable_notices(caplog)
    assert len(notices) == 2 and all(any(path in n for n in notices) for path in bad)  # ...reported once


def test_one_channel_files_of_every_layout(tmp_path):
    (tmp_path / "grey").mkdir()
    tifffile.imwrite(tmp_path / "grey" / "a.tif", random_pixels(0, (HEIGHT, WIDTH), np.uint8))
    np.save(tmp_path / "grey" / "b.npy", random_pixels(1, (HEIGHT, WIDTH, 1), np.float32))
    tifffile.imwrite(tmp_path / "grey" / "c.tif", random_pixels(2, (1, HEIGHT, WIDTH), np.uint16))
    loader = build_loader(data_cfg(tmp_path, mean=[0.5], std=[0.3], batch_size=3), img_size=[20, 30], in_chans=1,
                          seed=0, train=False)
    (batch,) = list(loader.epoch(0))
    assert batch.images.shape == (3, 1, 20, 30) and batch.skipped == ()


def test_eval_resize_covers_a_rectangle_without_stretching():
    assert cover_size(HEIGHT, WIDTH, (18, 27)) == [18, 27]  # same aspect: just a resize
    assert cover_size(50, 50, (18, 27)) == [27, 27]  # square source: the width decides
    assert cover_size(100, 30, (18, 27)) == [90, 27]
    # A picture whose left half is dark keeps its proportions in a 16 x 24 centre crop.
    image = torch.zeros(CHANNELS, HEIGHT, WIDTH)
    image[:, :, WIDTH // 2 :] = 1
    output = EvalTransform(OUTPUT, crop_pct=1.0, mean=[0] * CHANNELS, std=[1] * CHANNELS, clip=False)(image)
    assert output.shape == (CHANNELS, *OUTPUT)
    assert output[:, :, :10].max() < 0.05 and output[:, :, 14:].min() > 0.95


def test_synthetic_data_takes_any_channel_count():
    cfg = DataConfig(batch_size=4, num_workers=0, synthetic_size=8)
    (batch, *_) = build_loader(cfg, img_size=[8, 12], in_chans=5, seed=0).epoch(0)
    assert batch.images.shape == (4, 5, 8, 12)
    # Channels 3 and 4 repeat R and G, normalised with the same statistics.
    assert torch.equal(batch.images[:, 3], batch.images[:, 0]) and torch.equal(batch.images[:, 4], batch.images[:, 1])


# ---------------------------------------------------------------- statistics


def test_stats_command_measures_what_numpy_measures(root6, tmp_path, capsys):
    out = tmp_path / "stats.yaml"
    assert main(["stats", "--data.path", str(root6), "--channels", "6", "--workers", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    good = sorted(p for p in root6.rglob("*.*") if p.relative_to(root6).as_posix() not in BAD6)
    pixels = np.concatenate([reference_pixels(p).reshape(CHANNELS, -1) for p in good], axis=1)
    mean, std = pixels.mean(axis=1), pixels.std(axis=1)
    written = yaml.safe_load(out.read_text())
    assert written["images"] == 6 and written["skipped"] == 2
    np.testing.assert_allclose(written["mean"], mean, atol=1e-4)
    np.testing.assert_allclose(written["std"], std, atol=1e-4)
    # The printed line is a pair of overrides that a run takes as they are.
    overrides = next(line for line in printed.splitlines() if line.startswith("data.mean=")).split()
    parsed = load_config(None, ["data.kind=folder", f"data.path={root6}", *overrides]).data
    np.testing.assert_allclose(parsed.mean, mean, atol=1e-4)
    np.testing.assert_allclose(parsed.std, std, atol=1e-4)


def test_stats_file_in_the_root_is_what_a_run_normalises_with(root6, tmp_path, capsys):
    root = tmp_path / "copy"
    root.mkdir()
    for folder in ("tif", "npy"):
        (root / folder).symlink_to(root6 / folder, target_is_directory=True)
    command = re.escape(f"`maescale stats --data.path {root} --channels 6`")
    with pytest.raises(ConfigError, match=f"{command}.*or set data.mean"):
        build_loader(data_cfg(root), img_size=OUTPUT, in_chans=CHANNELS, seed=0)
    assert main(["stats", "--data.path", str(root), "--channels", "6", "--max-images", "3", "--workers", "1"]) == 0
    assert f"wrote {root / STATS_FILE}" in capsys.readouterr().out
    stats = read_stats_file(root / STATS_FILE)
    assert yaml.safe_load((root / STATS_FILE).read_text())["images"] == 3
    loader = build_loader(data_cfg(root), img_size=OUTPUT, in_chans=CHANNELS, seed=0)
    assert (loader.transform.mean, loader.transform.std) == stats
    # data.mean / data.std win over the file; a file of another channel count is refused by name.
    loader = build_loader(data_cfg(root, mean=MEAN6, std=STD6), img_size=OUTPUT, in_chans=CHANNELS, seed=0)
    assert loader.transform.mean == tuple(MEAN6)
    (root / STATS_FILE).write_text("mean: [0.1, 0.2, 0.3, 0.4]\nstd: [1, 1, 1, 1]\n")
    mismatch = re.escape(f"{STATS_FILE} hold statistics of 4 channels, but the model takes 6")
    with pytest.raises(ConfigError, match=mismatch):
        build_loader(data_cfg(root), img_size=OUTPUT, in_chans=CHANNELS, seed=0)


def test_stats_command_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "class").mkdir()
    Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "class" / "photo.jpg")
    assert main(["stats", "--data.path", str(tmp_path), "--channels", "6", "--workers", "0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("maescale stats: error: ") and "photo.jpg" in error and "\n" not in error


# ---------------------------------------------------------------- FFCV


def test_ffcv_refuses_multichannel_data_naming_the_folder_kind(root6, tmp_path):
    cfg = DataConfig(kind="ffcv", path=str(tmp_path / "train.beton"), batch_size=2)
    with pytest.raises(ConfigError, match="data.kind=ffcv reads 3-channel RGB images only.*use data.kind=folder"):
        build_loader(cfg, img_size=32, in_chans=CHANNELS, seed=0)
    with pytest.raises(ConfigError, match="square images only.*use data.kind=folder"):
        build_loader(cfg, img_size=OUTPUT, seed=0)
    with pytest.raises(DataError, match="write-beton stores RGB pictures only.* 8 multi-channel files.*kind=folder"):
        refuse_array_files(ImageFolderDataset(root6))
