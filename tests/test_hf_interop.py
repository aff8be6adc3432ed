"""Hugging Face ViTMAEForPreTraining interop against the installed transformers: folders in the 4.x and
5.x key layouts read with the loss and predictions transformers computes, maescale -> HF -> maescale
keeping every weight, `maescale import` / `export --format hf` without transformers, and the one-line
errors for what maescale cannot represent."""

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import run_maescale
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers", reason="the Hugging Face interop tests need transformers (the test extra)")
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

from maescale.checkpoint import load_model_weights  # noqa: E402
from maescale.config import ConfigError, load_config  # noqa: E402
from maescale.hf_interop import export_hf, from_hf_state, load_hf_model, to_hf_state  # noqa: E402
from maescale.models import build_model  # noqa: E402

MICRO = "mae_vit_micro_patch4"
# mae_vit_micro_patch4 in config.json terms; layer_norm_eps as maescale writes it.
MICRO_HF = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=32, patch_size=4,
    num_channels=3, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
    decoder_intermediate_size=128, layer_norm_eps=1e-6, mask_ratio=0.75, norm_pix_loss=True,
)


@torch.no_grad()
def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`model` with noise on every tensor, so that no weight (zero biases, the mask token) sits at its init
    and a swapped or dropped tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in model.state_dict().values():
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def hf_model(seed: int = 0, **changes) -> ViTMAEForPreTraining:
    torch.manual_seed(seed)
    return perturbed(ViTMAEForPreTraining(ViTMAEConfig(**{**MICRO_HF, **changes})), seed)


@torch.no_grad()
def assert_same_outputs(hf: ViTMAEForPreTraining, mae, seed: int = 0) -> None:
    """Same images and noise: the same mask, and loss and predictions within 1e-5 (fp32)."""
    generator = torch.Generator().manual_seed(seed)
    side, channels = hf.config.image_size, hf.config.num_channels
    images = torch.randn(3, channels, side, side, generator=generator)
    noise = torch.rand(3, (side // hf.config.patch_size) ** 2, generator=generator)
    expected = hf(pixel_values=images, noise=noise)
    loss, pred, mask = mae(images, noise=noise)
    assert torch.equal(mask, expected.mask)
    assert torch.allclose(pred, expected.logits, atol=1e-5, rtol=0)
    assert abs(loss.item() - expected.loss.item()) < 1e-5


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])]


# ---------------------------------------------------------------- the key layouts


def save_5x_layout(hf: ViTMAEForPreTraining, folder: Path) -> Path:
    """transformers 5's own module names (q_proj, o_proj, mlp.fc1, vit.layers.i), as its state dict holds them."""
    folder.mkdir()
    hf.config.to_json_file(folder / "config.json")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, folder / "model.safetensors", {"format": "pt"})
    return folder


def save_4x_layout(hf: ViTMAEForPreTraining, folder: Path) -> Path:
    """The 4.x names (attention.attention.query, vit.encoder.layer.i, ...) by interop's layout table, in the
    4.x-era pytorch_model.bin."""
    folder.mkdir()
    hf.config.to_json_file(folder / "config.json")
    official = from_hf_state(hf.state_dict(), build_model(MICRO), "5.x state dict")
    torch.save(to_hf_state(official, "4.x"), folder / "pytorch_model.bin")
    return folder


def save_pretrained_sharded(hf: ViTMAEForPreTraining, folder: Path) -> Path:
    """transformers' own writer, split into shards with a model.safetensors.index.json."""
    hf.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.mark.parametrize("write", [save_5x_layout, save_4x_layout, save_pretrained_sharded])
def test_a_folder_of_either_layout_gives_the_loss_and_predictions_of_transformers(write, tmp_path):
    hf = hf_model()
    folder = write(hf, tmp_path / "hf")
    # transformers reads the folder back as the same model: the layouts are real ones.
    reread, info = ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    assert_same_state(reread.state_dict(), hf.state_dict())
    assert_same_outputs(hf, load_hf_model(folder))


