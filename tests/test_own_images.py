"""Images that are not square RGB, end to end through the CLI: generated multi-channel files
(6-band uint16 TIFF stacks, 1-channel float .npy arrays) in the folder layout, `maescale stats`,
pretraining at 224 x 320, then linprobe and knn on the checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import maescale_printed
from test_matrix import checkpoint_of  # the tests folder is on sys.path (pytest rootdir)

from maescale.data.stats import STATS_FILE
from maescale.metrics import read_metrics

tifffile = pytest.importorskip("tifffile")

SIZE = [224, 320]  # height, width
SOURCE = (240, 344)  # files a little larger than the crops
# The micro model with 16 px patches: a 14 x 20 grid, and the steps stay fast.
MODEL = ["model.name=mae_vit_micro_patch4", "model.patch_size=16", f"model.img_size=[{SIZE[0]},{SIZE[1]}]"]
TRAIN, VAL, BATCH = 16, 8, 8


def band_image(rng: np.random.Generator, label: int, channels: int) -> np.ndarray:
    """(H, W, C) smooth bands plus noise; the class decides which bands are bright."""
    rows, cols = np.mgrid[0:SOURCE[0], 0:SOURCE[1]] / np.array(SOURCE).reshape(2, 1, 1)
    bands = [np.sin(2 * np.pi * (c + 1) * (rows if (c + label) % 2 else cols)) for c in range(channels)]
    image = 0.5 + 0.3 * np.stack(bands, axis=-1) + 0.05 * rng.standard_normal((*SOURCE, channels))
    brightness = np.array([1.0 if (c + label) % 2 else 0.6 for c in range(channels)])
    return np.clip(image * brightness, 0, 1)


def write_split(root: Path, count: int, channels: int, suffix: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for index in range(count):
        label = index % 2
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image = band_image(rng, label, channels)
        if suffix == ".tif":
            tifffile.imwrite(folder / f"{index:03d}.tif", (image * 65535).astype(np.uint16))
        else:
            np.save(folder / f"{index:03d}.npy", image[..., 0].astype(np.float32))


@pytest.fixture(scope="module", params=[(6, ".tif"), (1, ".npy")], ids=["6-band-tiff", "1-channel-npy"])
def pretrained(request, tmp_path_factory):
    """(channels, data overrides, run folder) after `maescale stats` and a short pretraining."""
    channels, suffix = request.param
    root = tmp_path_factory.mktemp(f"images-{channels}")
    write_split(root / "train", TRAIN, channels, suffix, seed=1)
    write_split(root / "val", VAL, channels, suffix, seed=2)
    printed = maescale_printed("stats", "--data.path", root, "--channels", channels)
    assert "data.mean=[" in printed and (root / STATS_FILE).is_file()
    data = ["data.kind=folder", f"data.path={root}", f"data.batch_size={BATCH}", "data.num_workers=0"]
    out = tmp_path_factory.mktemp("run") / "run"
    maescale_printed("pretrain", f"output_dir={out}", *MODEL, f"model.in_chans={channels}", *data, "schedule.epochs=10",
            "schedule.warmup_epochs=1", "optim.lr=3e-3", "train.log_every=1", "checkpoint.every_steps=100")
    return channels, data, out, root


def test_stats_file_holds_one_mean_and_std_per_channel(pretrained):
    channels, _, _, root = pretrained
    stats = yaml.safe_load((root / STATS_FILE).read_text())
    assert len(stats["mean"]) == len(stats["std"]) == channels
    assert all(0.1 < m < 0.9 and 0 < s < 0.5 for m, s in zip(stats["mean"], stats["std"]))


def test_pretraining_learns_and_writes_a_figure_and_a_checkpoint(pretrained):
    channels, _, out, _ = pretrained
    losses = [row["loss"] for row in read_metrics(out) if "loss" in row]
    assert len(losses) == 10 * TRAIN // BATCH
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:2]), losses
    assert (out / "reconstruction.png").is_file()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["in_chans"] == channels and config["model"]["img_size"] == SIZE
    assert checkpoint_of(out).name == f"step_{len(losses):08d}"


@pytest.mark.parametrize("protocol", ["linprobe", "knn"])
def test_linprobe_and_knn_run_on_the_checkpoint(pretrained, protocol, tmp_path):
    _, data, out, _ = pretrained
    linprobe = ["linprobe.epochs=2", "linprobe.warmup_epochs=1", f"linprobe.batch_size={BATCH}"]
    extra = linprobe if protocol == "linprobe" else ["knn.k=3"]
    printed = maescale_printed(protocol, f"output_dir={tmp_path}", f"encoder.ckpt={checkpoint_of(out)}", *data, *extra)
    assert f"{protocol} val: top-1" in printed or f"({VAL} images, bank of" in printed
    (row, *_) = [r for r in reversed(read_metrics(tmp_path)) if r.get("protocol") == protocol]
    assert 0 <= row["top1"] <= row["top5"] <= 100
