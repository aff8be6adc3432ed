"""Evaluation one can trust: no validation on the training images, a random baseline of any model
shape, errors in the words of the command, figures across classes, a probe lr that moves the head."""

from __future__ import annotations

import colorsys
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from conftest import run_maescale
from PIL import Image

from maescale.config import load_config
from maescale.data import first_images
from maescale.evaluate.config import EvalConfig, images_of_split
from maescale.evaluate.features import load_encoder
from maescale.evaluate.linprobe import MAX_BUDGET_LR, budget_blr, head_lr
from maescale.train import model_from_config

MICRO = "mae_vit_micro_patch4"
FOLDER = ["data.kind=folder", "data.num_workers=0", "data.batch_size=8"]
# A shape no named model has: 8 px patches and a wider decoder on the micro model.
VARIANT = [f"model.name={MICRO}", "model.patch_size=8", "model.decoder_embed_dim=48"]


def write_classes(root: Path, classes: int, per_class: int, seed: int, noise: float = 60.0) -> Path:
    """root/class_XX/NNN.png: 32 px images of one hue per class plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(colorsys.hsv_to_rgb(label / classes, 0.8, 0.9)) * 255
        for index in range(per_class):
            pixels = (colour + rng.normal(0, noise, (32, 32, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


def eval_config(*overrides: str) -> EvalConfig:
    return load_config(None, [f"encoder.model={MICRO}", *overrides], schema=EvalConfig)


def failure(*args) -> str:
    """The one-line error of a `maescale` command that must fail as a user error."""
    result = run_maescale(*args, ok=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory) -> Path:
    """3 classes of 8 images, no train/val split folders: every split resolves to the root."""
    return write_classes(tmp_path_factory.mktemp("flat"), classes=3, per_class=8, seed=0)


@pytest.fixture(scope="module")
def variant_checkpoint(tmp_path_factory) -> Path:
    """`pretrain train.max_steps=0` of a shape no named model has: its step-0 checkpoint."""
    out = tmp_path_factory.mktemp("variant") / "run"
    run_maescale("pretrain", f"output_dir={out}", *VARIANT, "data.synthetic_size=32", "data.batch_size=8",
                 "data.num_workers=0", "train.max_steps=0")
    return out / "checkpoints" / "step_00000000"


# ---------------------------------------------------------------- train / val guard


@pytest.mark.parametrize("command", ["knn", "linprobe", "finetune"])
def test_evaluation_refuses_a_folder_without_splits(command, flat_folder, tmp_path):
    line = failure(command, f"output_dir={tmp_path}", f"encoder.model={MICRO}", *FOLDER, f"data.path={flat_folder}")
    assert f"train_split='train' and val_split='val' both read {flat_folder.resolve()}" in line
    assert "data.path" in line and "allow_same_images=true" in line
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any work


def test_allow_same_images_measures_on_them_anyway(flat_folder, tmp_path):
    run_maescale("knn", f"output_dir={tmp_path}", f"encoder.model={MICRO}", *FOLDER, f"data.path={flat_folder}",
                 "allow_same_images=true", "knn.k=3")
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["protocol"] == "knn" and row["top1"] >= 0


def test_one_split_named_twice_is_the_same_images_for_every_kind(tmp_path):
    line = failure("knn", f"output_dir={tmp_path}", f"encoder.model={MICRO}", "val_split=train")
    assert "train_split='train' and val_split='train' both read the synthetic training images" in line


def test_which_images_a_split_reads(flat_folder, tmp_path):
    split_root = tmp_path / "splits"
    for split in ("train", "val"):
        (split_root / split / "a").mkdir(parents=True)
    folder = eval_config("data.kind=folder", f"data.path={split_root}").data
    assert images_of_split(folder, "train") == str((split_root / "train").resolve())
    assert images_of_split(folder, "train") != images_of_split(folder, "val")
    flat = eval_config("data.kind=folder", f"data.path={flat_folder}", "allow_same_images=true").data
    assert images_of_split(flat, "train") == images_of_split(flat, "val") == str(flat_folder.resolve())
    synthetic = EvalConfig().data
    assert images_of_split(synthetic, "train") != images_of_split(synthetic, "val")  # two seeds
    assert images_of_split(synthetic, "val") == images_of_split(synthetic, "test")  # one held-out set


def test_knn_monitor_refuses_a_folder_without_splits(flat_folder, tmp_path):
    run = ["pretrain", f"output_dir={tmp_path / 'run'}", f"model.name={MICRO}", *FOLDER, f"data.path={flat_folder}",
           "train.max_steps=1", "monitor.knn_every=1", "monitor.bank_images=8", "monitor.val_images=8", "monitor.k=3"]
    line = failure(*run)
    assert "monitor.bank_split='train' and monitor.val_split='val' both read" in line
    assert "monitor.allow_same_images=true" in line
    run_maescale(*run, "monitor.allow_same_images=true")
    rows = [json.loads(row) for row in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in row for row in rows)


# ---------------------------------------------------------------- random init of any shape


def test_max_steps_0_writes_the_initialisation_of_the_configured_shape(variant_checkpoint):
    cfg = load_config(None, VARIANT)
    set_seed(cfg.seed)  # as the trainer does before building the model
    expected = model_from_config(cfg).state_dict()
    encoder = EvalConfig().encoder
    encoder.ckpt = str(variant_checkpoint)
    loaded = load_encoder(encoder, seed=123).state_dict()  # the seed of a random-init encoder plays no part
    assert loaded["patch_embed.proj.weight"].shape[-1] == 8 and loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_evaluation_reads_the_step_0_checkpoint_of_a_variant_shape(variant_checkpoint, tmp_path):
    run_maescale("knn", f"output_dir={tmp_path}", f"encoder.ckpt={variant_checkpoint}", "data.synthetic_size=32",
                 "data.batch_size=8", "data.num_workers=0", "knn.k=3")
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["protocol"] == "knn"


# ---------------------------------------------------------------- errors in the command's words


@pytest.fixture
def damaged_checkpoint(variant_checkpoint, tmp_path) -> Path:
    """A copy of the step-0 run with a later checkpoint whose weights file was cut short."""
    run = tmp_path / "damaged"
    shutil.copytree(variant_checkpoint.parent.parent, run)
    ckpt = run / "checkpoints" / "step_00000004"
    shutil.copytree(run / "checkpoints" / variant_checkpoint.name, ckpt)
    for shard in ckpt.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # e.g. a disk error or a copy that stopped
    return ckpt


@pytest.mark.parametrize(
    "command, flag",
    [
        (["knn", "encoder.ckpt={ckpt}", "data.synthetic_size=32", "data.batch_size=8"], "encoder.ckpt"),
        (["export", "--ckpt", "{ckpt}", "--out", "{out}/x.safetensors"], "--ckpt"),
        (["visualize", "--ckpt", "{ckpt}", "--out", "{out}/x.png"], "--ckpt"),
    ],
)
def test_a_damaged_checkpoint_is_named_by_the_commands_flag(command, flag, damaged_checkpoint, tmp_path):
    args = [arg.format(ckpt=damaged_checkpoint, out=tmp_path) for arg in command]
    if args[0] == "knn":
        args.append(f"output_dir={tmp_path / 'eval'}")
    line = failure(*args)
    earlier = damaged_checkpoint.parent / "step_00000000"
    separator = " " if flag.startswith("--") else "="
    assert f"{damaged_checkpoint} cannot be loaded" in line
    assert f"read the previous one with {flag}{separator}{earlier}" in line and "checkpoint.resume" not in line


def test_import_names_its_model_option(variant_checkpoint, tmp_path):
    weights = tmp_path / "variant.pth"
    run_maescale("export", "--ckpt", variant_checkpoint, "--format", "release", "--out", weights)
    line = failure("import", "--weights", weights, "--model", MICRO, "--out", tmp_path / "imported")
    assert "shapes differ (wrong --model?)" in line and "encoder.model" not in line


# ---------------------------------------------------------------- figures across classes


def test_figure_images_come_from_several_classes(tmp_path):
    root = write_classes(tmp_path / "classes", classes=4, per_class=10, seed=0, noise=0.0)
    data = load_config(None, ["data.kind=folder", f"data.path={root}"]).data
    images = first_images(data, img_size=32, seed=0, count=8)
    colours = {tuple(image.mean(dim=(1, 2)).round(decimals=2).tolist()) for image in images}
    assert len(images) == 8 and len(colours) == 4  # two of each class, not eight of the first


# ---------------------------------------------------------------- the probe's lr follows the data size


def test_the_default_lr_keeps_the_papers_budget_and_an_explicit_one_wins():
    assert budget_blr(1_281_167, 90) == pytest.approx(0.1)
    assert budget_blr(5_000, 90) == pytest.approx(25.6, rel=0.01)  # the blr docs/RESULTS.md derived by hand
    cfg = eval_config("linprobe.batch_size=256")
    assert head_lr(cfg, 50_000)[0] == pytest.approx(2.56, rel=0.01)
    assert head_lr(cfg, 320)[0] == MAX_BUDGET_LR  # few images: capped, not blr 400
    assert head_lr(eval_config("linprobe.blr=0.1"), 320)[0] == pytest.approx(0.1 * 16384 / 256)
    assert head_lr(eval_config("linprobe.lr=3"), 320) == (3, "linprobe.lr")


def test_the_default_probe_learns_16_classes_of_320_images_with_a_random_encoder(tmp_path):
    root = tmp_path / "sixteen"
    write_classes(root / "train", classes=16, per_class=20, seed=1, noise=120.0)
    write_classes(root / "val", classes=16, per_class=10, seed=2, noise=120.0)
    out = tmp_path / "probe"
    printed = run_maescale("linprobe", f"output_dir={out}", f"encoder.model={MICRO}", "data.kind=folder",
                           f"data.path={root}", "data.batch_size=80", "data.num_workers=0", "linprobe.batch_size=64")
    assert "320 images x 90 epochs" in printed.stdout + printed.stderr  # the chosen lr and its rule are printed
    rows = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    assert all(math.isfinite(loss) and loss < 2 * math.log(16) for loss in losses)  # no divergence
    assert losses[-1] < 0.5 * math.log(16)
    assert rows[-1]["top1"] >= 2.5 * 100 / 16