def test_maescale_to_hf_to_maescale_keeps_every_weight(tmp_path):
    torch.manual_seed(1)
    mae = perturbed(build_model(MICRO, norm_pix_loss=True), seed=1)
    folder = export_hf(mae, tmp_path / "hf", MICRO)
    config = json.loads((folder / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["architectures"] == ["ViTMAEForPreTraining"]
    hf, info = ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.norm_pix_loss is True
    assert_same_outputs(hf.eval(), mae)
    assert_same_state(load_hf_model(folder).state_dict(), mae.state_dict())
    # and back through transformers' own writer
    hf.save_pretrained(tmp_path / "resaved")
    assert_same_state(load_hf_model(tmp_path / "resaved").state_dict(), mae.state_dict())


def test_a_shape_of_no_named_model_loads_in_python_with_its_channels(tmp_path):
    changes = dict(hidden_size=48, num_attention_heads=3, intermediate_size=96, decoder_intermediate_size=64,
                   num_channels=1)
    hf = hf_model(seed=2, **changes)
    hf.save_pretrained(tmp_path / "hf")
    mae = load_hf_model(tmp_path / "hf")
    assert mae.in_chans == 1 and mae.blocks[0].mlp.fc1.out_features == 96
    assert_same_outputs(hf, mae)
    # a run folder names its model: this one has none
    result = run_maescale("import", "--weights", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), ok=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96" in result.stderr


def test_hf_default_layer_norm_eps_is_read_as_the_mae_one_with_a_warning(tmp_path, caplog):
    hf = hf_model(seed=3, layer_norm_eps=1e-12)  # what the facebook/vit-mae-* config.json files say
    hf.save_pretrained(tmp_path / "hf")
    with caplog.at_level(logging.WARNING, logger="maescale"):
        mae = load_hf_model(tmp_path / "hf")
    assert "layer_norm_eps=1e-12 read as maescale's 1e-06" in caplog.text
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        assert torch.isclose(mae(images, noise=noise)[0], hf(pixel_values=images, noise=noise).loss, rtol=1e-4)


# ---------------------------------------------------------------- the commands


def test_import_then_export_on_the_command_line_without_transformers(tmp_path, monkeypatch):
    hf = hf_model(seed=4, image_size=16, decoder_num_hidden_layers=2, mask_ratio=0.6, norm_pix_loss=False)
    hf.save_pretrained(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "transformers", None)  # any `import transformers` now fails
    run = tmp_path / "run"
    out = run_maescale("import", "--weights", str(tmp_path / "hf"), "--out", str(run)).stdout
    ckpt = run / "checkpoints" / "step_00000000"
    assert str(ckpt) in out
    model_cfg = load_config(run / "config.yaml").model
    assert (model_cfg.name, model_cfg.img_size, model_cfg.decoder_depth) == (MICRO, 16, 2)
    assert (model_cfg.mask_ratio, model_cfg.norm_pix_loss) == (0.6, False)
    imported = load_model_weights(build_model(**asdict(model_cfg)), ckpt)
    exported = tmp_path / "exported"
    run_maescale("export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(exported))
    monkeypatch.undo()
    assert set(load_file(str(exported / "model.safetensors"))) >= {"vit.encoder.layer.1.attention.attention.query.bias"}
    again = ViTMAEForPreTraining.from_pretrained(exported).eval()
    assert_same_state(again.state_dict(), hf.state_dict())
    assert (again.config.image_size, again.config.mask_ratio, again.config.norm_pix_loss) == (16, 0.6, False)
    assert again.config.layer_norm_eps == 1e-6
    assert_same_outputs(again, imported.eval())


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def drop_a_tensor(folder: Path) -> None:
    state = load_file(str(folder / "model.safetensors"))
    del state["vit.encoder.layer.1.output.dense.bias"]
    save_file(state, folder / "model.safetensors", {"format": "pt"})


BAD_FOLDERS = [
    (lambda f: edit_config(f, qkv_bias=False), [], "qkv_bias=false: maescale's blocks always have"),
    (lambda f: edit_config(f, image_size=[32, 16]), [], "image_size=[32, 16]: only square sizes"),
    (lambda f: edit_config(f, layer_norm_eps=1e-5), [], "layer_norm_eps=1e-05: maescale's LayerNorms use 1e-06"),
    (lambda f: edit_config(f, hidden_act="gelu_new"), [], 'hidden_act="gelu_new"'),
    (lambda f: edit_config(f, mask_ratio=0.0), [], "mask_ratio=0.0: MAE pretraining needs 0 < mask_ratio < 1"),
    (lambda f: (f / "config.json").unlink(), [], "no config.json"),
    (drop_a_tensor, [], "missing ['vit.encoder.layer.1.output.dense.bias'], unexpected []"),
    (lambda f: None, ["--model", "mae_vit_tiny_patch4"], "describes mae_vit_micro_patch4, not mae_vit_tiny_patch4"),
]


@pytest.mark.parametrize("spoil, extra_args, message", BAD_FOLDERS)
def test_import_refuses_what_maescale_cannot_represent_in_one_line(spoil, extra_args, message, tmp_path):
    folder = export_hf(build_model(MICRO), tmp_path / "hf")
    spoil(folder)
    args = ["import", "--weights", str(folder), "--out", str(tmp_path / "run"), *extra_args]
    err = run_maescale(*args, ok=False).stderr
    assert err.startswith("maescale import: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_a_weights_file_still_needs_model_and_export_refuses_rectangles(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({"model": build_model(MICRO).state_dict()}, weights)
    result = run_maescale("import", "--weights", str(weights), "--out", str(tmp_path / "run"), ok=False)
    assert result.returncode == 2 and "--model is required for a weights file" in result.stderr
    with pytest.raises(ConfigError, match=r"img_size=\[32, 16\]: Hugging Face's ViTMAE takes square images only"):
        export_hf(build_model(MICRO, img_size=[32, 16]), tmp_path / "rect")
