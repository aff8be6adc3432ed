"""FFCV data path: write-beton on real JPEG files, the data.kind=ffcv loader (train crops,
eval, 2 gloo ranks), a pretraining run, and the upstream fix in ffcv_compat.

FFCV errors tend to show up as hangs, so every FFCV call here runs under a deadline
(subprocess timeouts, or SIGALRM in this process). The first epoch of each loader
spends seconds compiling its pipeline (~4x longer with more than one thread, which
compiles parallel loops): the tests share loaders and use one thread.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from processes import run_ranks

from maescale.data.ffcv_compat import ffcv_available, group_operations
from maescale.data.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.skipif(
    not ffcv_available(), reason="ffcv is not installed (pip install -e '.[ffcv]', see README)"
)

REPO = Path(__file__).resolve().parents[1]
BSDS = REPO.parent / "shared" / "data" / "bsds500-jpeg.tar.gz"
PHOTOS, GRADIENTS = 22, 8
SOURCE_PX = (120, 90)  # photo crops (width, height): small keeps the tests fast
MAX_RESOLUTION = 64
IMG_SIZE = 32


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging) if the block takes longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"FFCV call did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _photos(count: int, workdir: Path) -> list[Image.Image]:
    """Crops of BSDS500 photographs when ../shared/data has them, else textured PIL images."""
    if BSDS.is_file():
        with tarfile.open(BSDS) as archive:
            members = sorted((m for m in archive.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)[:count]
            photos = []
            for member in members:
                with Image.open(archive.extractfile(member)) as image:
                    photos.append(image.convert("RGB").crop((100, 80, 100 + SOURCE_PX[0], 80 + SOURCE_PX[1])))
            return photos
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(count)]
    return [Image.fromarray(s).resize(SOURCE_PX, Image.BICUBIC) for s in small]


def _gradient(size: int) -> Image.Image:
    """Red grows left to right, green top to bottom: a crop's colour range shows its box."""
    ramp = np.linspace(0, 255, size)
    red, green = np.meshgrid(ramp, ramp)
    return Image.fromarray(np.stack([red, green, np.full_like(red, 128)], axis=-1).round().astype(np.uint8))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """``gradient/`` (label 0) and ``photo/`` (label 1, one greyscale, one truncated file)."""
    root = tmp_path_factory.mktemp("jpegs")
    (root / "gradient").mkdir()
    (root / "photo").mkdir()
    for i in range(GRADIENTS):
        _gradient(96).save(root / "gradient" / f"g{i:02d}.jpg", quality=95)
    for i, photo in enumerate(_photos(PHOTOS, root)):
        photo.save(root / "photo" / f"p{i:02d}.jpg", quality=90)
    Image.open(root / "photo" / "p00.jpg").convert("L").save(root / "photo" / "p00_grey.jpg")
    data = (root / "photo" / "p01.jpg").read_bytes()
    (root / "photo" / "p01_truncated.jpg").write_bytes(data[: len(data) // 3])
    return root


@pytest.fixture(scope="module")
def written(image_folder, tmp_path_factory):
    from maescale.data.ffcv_writer import BetonOptions, write_beton

    out = tmp_path_factory.mktemp("beton") / "train.beton"
    summary = write_beton(image_folder, out, BetonOptions(max_resolution=MAX_RESOLUTION, num_workers=2))
    return out, summary


@pytest.fixture(scope="module")
def train_loader(written):
    from maescale.data.ffcv_loader import FFCVEpochLoader

    with deadline(300):
        yield FFCVEpochLoader(written[0], img_size=IMG_SIZE, batch_size=8, seed=5, num_workers=1, train=True)


def stored_labels(path: Path) -> np.ndarray:
    from ffcv.reader import Reader

    return Reader(str(path)).metadata["f1"]


def normalised_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


# ------------------------------------------------------------------ writer


def test_writer_skips_truncated_file_and_is_deterministic(image_folder, written, tmp_path):

    out, summary = written
    total = GRADIENTS + PHOTOS + 2
    assert summary.written == total - 1 and summary.classes == ["gradient", "photo"]
    assert [path for path, _ in summary.skipped] == [str(image_folder / "photo" / "p01_truncated.jpg")]
    assert "truncated" in summary.skipped[0][1]
    labels = stored_labels(out)
    assert labels.tolist() == [0] * GRADIENTS + [1] * (PHOTOS + 1)
    # The CLI on the same folder writes the very same bytes.
    again = tmp_path / "again.beton"
    result = subprocess.run(
        [sys.executable, "-m", "maescale", "write-beton", "--src", str(image_folder), "--out", str(again),
         "--max-resolution", str(MAX_RESOLUTION), "--workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{total - 1} images, 2 classes; skipped 1 unreadable" in result.stdout
    assert "p01_truncated.jpg" in result.stderr
    assert again.read_bytes() == out.read_bytes()


def test_writer_stores_short_side_resized_images(written):
    from ffcv.reader import Reader

    from maescale.data.ffcv_writer import resized_shape

    images = Reader(str(written[0])).metadata["f0"]
    assert {(int(h), int(w)) for h, w in zip(images["height"], images["width"])} == {
        resized_shape(96, 96, MAX_RESOLUTION, "short"),
        resized_shape(SOURCE_PX[1], SOURCE_PX[0], MAX_RESOLUTION, "short"),
    }
    assert resized_shape(90, 120, 64, "short") == (64, 85) and resized_shape(90, 120, 64, "long") == (48, 64)
    assert resized_shape(30, 40, 64, "short") == (30, 40)  # never upscaled


def test_subset_is_spread_over_the_classes():
    from maescale.data.ffcv_writer import evenly_spaced_subset

    assert evenly_spaced_subset(10, 3) == [0, 4, 9]
    assert evenly_spaced_subset(5, None) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------ loader


def _gradient_boxes(images: torch.Tensor) -> list[tuple[float, float]]:
    """(width, height) fraction of the source each gradient crop covers, from its colour range."""
    low, high = normalised_bounds()
    pixels = ((images - low) / (high - low)).clamp(0, 1)  # back to [0, 1]
    boxes = []
    for image in pixels:
        red, green = image[0], image[1]
        # The ramps span the image, so a crop's range covers its extent minus one output pixel.
        scale = IMG_SIZE / (IMG_SIZE - 1)
        boxes.append((float(red.max() - red.min()) * scale, float(green.max() - green.min()) * scale))
    return boxes


def test_train_batches_shapes_labels_and_epoch_varying_crops(train_loader, written):
    labels_on_file = stored_labels(written[0])
    low, high = normalised_bounds()
    with deadline(300):
        epochs = {e: list(train_loader.epoch(e)) for e in (0, 1)}
    crops = {}
    for e, batches in epochs.items():
        assert len(batches) == train_loader.batches_per_epoch == (GRADIENTS + PHOTOS + 1) // 8
        indices = train_loader.rank_indices(e).tolist()
        for number, batch in enumerate(batches):
            assert batch.images.shape == (8, 3, IMG_SIZE, IMG_SIZE) and batch.images.dtype == torch.float32
            assert batch.images.is_contiguous()
            assert bool((batch.images >= low - 1e-4).all() and (batch.images <= high + 1e-4).all())
            chunk = indices[number * 8 : (number + 1) * 8]
            assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == labels_on_file[chunk].tolist()
            crops.update({(e, i): image for i, image in zip(chunk, batch.images)})
    assert train_loader.rank_indices(0).tolist() != train_loader.rank_indices(1).tolist()
    gradients = [i for i in range(GRADIENTS) if (0, i) in crops and (1, i) in crops]
    assert gradients, "no gradient image was drawn in both epochs"
    assert all(not torch.equal(crops[0, i], crops[1, i]) for i in gradients)
    boxes = _gradient_boxes(torch.stack([crops[key] for key in crops if key[1] < GRADIENTS]))
    areas = [w * h for w, h in boxes]
    # Scale bounds [0.2, 1] and ratio bounds [3/4, 4/3], with slack for JPEG and interpolation.
    # FFCV's crops are unseeded, so a whole-image crop turns up in some runs: JPEG moves the ramps'
    # end colours by up to ~5 levels per axis, and the area (a product of two ranges) reads up to ~1.04.
    assert min(areas) > 0.2 - 0.06 and max(areas) <= 1.0 + 0.06, areas
    assert all(3 / 4 - 0.1 < w / h < 4 / 3 + 0.1 for w, h in boxes)
    assert max(areas) - min(areas) > 0.2, f"crop areas hardly vary: {areas}"


def test_resume_mid_epoch_gives_the_tail(train_loader):
    with deadline(120):
        full = list(train_loader.epoch(2))
        tail = list(train_loader.epoch(2, start_batch=1))
    assert len(tail) == len(full) - 1
    for a, b in zip(full[1:], tail):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.seeds, b.seeds)
    with pytest.raises(ValueError, match="start_batch"):
        train_loader.epoch(0, start_batch=train_loader.batches_per_epoch + 1)


def test_mask_seeds_match_the_folder_loader(train_loader, image_folder):
    from maescale.data.seeding import sample_mask_seed

    with deadline(120):
        batch = next(iter(train_loader.epoch(0)))
    first = train_loader.rank_indices(0)[:8].tolist()
    assert batch.seeds.tolist() == [sample_mask_seed(5, 0, i) for i in first]


def test_eval_batches_are_center_crops_covering_every_image(written):
    from maescale.data.ffcv_loader import FFCVEpochLoader

    count = GRADIENTS + PHOTOS + 1
    with deadline(300):
        loader = FFCVEpochLoader(written[0], img_size=IMG_SIZE, batch_size=8, seed=0, num_workers=1, train=False)
        batches = [list(loader.epoch(e)) for e in (0, 1)]
        # eval_subset (the kNN monitor's): the same center crops of evenly spaced images
        subset = FFCVEpochLoader(
            written[0], img_size=IMG_SIZE, batch_size=4, seed=0, num_workers=1, train=False, eval_subset=5
        )
        picked = torch.cat([b.images for b in subset.epoch(0)])
    assert torch.equal(picked, torch.cat([b.images for b in batches[0]])[subset.eval_selection()])
    assert [len(b.labels) for b in batches[0]] == [8] * (count // 8) + [count % 8]
    assert torch.cat([b.labels for b in batches[0]]).tolist() == stored_labels(written[0]).tolist()
    for a, b in zip(*batches):
        assert torch.equal(a.images, b.images)  # no randomness in evaluation
    (width, height), = _gradient_boxes(batches[0][0].images[:1])
    assert width == pytest.approx(224 / 256, abs=0.05) and height == pytest.approx(224 / 256, abs=0.05)


def test_ffcv_config_errors_name_the_key(tmp_path, written):
    from maescale.config import DataConfig
    from maescale.data import build_loader

    with pytest.raises(ValueError, match="data.path is required"):
        build_loader(DataConfig(kind="ffcv"), img_size=32, seed=0)
    with pytest.raises(FileNotFoundError, match="val.beton"):
        build_loader(DataConfig(kind="ffcv", path=str(tmp_path)), img_size=32, seed=0, train=False)
    with pytest.raises(ValueError, match="ffcv_os_cache"):
        build_loader(DataConfig(kind="ffcv", path=str(written[0]), ffcv_order="quasi_random"), img_size=32, seed=0)


def test_two_gloo_ranks_split_an_epoch_without_overlap(written, tmp_path):
    out = tmp_path / "ranks.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # Its own script, exec'd: importing FFCV compiles numba code, which only these ranks need.
    result = run_ranks([written[0], out], 2, env, REPO, timeout=400,
                       command=[sys.executable, str(REPO / "tests" / "ffcv_rank_worker.py")])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    count, batch = GRADIENTS + PHOTOS + 1, 4
    assert ranks[0]["batches"] == ranks[1]["batches"] == ranks[0]["length"] == count // (2 * batch)
    first, second = set(ranks[0]["indices"]), set(ranks[1]["indices"])
    assert not first & second
    assert len(first | second) == count - count % (2 * batch)  # only the last partial global batch is left out
    labels = stored_labels(written[0])
    for rank in ranks:
        assert rank["labels"] == labels[rank["indices"]].tolist()


def test_pretrain_with_ffcv_loss_falls(written, tmp_path):
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "model.name=mae_vit_micro_patch4", "data.kind=ffcv", f"data.path={written[0]}",
                 "data.batch_size=8", "data.num_workers=1", "schedule.epochs=6", "schedule.warmup_epochs=1",
                 "optim.blr=1.5e-3", "train.log_every=1", "checkpoint.every_steps=100"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "maescale", "pretrain", *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * ((GRADIENTS + PHOTOS + 1) // 8)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert sum(r["loss"] for r in rows[-4:]) < sum(r["loss"] for r in rows[:4])


# ------------------------------------------------------------------ compatibility fixes


class _Node:
    def __init__(self, jitted):
        self.is_jitted = jitted


def test_group_operations_alternates_compiled_and_python_stages():
    decode, to_tensor, flip, normalise = _Node(True), _Node(False), _Node(True), _Node(None)
    graph = type("G", (), {})()
    graph.root_nodes = {decode: None}
    graph.adjacency_list = {decode: [to_tensor], to_tensor: [flip], flip: [normalise], normalise: []}
    graph.node_to_id = {decode: 0, to_tensor: 1, flip: 2, normalise: 3}
    assert group_operations(graph) == [[0], [1], [2, 3]]


def test_loader_with_compiled_op_after_python_op_builds(written):
    """Upstream issue 396: without the fix in ffcv_compat this Loader(...) never returns
    (the subprocess then times out)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "ffcv_issue396.py"), str(written[0])],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stages 3" in result.stdout and "labels [0, 0, 0, 0]" in result.stdout
