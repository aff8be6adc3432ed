"""Checkpoint interop: timm export (strict load, equal features), official-release import and export
round trips, continued pretraining from an imported file, and the visualize command on a flat folder."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from conftest import run_maescale
from PIL import Image
from safetensors.torch import load_file

from maescale import checkpoint
from maescale.checkpoint import load_model_weights
from maescale.config import load_config
from maescale.data import SyntheticShapes
from maescale.interop import (
    WeightsMismatchError,
    build_timm_vit,
    export_timm,
    load_mae_state,
    load_weights_file,
    read_state_dict,
    timm_kwargs,
)
from maescale.models import build_model, is_encoder_key
from maescale.train import pretrain

REPO = Path(__file__).resolve().parents[1]
MICRO = "mae_vit_micro_patch4"


def official_file(path: Path, model, encoder_only: bool, prefix: str = "") -> Path:
    """A file laid out like the official release: {'model': state_dict}, optionally without the decoder."""
    state = {prefix + k: v.clone() for k, v in model.state_dict().items() if not encoder_only or is_encoder_key(k)}
    torch.save({"model": state}, path)
    return path


def test_vit_base_encoder_loads_strictly_into_timm_with_equal_features(tmp_path):
    torch.manual_seed(0)
    mae = build_model("mae_vit_base_patch16").eval()
    path = export_timm(mae, tmp_path / "vit_b.safetensors", "mae_vit_base_patch16")
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    vit.load_state_dict(load_file(str(path)), strict=True)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(images), mae.forward_features(images), atol=1e-5)
        assert torch.allclose(vit(images), mae.forward_features(images)[:, 0], atol=1e-5)  # timm's default pool: cls
    assert timm_kwargs(mae) == dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                                    mlp_ratio=4.0, qkv_bias=True)


def test_official_files_import_strictly_encoder_only_and_full(caplog):
    torch.manual_seed(0)
    source = build_model(MICRO)
    full = {"module." + k: v for k, v in source.state_dict().items()}  # a DDP-saved state dict
    target = build_model(MICRO)
    assert load_mae_state(target, full, "full") is True
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    encoder_only = {k: v for k, v in source.state_dict().items() if is_encoder_key(k)}
    fresh = build_model(MICRO)
    decoder_before = fresh.decoder_pred.weight.clone()
    with caplog.at_level(logging.WARNING, logger="maescale"):
        assert load_mae_state(fresh, encoder_only, "encoder-only") is False
    assert "encoder-only holds no decoder" in caplog.text
    assert torch.equal(fresh.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert torch.equal(fresh.decoder_pred.weight, decoder_before)
    with pytest.raises(WeightsMismatchError, match="unexpected \\['head.weight'\\]"):
        load_mae_state(build_model(MICRO), {**encoder_only, "head.weight": torch.zeros(1)}, "finetuned")
    with pytest.raises(WeightsMismatchError, match="missing encoder keys \\['norm.bias'\\]"):
        load_mae_state(build_model(MICRO), {k: v for k, v in encoder_only.items() if k != "norm.bias"}, "cut")
    with pytest.raises(WeightsMismatchError, match="missing decoder keys"):
        load_mae_state(build_model(MICRO), {**encoder_only, "decoder_pred.bias": source.decoder_pred.bias}, "partial")
    with pytest.raises(WeightsMismatchError, match="shapes differ"):
        load_mae_state(build_model(MICRO), {**full, "module.cls_token": torch.zeros(1, 1, 32)}, "wrong width")
    with pytest.raises(WeightsMismatchError, match="missing encoder keys \\['blocks.2."):
        load_mae_state(build_model("mae_vit_mini_patch4"), full, "fewer blocks")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            f"model.name={MICRO}",
            "data.synthetic_size=64",
            "data.batch_size=16",
            "data.num_workers=0",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
            "train.log_every=2",
        ],
    )
    return pretrain(cfg)["checkpoint"]


def test_export_formats_from_a_checkpoint_round_trip(short_run, tmp_path, caplog):
    trained = load_model_weights(build_model(MICRO), short_run).eval()
    timm_file = tmp_path / "encoder.safetensors"
    run_maescale("export", "--ckpt", str(short_run), "--format", "timm", "--out", str(timm_file))
    state, metadata = read_state_dict(timm_file)
    vit = build_timm_vit(json.loads(metadata["timm_kwargs"])).eval()
    vit.load_state_dict(state, strict=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(images), trained.forward_features(images), atol=1e-6)
    assert metadata["maescale_model"] == MICRO
    # a timm file is enough to evaluate: the model name travels in its metadata
    with caplog.at_level(logging.WARNING, logger="maescale"):
        from_timm = load_weights_file(timm_file, None)
    assert "holds no decoder" in caplog.text
    assert torch.equal(from_timm.forward_features(images), trained.forward_features(images))

    release = tmp_path / "release.pth"
    run_maescale("export", "--ckpt", str(short_run), "--format", "release", "--out", str(release))
    payload = torch.load(release, weights_only=True)
    assert list(payload) == ["model"] and set(payload["model"]) == set(trained.state_dict())
    assert any(k.startswith("decoder_blocks.") for k in payload["model"])
    reread = load_weights_file(release, MICRO)
    assert all(torch.equal(a, b) for a, b in zip(reread.state_dict().values(), trained.state_dict().values()))


def test_import_official_then_continue_pretraining_and_evaluate(tmp_path):
    torch.manual_seed(1)
    source = build_model(MICRO)
    weights = official_file(tmp_path / "mae_pretrain.pth", source, encoder_only=False)
    run = tmp_path / "imported"
    out = run_maescale("import", "--weights", str(weights), "--model", MICRO, "--out", str(run)).stdout
    ckpt = run / "checkpoints" / "step_00000000"
    assert str(ckpt) in out
    imported = load_model_weights(build_model(MICRO), ckpt)
    assert all(torch.equal(a, b) for a, b in zip(imported.state_dict().values(), source.state_dict().values()))
    # continued pretraining resumes from the imported weights at step 0
    cfg = load_config(run / "config.yaml", ["data.synthetic_size=64", "data.batch_size=16", "data.num_workers=0",
                                            "schedule.epochs=1", "schedule.warmup_epochs=0", "train.log_every=1"])
    summary = pretrain(cfg)
    assert summary["step"] == 4 and checkpoint.latest(checkpoint.checkpoint_root(run)).name == "step_00000004"
    continued = load_model_weights(build_model(MICRO), checkpoint.latest(checkpoint.checkpoint_root(run)))
    torch.manual_seed(0)
    unrelated = build_model(MICRO)

    def distance(model):
        return sum((a - b).norm() for a, b in zip(model.parameters(), source.parameters()))

    assert 0 < distance(continued) < 0.1 * distance(unrelated)  # 4 steps away from the imported weights


def test_import_reports_a_wrong_model(tmp_path):
    weights = official_file(tmp_path / "w.pth", build_model(MICRO), encoder_only=True)
    args = ["import", "--weights", str(weights), "--model", "mae_vit_tiny_patch4", "--out", str(tmp_path / "r")]
    result = run_maescale(*args, ok=False)
    assert result.returncode == 2 and "does not fit" in result.stderr and str(weights) in result.stderr


def test_visualize_a_flat_image_folder_with_a_fixed_mask_seed(short_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shapes = SyntheticShapes(3, 40, seed=5)
    for i in range(3):
        Image.fromarray(shapes[i][0].permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg")
    def draw(name: str, seed: int) -> str:
        out, images = tmp_path / name, str(folder)
        run_maescale("visualize", "--ckpt", str(short_run), "--images", images, "--out", str(out), "--seed", str(seed))
        return hashlib.sha256(out.read_bytes()).hexdigest()

    figures = [draw("a.png", 3), draw("b.png", 3)]
    assert figures[0] == figures[1]  # same seed, same mask, same figure
    with Image.open(tmp_path / "a.png") as image:
        assert image.size[0] > image.size[1]  # 4 panels wide, 3 rows high
    assert draw("c.png", 4) != figures[0]
