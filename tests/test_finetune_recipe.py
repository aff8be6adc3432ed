"""The fine-tuning recipe of the MAE paper: RandAugment and random erasing drawn per sample, the 0.875
evaluation crop, and the recipe files under configs/finetune and configs/eval."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maescale.config import DataConfig, load_config
from maescale.data import DataKind, EvalTransform, FinetuneAugment, MAETrainTransform, build_loader, register_kind
from maescale.data.ffcv_loader import EVAL_CROP_FRACTION
from maescale.data.finetune_augment import RAND_AUGMENT_OPS, random_erase
from maescale.data.loader import build_synthetic_loader
from maescale.data.transforms import EVAL_CROP_PCT, FinetuneTrainTransform
from maescale.errors import ConfigError, DataError
from maescale.evaluate.config import EvalConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FILES = [path for folder in ("finetune", "eval") for path in sorted((ROOT / "configs" / folder).glob("*.yaml"))]
FILL = [124.0, 116.0, 104.0]
RAND_AUGMENT_ONLY = FinetuneAugment(random_erasing=0.0)
ERASING_ONLY = FinetuneAugment(rand_augment_ops=0, random_erasing=1.0)
OFF = FinetuneAugment(rand_augment_ops=0, random_erasing=0.0)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def textured(channels: int = 3, height: int = 40, width: int = 48) -> torch.Tensor:
    """A low-contrast uint8 gradient with noise: every op of RandAugment visibly changes it."""
    ramp = torch.linspace(60, 110, width).expand(channels, height, width)
    noise = torch.rand(channels, height, width, generator=generator(0)) * 10
    return (ramp + noise + torch.arange(channels).view(-1, 1, 1) * 3).to(torch.uint8)


def write_jpegs(root: Path, count: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / "train" / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40 + index, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


def data_config(kind: str, tmp_path: Path, **overrides) -> DataConfig:
    path = str(write_jpegs(tmp_path)) if kind == "folder" else None
    return DataConfig(**{"kind": kind, "path": path, "batch_size": 4, "num_workers": 0, "synthetic_size": 12,
                         "crop_min_scale": 0.08, **overrides})


def train_images(cfg: DataConfig, augment: FinetuneAugment | None, epoch: int = 0, in_chans: int = 3) -> torch.Tensor:
    loader = build_loader(cfg, img_size=32, in_chans=in_chans, seed=5, augment=augment)
    return torch.cat([batch.images for batch in loader.epoch(epoch)])


# ---------------------------------------------------------------- per-sample determinism


@pytest.mark.parametrize("kind", ["synthetic", "folder"])
def test_augmented_batches_do_not_depend_on_the_worker_count(kind, tmp_path):
    augment = FinetuneAugment(random_erasing=0.5)
    in_process = train_images(data_config(kind, tmp_path, num_workers=0), augment)
    with_workers = train_images(data_config(kind, tmp_path, num_workers=2), augment)
    assert torch.equal(in_process, with_workers)
    assert not torch.equal(in_process, train_images(data_config(kind, tmp_path), OFF))
    # Another epoch draws other augmentations of the same images.
    assert not torch.equal(in_process, train_images(data_config(kind, tmp_path), augment, epoch=1))


def test_augmentation_leaves_the_global_random_state_alone(tmp_path):
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    train_images(data_config("synthetic", tmp_path), FinetuneAugment(random_erasing=1.0))
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])


# ---------------------------------------------------------------- what the ops do


@pytest.mark.parametrize("name", sorted(RAND_AUGMENT_OPS))
def test_every_rand_augment_op_changes_an_image_and_keeps_its_shape(name):
    image = textured()
    for negate in (False, True):
        output = RAND_AUGMENT_OPS[name](image, 9.0, negate, FILL)
        assert output.dtype == torch.uint8 and output.shape == image.shape
        assert not torch.equal(output, image)


def test_rand_augment_changes_most_crops_and_nothing_when_off():
    image, plain = textured(), MAETrainTransform(32, scale=(0.08, 1.0))
    augmented = FinetuneTrainTransform(32, RAND_AUGMENT_ONLY, scale=(0.08, 1.0))
    off = FinetuneTrainTransform(32, OFF, scale=(0.08, 1.0))
    changed = sum(not torch.equal(augmented(image, generator(s)), plain(image, generator(s))) for s in range(40))
    # Two ops, each applied with probability 0.5: about 3 crops in 4 change.
    assert 20 <= changed <= 38
    assert all(torch.equal(off(image, generator(s)), plain(image, generator(s))) for s in range(10))


def erased_mask(seed: int, probability: float, channels: int = 3) -> torch.Tensor:
    image = torch.full((channels, 32, 32), 100.0)
    return random_erase(image.clone(), probability, generator(seed)) != image


def test_random_erasing_replaces_one_rectangle_of_every_channel_with_its_probability():
    erased = 0
    for seed in range(200):
        mask = erased_mask(seed, 0.25, channels=4)
        if mask.any():
            erased += 1
            rows, cols = mask[0].any(1).nonzero(), mask[0].any(0).nonzero()
            box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert mask[0].sum() == box_area and 0.015 <= box_area / 1024 <= 0.34  # one full rectangle
            assert all(torch.equal(mask[0], channel) for channel in mask)
    assert 30 <= erased <= 70
    assert not any(erased_mask(seed, 0.0).any() for seed in range(20))


# ---------------------------------------------------------------- other channel counts


def test_rand_augment_is_refused_for_other_channel_counts_and_erasing_is_applied_to_all(tmp_path):
    cfg = data_config("synthetic", tmp_path)
    with pytest.raises(ConfigError, match="finetune.rand_augment_ops"):
        build_loader(cfg, img_size=32, in_chans=4, seed=5, augment=FinetuneAugment())
    erased = train_images(cfg, ERASING_ONLY, in_chans=4) != train_images(cfg, OFF, in_chans=4)
    assert erased.any()
    assert torch.equal(erased, erased[:, :1].expand_as(erased))


def test_rand_augment_refuses_float_pixels():
    transform = FinetuneTrainTransform(32, RAND_AUGMENT_ONLY, mean=(0, 0, 0), std=(1, 1, 1), clip=False)
    with pytest.raises(DataError, match="finetune.rand_augment_ops=0"):
        for seed in range(10):  # until an op is drawn
            transform(torch.rand(3, 40, 40), generator(seed))


def test_kinds_that_cannot_augment_refuse_and_run_with_it_off(tmp_path):
    with pytest.raises(ConfigError, match="data.kind=ffcv does not apply finetune.rand_augment_ops"):
        build_loader(DataConfig(kind="ffcv", path=str(tmp_path)), img_size=32, seed=0, augment=FinetuneAugment())

    def build_without_augment(data_cfg, **kwargs):
        return build_synthetic_loader(data_cfg, **kwargs)

    register_kind("recipe_test_plain", DataKind(build=build_without_augment))
    cfg = DataConfig(kind="recipe_test_plain", batch_size=4, num_workers=0, synthetic_size=12)
    with pytest.raises(ConfigError, match="data.kind=recipe_test_plain does not apply"):
        build_loader(cfg, img_size=32, seed=0, augment=ERASING_ONLY)
    assert build_loader(cfg, img_size=32, seed=0, augment=OFF).batches_per_epoch == 3


# ---------------------------------------------------------------- evaluation crop


def test_eval_resizes_to_size_over_0_875_rounded_down_as_timm():
    assert EVAL_CROP_PCT == EVAL_CROP_FRACTION == 0.875
    assert EvalTransform(224).resize_size == (256, 256)
    assert EvalTransform(32).resize_size == (36, 36)
    assert EvalTransform(384).resize_size == (438, 438)
    assert EvalTransform([224, 112]).resize_size == (256, 128)


def test_eval_keeps_the_central_224_of_a_256_short_side():
    image = torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8, generator=generator(1))
    output = EvalTransform(224, mean=(0, 0, 0), std=(1, 1, 1))(image)
    torch.testing.assert_close(output, image[:, 16:240, 48:272].float() / 255)


def test_every_eval_loader_crops_0_875(tmp_path):
    for kind in ("synthetic", "folder"):
        loader = build_loader(data_config(kind, tmp_path / kind), img_size=32, seed=0, train=False, split="train")
        assert loader.transform.crop_pct == EVAL_CROP_PCT


# ---------------------------------------------------------------- recipe files and keys


def test_recipe_files_load_with_the_papers_values(tmp_path):
    assert {path.name for path in RECIPE_FILES} >= {"vit_b.yaml", "vit_l.yaml", "vit_h.yaml", "linprobe_imagenet.yaml"}
    for split in ("train", "val", "test"):  # the placeholder data.path is checked for separate splits
        (tmp_path / split).mkdir()
    # encoder.model: eval/cifar10.yaml leaves encoder.ckpt to the command line.
    overrides = [f"data.path={tmp_path}", "encoder.model=mae_vit_base_patch16"]
    configs = {path.stem: load_config(path, overrides, schema=EvalConfig) for path in RECIPE_FILES}
    table = {"vit_b": (5e-4, 0.65, 0.1, 100), "vit_l": (1e-3, 0.75, 0.2, 50), "vit_h": (1e-3, 0.75, 0.3, 50)}
    for name, expected in table.items():
        ft = configs[name].finetune
        assert (ft.blr, ft.layer_decay, ft.drop_path, ft.epochs) == expected
        assert (ft.rand_augment_ops, ft.rand_augment_magnitude, ft.rand_augment_magnitude_std) == (2, 9, 0.5)
        assert ft.random_erasing == 0.25 and configs[name].data.crop_min_scale == 0.08
    scratch = configs["scratch_vit_b"]  # Table 11: from scratch, at its own best recipe
    assert scratch.encoder.ckpt is None and scratch.encoder.model == "mae_vit_base_patch16"
    ft = scratch.finetune
    assert (ft.blr, ft.weight_decay, ft.beta2, ft.layer_decay, ft.epochs, ft.warmup_epochs, ft.ema_decay) == (
        1e-4, 0.3, 0.95, 1.0, 300, 20, 0.9999)
    probe = configs["linprobe_imagenet"].linprobe
    assert (probe.batch_size, probe.blr, probe.epochs, probe.warmup_epochs) == (16384, 0.1, 90, 10)
    assert probe.weight_decay == 0 and configs["linprobe_imagenet"].encoder.pool == "cls"


@pytest.mark.parametrize(
    "override", ["finetune.random_erasing=1.5", "finetune.rand_augment_ops=-1", "finetune.rand_augment_magnitude=11"]
)
def test_out_of_range_augmentation_keys_are_named(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override, "encoder.model=mae_vit_base_patch16"], schema=EvalConfig)
