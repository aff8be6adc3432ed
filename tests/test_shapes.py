"""Any channel count and rectangular images on the model side: position tables of h x w grids,
patches, the loss, another input size for evaluation, weights of another grid, reconstruction
figures of 1 and 6 channels, the config keys, and pretrain -> knn -> finetune through the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import run_maescale
from PIL import Image

from maescale.config import ConfigError, DataConfig, ModelConfig, load_config
from maescale.evaluate.config import EvalConfig
from maescale.evaluate.finetune import classifier_from_mae
from maescale.interop import (
    METADATA_FORMAT,
    METADATA_MODEL,
    METADATA_MODEL_CONFIG,
    WeightsMismatchError,
    build_timm_vit,
    load_mae_state,
    load_weights_file,
    save_safetensors,
    timm_kwargs,
)
from maescale.metrics import read_metrics
from maescale.models import build_model, get_2d_sincos_pos_embed, patchify, unpatchify
from maescale.models.pos_embed import get_1d_sincos_pos_embed
from maescale.sizes import image_hw, size_for_config
from maescale.train import model_from_config
from maescale.viz import (
    FigureDisplay,
    figure_display,
    reconstruction_panels,
    save_reconstruction_figure,
    shown_channels,
    to_display,
)

MICRO = "mae_vit_micro_patch4"


def coded_image(channels: int, height: int, width: int) -> torch.Tensor:
    """[1, C, H, W] image whose pixel (c, y, x) holds c*10000 + y*100 + x."""
    c = torch.arange(channels).view(-1, 1, 1) * 10000
    y = torch.arange(height).view(1, -1, 1) * 100
    x = torch.arange(width).view(1, 1, -1)
    return (c + y + x).unsqueeze(0).float()


def sincos(grid) -> torch.Tensor:
    return get_2d_sincos_pos_embed(64, grid, cls_token=True).unsqueeze(0)


# ---------------------------------------------------------------- sizes


def test_image_sizes_parse_as_int_or_pair():
    assert image_hw(32) == (32, 32) and image_hw([32, 48]) == (32, 48) and image_hw((8, 4)) == (8, 4)
    for bad in ([32], [32, 48, 3], 0, [32, 0], True, 32.0, "32"):
        with pytest.raises(ValueError, match="img_size"):
            image_hw(bad)
    assert size_for_config((32, 32)) == 32 and size_for_config((32, 48)) == [32, 48]


# ---------------------------------------------------------------- position tables


def test_rectangular_pos_embed_layout_by_hand():
    """2 rows x 3 columns, width 8: omega = (1, 1/100); column features first, tokens row-major."""
    table = get_2d_sincos_pos_embed(8, (2, 3), cls_token=True)
    assert table.shape == (1 + 6, 8) and torch.equal(table[0], torch.zeros(8))
    y, x = 1, 2  # token 1 * 3 + 2 = 5, row 6 with the cls row
    expected = [math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100),
                math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100)]
    assert table[1 + 5].tolist() == pytest.approx(expected, abs=1e-6)
    y, x = 0, 1  # token 1: second column of the first row
    assert table[1 + 1, :4].tolist() == pytest.approx([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)])
    assert table[1 + 1, 4:].tolist() == pytest.approx([0, 0, 1, 1])
    assert not torch.equal(table, get_2d_sincos_pos_embed(8, (3, 2), cls_token=True))  # h and w are not symmetric


def test_square_grid_tables_are_bit_identical_to_the_square_construction():
    """The pair path reproduces the square one (both axes from one arange) to the bit."""
    for dim, side in [(16, 1), (64, 8), (768, 14)]:
        coords = torch.arange(side, dtype=torch.float64)
        rows, cols = torch.meshgrid(coords, coords, indexing="ij")
        square = torch.cat([get_1d_sincos_pos_embed(dim // 2, cols.reshape(-1)),
                            get_1d_sincos_pos_embed(dim // 2, rows.reshape(-1))], dim=1).float()
        assert torch.equal(get_2d_sincos_pos_embed(dim, side), square)
        assert torch.equal(get_2d_sincos_pos_embed(dim, (side, side)), square)


# ---------------------------------------------------------------- patches


@pytest.mark.parametrize("channels", [1, 6])
def test_patchify_round_trip_on_a_rectangle(channels):
    image = coded_image(channels, 8, 12)  # patch 4: a 2 x 3 grid
    patches = patchify(image, 4)
    assert patches.shape == (1, 6, 16 * channels)
    last = (1 * 4 + 2) * channels + channels - 1  # row 1, column 2 of the patch, last channel
    assert patches[0, 5, 0] == 408  # patch (1, 2) starts at pixel y=4, x=8
    assert patches[0, 5, last] == (channels - 1) * 10000 + 5 * 100 + 10
    assert torch.equal(unpatchify(patches, 4, channels, (2, 3)), image)
    model = build_model(MICRO, img_size=[8, 12], in_chans=channels)
    assert torch.equal(model.unpatchify(model.patchify(image)), image)


def test_unpatchify_needs_the_grid_of_a_rectangle():
    patches = torch.zeros(1, 6, 16)
    with pytest.raises(ValueError, match=r"pass grid_size"):
        unpatchify(patches, 4, 1)
    with pytest.raises(ValueError, match=r"holds 4 patches, got 6"):
        unpatchify(patches, 4, 1, (2, 2))


# ---------------------------------------------------------------- the model


def test_six_channel_rectangular_model_matches_timm():
    torch.manual_seed(0)
    model = build_model(MICRO, img_size=[32, 48], in_chans=6).eval()
    assert (model.img_size, model.grid_size, model.num_patches) == ((32, 48), (8, 12), 96)
    assert torch.equal(model.pos_embed, sincos((8, 12)))
    assert torch.equal(model.decoder_pos_embed, get_2d_sincos_pos_embed(32, (8, 12), cls_token=True)[None])
    images = torch.randn(2, 6, 32, 48)
    loss, pred, mask = model(images)
    assert pred.shape == (2, 96, 4 * 4 * 6) and mask.sum(dim=1).tolist() == [72.0, 72.0] and torch.isfinite(loss)
    assert timm_kwargs(model)["img_size"] == [32, 48]
    vit = build_timm_vit(timm_kwargs(model)).eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(images), model.forward_features(images), atol=1e-5)


def test_loss_falls_on_six_channel_rectangles():
    torch.manual_seed(0)
    model = build_model(MICRO, img_size=[32, 48], in_chans=6)
    images = F.interpolate(torch.randn(4, 6, 4, 6), size=(32, 48), mode="bilinear")  # smooth, so learnable
    noise = torch.rand(4, model.num_patches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, _, _ = model(images, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0] and all(math.isfinite(loss) for loss in losses), losses


def test_set_img_size_equals_a_model_built_at_that_size():
    torch.manual_seed(0)
    model = build_model(MICRO).eval()
    built = build_model(MICRO, img_size=[24, 40]).eval()
    model.set_img_size([24, 40])
    assert (model.img_size, model.grid_size, model.num_patches) == ((24, 40), (6, 10), 60)
    assert torch.equal(model.pos_embed, built.pos_embed)
    assert torch.equal(model.decoder_pos_embed, built.decoder_pos_embed)
    assert not model.pos_embed.requires_grad
    built.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), built.forward_features(images))
    with pytest.raises(ValueError, match=r"img_size=30 is not divisible by patch_size=4"):
        model.set_img_size(30)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(img_size=[32, 30]), r"img_size=\[32, 30\] is not divisible by patch_size=4"),
        (dict(img_size=[32]), r"img_size must be an int or a pair"),
        (dict(in_chans=0), r"in_chans must be a positive int"),
        (dict(img_size=[4, 4]), r"keeps no patch of a 1x1 grid"),
    ],
)
def test_model_rejects_bad_sizes(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(MICRO, **overrides)


# ---------------------------------------------------------------- weights at another size


def test_weights_of_another_grid_load_with_the_models_own_position_tables():
    torch.manual_seed(0)
    square = build_model(MICRO)
    rectangle = build_model(MICRO, img_size=[32, 48])
    assert load_mae_state(rectangle, square.state_dict(), "square.pth")
    assert torch.equal(rectangle.blocks[1].mlp.fc2.weight, square.blocks[1].mlp.fc2.weight)
    assert torch.equal(rectangle.pos_embed, sincos((8, 12)))
    with pytest.raises(WeightsMismatchError, match="shapes differ"):  # another width is still the wrong model
        load_mae_state(build_model(MICRO, decoder_embed_dim=48), square.state_dict(), "square.pth")


def test_a_weights_file_rebuilds_the_shape_its_run_recorded(tmp_path):
    torch.manual_seed(0)
    model = build_model(MICRO, img_size=[32, 48], in_chans=6)
    section = asdict(ModelConfig(name=MICRO, img_size=[32, 48], in_chans=6))
    path = save_safetensors(model.state_dict(), tmp_path / "six.safetensors", {
        METADATA_FORMAT: "consolidated", METADATA_MODEL: MICRO, METADATA_MODEL_CONFIG: json.dumps(section)})
    loaded = load_weights_file(path, None)
    assert (loaded.img_size, loaded.in_chans) == ((32, 48), 6)
    assert torch.equal(loaded.patch_embed.proj.weight, model.patch_embed.proj.weight)


def test_classifier_at_a_rectangle_starts_from_its_grids_sincos_table():
    torch.manual_seed(0)
    mae = build_model(MICRO, in_chans=6)
    classifier = classifier_from_mae(mae, classes=5, img_size=(32, 48))
    assert torch.equal(classifier.pos_embed, sincos((8, 12)))
    assert torch.equal(classifier.patch_embed.proj.weight, mae.patch_embed.proj.weight)
    assert classifier(torch.randn(2, 6, 32, 48)).shape == (2, 5)


# ---------------------------------------------------------------- figures


def test_display_undoes_each_channels_statistics_and_picks_channels():
    mean, std = (0.1, 0.2, 0.3, 0.4), (0.5, 1.0, 2.0, 4.0)
    pixels = torch.tensor([0.9, 0.6, 0.3, 0.7]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    normalised = (pixels - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    rgb = to_display(normalised, FigureDisplay(mean, std, (3, 0, 1)))
    assert rgb.shape == (1, 2, 2, 3) and rgb[0, 0, 0].tolist() == pytest.approx([0.7, 0.9, 0.6])
    grey = to_display(normalised, FigureDisplay(mean, std, (2, 1)))
    assert grey.shape == (2, 2, 2, 3)  # one grey row per shown channel
    assert grey[0].unique().tolist() == pytest.approx([0.3]) and grey[1].unique().tolist() == pytest.approx([0.6])
    # Values outside [0, 1] (files in other units) are stretched to their range instead of clipped.
    wide = torch.tensor([-5.0, 5.0]).view(1, 1, 1, 2)
    assert to_display(wide, FigureDisplay((0.0,), (1.0,), (0,)))[0, 0, :, 0].tolist() == [0.0, 1.0]
    assert shown_channels(None, 6) == (0, 1, 2) and shown_channels(None, 2) == (0, 1)
    assert shown_channels([5, 4, 3], 6) == (5, 4, 3)


@pytest.mark.parametrize("channels, rows", [(1, 2), (6, 2)])
def test_reconstruction_figure_of_other_channel_counts(tmp_path, channels, rows):
    torch.manual_seed(0)
    model = build_model(MICRO, img_size=[32, 48], in_chans=channels, norm_pix_loss=True)
    display = FigureDisplay((0.5,) * channels, (0.25,) * channels, shown_channels(None, channels))
    images = torch.randn(2, channels, 32, 48)
    panels = reconstruction_panels(model, images, seed=0, display=display)
    assert all(panel.shape == (rows, 32, 48, 3) for panel in panels.values())
    path = save_reconstruction_figure(model, images, tmp_path / "figure.png", display=display)
    with Image.open(path) as figure:
        assert figure.format == "PNG" and figure.size[0] > figure.size[1]


def test_figure_display_takes_the_runs_statistics_and_channels():
    data = DataConfig(mean=[0.1] * 6, std=[0.2] * 6)
    assert figure_display(data, [4, 2, 0], 6) == FigureDisplay((0.1,) * 6, (0.2,) * 6, (4, 2, 0))


# ---------------------------------------------------------------- config


def test_config_reads_sizes_channels_statistics_and_figure_channels():
    cfg = load_config(None, ["model.name=mae_vit_micro_patch4", "model.img_size=[32,48]", "model.in_chans=6",
                             "data.mean=[0.5,0.5,0.5,0.5,0.5,0.5]", "data.std=[1,1,1,1,1,1]",
                             "train.figure_channels=[5,3,1]"])
    assert cfg.model.img_size == [32, 48] and cfg.data.std == [1.0] * 6 and cfg.train.figure_channels == [5, 3, 1]
    with torch.device("meta"):
        model = model_from_config(cfg)
    assert (model.img_size, model.in_chans) == ((32, 48), 6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.img_size=[32]"], r"model.img_size must be an int or a pair \[height, width\]"),
        (["model.img_size=abc"], r"model.img_size must be int or a list of int"),
        (["model.img_size=[32,30]", "model.patch_size=4"], r"model.img_size=\[32, 30\] is not divisible by patch_size"),
        (["model.in_chans=0"], r"model.in_chans must be >= 1"),
        (["data.mean=[0.5,0.5,0.5]"], r"data.mean and data.std go together"),
        (["data.mean=[0.5,0.5]", "data.std=[1]"], r"data.mean has 2 values but data.std 1"),
        (["data.mean=[0.5]", "data.std=[0]"], r"data.std values must be positive"),
        (["data.mean=[a]", "data.std=[1]"], r"data.mean\[0\] must be float"),
        (["train.figure_channels=[3]"], r"train.figure_channels=\[3\] names channels outside 0..2"),
        (["train.figure_channels=[]"], r"train.figure_channels must name at least one channel"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_eval_config_sizes_name_their_keys():
    cfg = load_config(None, ["encoder.model=m", "encoder.img_size=[32,48]", "finetune.img_size=40"], schema=EvalConfig)
    assert cfg.encoder.img_size == [32, 48] and cfg.finetune.img_size == 40
    with pytest.raises(ConfigError, match=r"finetune.img_size must be an int or a pair"):
        load_config(None, ["encoder.model=m", "finetune.img_size=[40]"], schema=EvalConfig)


def test_a_bad_size_is_a_one_line_cli_error():
    result = run_maescale("pretrain", "model.img_size=[32]", ok=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "maescale pretrain: error: model.img_size must be an int or a pair [height, width] of ints, got [32]"
    ]


# ---------------------------------------------------------------- through the CLI


SYNTHETIC = ["data.synthetic_size=64", "data.batch_size=16", "data.num_workers=0"]


def test_six_channel_rectangles_pretrain_then_knn_and_finetune_at_other_sizes(tmp_path):
    """Synthetic images of 6 channels (R, G, B repeated), 32 x 48: the run's config builds the encoder."""
    run = tmp_path / "run"
    run_maescale("pretrain", f"output_dir={run}", f"model.name={MICRO}", "model.img_size=[32,48]", "model.in_chans=6",
                 *SYNTHETIC, "schedule.epochs=1", "schedule.warmup_epochs=0", "train.figure_channels=[3,4,5]")
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    assert derived["img_size"] == [32, 48]
    with Image.open(run / "reconstruction.png") as figure:
        assert figure.format == "PNG"
    ckpt = next((run / "checkpoints").iterdir())
    run_maescale("knn", f"output_dir={tmp_path / 'knn'}", f"encoder.ckpt={ckpt}", "encoder.img_size=[48,32]",
                 *SYNTHETIC)
    [row] = [r for r in read_metrics(tmp_path / "knn") if r["protocol"] == "knn"]
    assert 0 <= row["top1"] <= row["top5"] <= 100
    # RandAugment's colour ops are for RGB pictures: refused for 6 channels, which random erasing covers.
    run_maescale("finetune", f"output_dir={tmp_path / 'ft'}", f"encoder.ckpt={ckpt}", "finetune.img_size=[32,32]",
                 "finetune.max_steps=2", "finetune.rand_augment_ops=0", *SYNTHETIC)
    from safetensors import safe_open

    with safe_open(str(Path(tmp_path / "ft" / "finetuned.safetensors")), "pt") as handle:
        assert handle.get_tensor("pos_embed").shape == (1, 1 + 8 * 8, 64)
        assert handle.get_tensor("patch_embed.proj.weight").shape == (64, 6, 4, 4)
