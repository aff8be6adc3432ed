"""Hugging Face `ViTMAEForPreTraining` folders in and out of maescale, without transformers itself.

A folder of config.json and model.safetensors (or pytorch_model.bin, or either sharded with an
*.index.json) in the transformers 4.x or 5.x key names: read into a model (`load_hf_model`) or a
maescale run at step 0 (`import_hf`), and written from a model (`export_hf`, or `maescale export
--format hf`). Parameter names differ between transformers 4.x and 5.x (HF_LAYOUTS); export writes
the 4.x names, which 4.x loads as they are and 5.x renames on load (its conversion_mapping.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from .config import ConfigError, ModelConfig, load_config
from .models import MODEL_SPECS, MaskedAutoencoderViT, build_model
from .sizes import image_hw
from .weight_files import (
    METADATA_FORMAT,
    METADATA_MODEL,
    WeightsMismatchError,
    load_mae_state,
    read_state_dict,
    save_safetensors,
    write_imported_run,
)

logger = logging.getLogger(__name__)

HF_ARCHITECTURE = "ViTMAEForPreTraining"
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
# The weights files of a saved folder, in the order from_pretrained looks for them.
HF_WEIGHTS_FILES = (
    HF_WEIGHTS_FILE, "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
HF_EXPORT_LAYOUT = "4.x"

# maescale (official MAE) module -> transformers module, the same in 4.x and 5.x.
HF_MODULES = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
    "norm": "vit.layernorm",
    "decoder_embed": "decoder.decoder_embed",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred": "decoder.decoder_pred",
}

# The one table of the two layouts: the block stacks, then the modules inside a block. 4.x: the
# modules of its modeling_vit_mae.py (ViTMAELayer: attention.attention.{query,key,value}, ...);
# 5.x: those of 5.23's modeling_vit_mae.py, which its conversion_mapping.py ("ViTModel",
# "ViTMAEForPreTraining") derives from the 4.x names on load. maescale's fused attn.qkv holds
# query, key and value stacked on dim 0 (timm's Attention), in that order.
HF_LAYOUTS = {
    "4.x": {
        "blocks": "vit.encoder.layer",
        "decoder_blocks": "decoder.decoder_layers",
        "norm1": "layernorm_before",
        "attn.query": "attention.attention.query",
        "attn.key": "attention.attention.key",
        "attn.value": "attention.attention.value",
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
    "5.x": {
        "blocks": "vit.layers",
        "decoder_blocks": "decoder.decoder_layers",
        "norm1": "layernorm_before",
        "attn.query": "attention.q_proj",
        "attn.key": "attention.k_proj",
        "attn.value": "attention.v_proj",
        "attn.proj": "attention.o_proj",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
}
QKV_PARTS = ("attn.query", "attn.key", "attn.value")
# Read as the prefix on the right. 5.x's save_pretrained writes 4.x names by undoing each rename of
# its conversion mapping, and undoing ViTModel's `encoder.layer. -> layers.` also turns the decoder's
# `decoder_layers.` into this (seen with 5.23; 5.x itself loads it back).
HF_PREFIX_ALIASES = {"decoder.decoder_encoder.layer.": "decoder.decoder_layers."}

# MaskedAutoencoderViT argument -> config.json key (the MLP ratios are stored there as widths).
HF_CONFIG_KEYS = {
    "img_size": "image_size",
    "patch_size": "patch_size",
    "in_chans": "num_channels",
    "embed_dim": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_ratio": "intermediate_size",
    "decoder_embed_dim": "decoder_hidden_size",
    "decoder_depth": "decoder_num_hidden_layers",
    "decoder_num_heads": "decoder_num_attention_heads",
    "decoder_mlp_ratio": "decoder_intermediate_size",
    "mask_ratio": "mask_ratio",
    "norm_pix_loss": "norm_pix_loss",
}
HF_WIDTH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels",
                 "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
                 "decoder_intermediate_size")
# What a key left out of config.json means: ViTMAEConfig's defaults (configuration_vit_mae.py, 4.x and 5.x).
HF_CONFIG_DEFAULTS = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "layer_norm_eps": 1e-12,
    "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": True, "decoder_num_attention_heads": 16,
    "decoder_hidden_size": 512, "decoder_num_hidden_layers": 8, "decoder_intermediate_size": 2048,
    "mask_ratio": 0.75, "norm_pix_loss": False,
}
# A config.json layer_norm_eps this close to maescale's (1e-6, the reference's) is read as it: inside
# LayerNorm's sqrt(var + eps) the difference is at most this much. It admits HF's default 1e-12, which
# the facebook/vit-mae-* config.json files carry for weights trained at 1e-6.
HF_LAYER_NORM_EPS_TOLERANCE = 1e-6
# The parts of a MaskedAutoencoderViT a named model fixes; the rest are run-config overrides.
ENCODER_SHAPE_ARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio")


# ------------------------------------------------ key names


def hf_keys(key: str, layout: str) -> list[str]:
    """The transformers name(s) of a maescale state-dict key in `layout`: three (query, key, value) for attn.qkv."""
    stack, _, rest = key.partition(".")
    if stack in ("blocks", "decoder_blocks"):
        index, _, rest = rest.partition(".")
        module, _, kind = rest.rpartition(".")
        names = HF_LAYOUTS[layout]
        parts = QKV_PARTS if module == "attn.qkv" else (module,)
        if all(part in names for part in parts):
            return [f"{names[stack]}.{index}.{names[part]}.{kind}" for part in parts]
    module = next((m for m in HF_MODULES if key == m or key.startswith(m + ".")), None)
    if module is None:
        raise WeightsMismatchError(f"{key} has no counterpart in Hugging Face's {HF_ARCHITECTURE}")
    return [HF_MODULES[module] + key[len(module):]]


def to_hf_state(state: dict[str, Tensor], layout: str = HF_EXPORT_LAYOUT) -> dict[str, Tensor]:
    """A maescale state dict under transformers names, attn.qkv split into query, key and value."""
    hf_state = {}
    for key, value in state.items():
        names, value = hf_keys(key, layout), value.detach()
        if len(names) == 1:
            hf_state[names[0]] = value.contiguous()
        else:  # copies: safetensors refuses tensors that share memory, as chunks of one tensor do
            hf_state.update({name: part.clone() for name, part in zip(names, value.chunk(len(names)))})
    return hf_state


def from_hf_state(hf_state: dict[str, Tensor], model: MaskedAutoencoderViT, source: str) -> dict[str, Tensor]:
    """The state dict of `model` from transformers names of either layout, query/key/value merged into attn.qkv."""
    hf_state = {_unalias(key): value for key, value in hf_state.items()}
    layout = _hf_layout_of(set(hf_state), list(model.state_dict()), source)
    state = {}
    for key in model.state_dict():
        names = hf_keys(key, layout)
        state[key] = hf_state[names[0]] if len(names) == 1 else torch.cat([hf_state[name] for name in names])
    return state


def _unalias(key: str) -> str:
    for alias, prefix in HF_PREFIX_ALIASES.items():
        if key.startswith(alias):
            return prefix + key[len(alias):]
    return key


def _hf_layout_of(keys: set[str], model_keys: list[str], source: str) -> str:
    """The layout whose names are exactly `keys`; else an error listing the differences from the closest."""
    expected = {layout: {name for key in model_keys for name in hf_keys(key, layout)} for layout in HF_LAYOUTS}
    for layout, names in expected.items():
        if names == keys:
            return layout
    closest = max(expected, key=lambda layout: len(expected[layout] & keys))
    missing, unexpected = sorted(expected[closest] - keys), sorted(keys - expected[closest])
    raise WeightsMismatchError(
        f"{source}: the weights do not fit its {HF_CONFIG_FILE} (against the transformers {closest} names): "
        f"missing {missing[:4]}, unexpected {unexpected[:4]}"
    )


# ------------------------------------------------ config.json


def read_hf_config(folder: Path) -> dict:
    """config.json of a ViTMAEForPreTraining folder, with ViTMAEConfig's defaults for the keys it leaves out."""
    path = folder / HF_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {HF_CONFIG_FILE}; expected a Hugging Face {HF_ARCHITECTURE} folder "
                                f"({HF_CONFIG_FILE} and {HF_WEIGHTS_FILE} or pytorch_model.bin)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys")
    if hf.get("model_type", "vit_mae") != "vit_mae":
        raise ConfigError(f"{path}: model_type={hf['model_type']!r}; maescale reads vit_mae ({HF_ARCHITECTURE})")
    architectures = hf.get("architectures") or [HF_ARCHITECTURE]
    if HF_ARCHITECTURE not in architectures:
        raise ConfigError(f"{path}: architectures={architectures}; maescale reads {HF_ARCHITECTURE} "
                          "(encoder and decoder)")
    return {**HF_CONFIG_DEFAULTS, **hf}


def hf_model_kwargs(hf: dict, source: Path) -> dict:
    """MaskedAutoencoderViT arguments from a config.json, refusing what the model cannot be (naming the key)."""
    _check_hf_supported(hf, source)
    kwargs = {arg: hf[key] for arg, key in HF_CONFIG_KEYS.items()}
    kwargs["img_size"] = _square_side(hf, "image_size", source)
    kwargs["patch_size"] = _square_side(hf, "patch_size", source)
    kwargs["mlp_ratio"] = hf["intermediate_size"] / hf["hidden_size"]
    kwargs["decoder_mlp_ratio"] = hf["decoder_intermediate_size"] / hf["decoder_hidden_size"]
    return kwargs


def _check_hf_supported(hf: dict, source: Path) -> None:
    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source / HF_CONFIG_FILE}: {key}={json.dumps(hf[key])}: {why}")

    for key in HF_WIDTH_KEYS:
        if isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] < 1:
            raise refuse(key, "must be a positive integer")
    if hf["qkv_bias"] is not True:
        raise refuse("qkv_bias", "maescale's blocks always have query/key/value biases (the MAE reference's)")
    if hf["hidden_act"] != "gelu":
        raise refuse("hidden_act", "maescale's MLPs use the exact GELU, 'gelu'")
    if not isinstance(hf["mask_ratio"], (int, float)) or not 0 < hf["mask_ratio"] < 1:
        raise refuse("mask_ratio", "MAE pretraining needs 0 < mask_ratio < 1")
    if not isinstance(hf["layer_norm_eps"], (int, float)):
        raise refuse("layer_norm_eps", "must be a number")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hf[key]:
            logger.warning("%s: %s=%s ignored: maescale's MAE has no dropout", source / HF_CONFIG_FILE, key, hf[key])


def _square_side(hf: dict, key: str, source: Path) -> int:
    try:
        height, width = image_hw(hf[key], key)
    except ValueError as error:
        raise ConfigError(f"{source / HF_CONFIG_FILE}: {error}") from error
    if height != width:
        raise ConfigError(f"{source / HF_CONFIG_FILE}: {key}={hf[key]}: only square sizes; Hugging Face's ViTMAE "
                          "builds its position tables on a square grid")
    return height


def _check_built_like_config(model: MaskedAutoencoderViT, hf: dict, source: Path) -> None:
    """The LayerNorm eps and MLP widths of `model` are the config's (or, for eps, close enough)."""
    eps = hf["layer_norm_eps"]
    if abs(eps - model.norm.eps) > HF_LAYER_NORM_EPS_TOLERANCE:
        raise ConfigError(f"{source / HF_CONFIG_FILE}: layer_norm_eps={eps}: maescale's LayerNorms use "
                          f"{model.norm.eps} (the MAE reference's); this one would change what the model computes")
    if eps != model.norm.eps:
        logger.warning("%s: layer_norm_eps=%s read as maescale's %s (a difference of at most %s inside "
                       "sqrt(var + eps))", source / HF_CONFIG_FILE, eps, model.norm.eps, HF_LAYER_NORM_EPS_TOLERANCE)
    widths = {"intermediate_size": model.blocks[0].mlp.fc1.out_features,
              "decoder_intermediate_size": model.decoder_blocks[0].mlp.fc1.out_features}
    for key, width in widths.items():
        if width != hf[key]:
            raise ConfigError(f"{source / HF_CONFIG_FILE}: {key}={hf[key]}: the MLP ratio it implies builds {width}")


def hf_config_of(model: MaskedAutoencoderViT) -> dict:
    """The config.json of `model`, layer_norm_eps included: HF's default 1e-12 is not the MAE's 1e-6."""
    height, width = image_hw(model.img_size)
    if height != width:
        raise ConfigError(f"img_size={[height, width]}: Hugging Face's ViTMAE takes square images only "
                          "(its position tables are a square grid)")
    block, decoder_block = model.blocks[0], model.decoder_blocks[0]
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": "vit_mae",
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": block.attn.num_heads,
        "intermediate_size": block.mlp.fc1.out_features,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": model.norm.eps,
        "image_size": height,
        "patch_size": model.patch_size,
        "num_channels": model.in_chans,
        "qkv_bias": True,
        "decoder_hidden_size": model.decoder_embed.out_features,
        "decoder_num_hidden_layers": len(model.decoder_blocks),
        "decoder_num_attention_heads": decoder_block.attn.num_heads,
        "decoder_intermediate_size": decoder_block.mlp.fc1.out_features,
        "mask_ratio": model.mask_ratio,
        "norm_pix_loss": model.norm_pix_loss,
    }


# ------------------------------------------------ named models


def named_model_of(kwargs: dict, source: Path) -> tuple[str, list[str]]:
    """The registered model with the encoder of `kwargs`, and the run-config overrides that give the rest.

    A run folder names its model in config.yaml, so only a registered encoder fits one; every other
    argument must be a model.* key of the run config or equal the named model's value.
    """
    name = next((name for name, spec in MODEL_SPECS.items() if _same_encoder(spec, kwargs)), None)
    if name is None:
        shape = ", ".join(f"{HF_CONFIG_KEYS[arg]}={_hf_value(kwargs, arg)}" for arg in ENCODER_SHAPE_ARGS)
        raise ConfigError(f"{source / HF_CONFIG_FILE}: {shape} is no named maescale encoder (MODEL_SPECS), which a "
                          "run folder needs; maescale.hf_interop.load_hf_model() reads it in Python")
    run_keys = {field.name for field in dataclasses.fields(ModelConfig)}
    named = {**_constructor_defaults(), **MODEL_SPECS[name]}
    overrides = [f"model.name={name}"]
    for arg, value in kwargs.items():
        if arg in run_keys:
            overrides.append(f"model.{arg}={json.dumps(value)}")
        elif arg not in ENCODER_SHAPE_ARGS and not math.isclose(value, named[arg]):
            raise ConfigError(f"{source / HF_CONFIG_FILE}: {HF_CONFIG_KEYS[arg]}={_hf_value(kwargs, arg)}: a run "
                              f"config cannot hold it (no model.{arg}; {name} has {named[arg]})")
    return name, overrides


def _same_encoder(spec: dict, kwargs: dict) -> bool:
    return all(math.isclose(spec[arg], kwargs[arg]) for arg in ENCODER_SHAPE_ARGS)


def _hf_value(kwargs: dict, arg: str):
    """`arg` as config.json spells it: the MLP ratios as widths."""
    widths = {"mlp_ratio": "embed_dim", "decoder_mlp_ratio": "decoder_embed_dim"}
    return round(kwargs[arg] * kwargs[widths[arg]]) if arg in widths else kwargs[arg]


def _constructor_defaults() -> dict:
    parameters = inspect.signature(MaskedAutoencoderViT.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


# ------------------------------------------------ folders in and out


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of a saved folder: its first weights file of HF_WEIGHTS_FILES (an index: all its shards)."""
    for name in HF_WEIGHTS_FILES:
        path = folder / name
        if path.is_file():
            return _read_hf_shards(path) if name.endswith(".index.json") else read_state_dict(path)[0]
    raise FileNotFoundError(f"{folder}: no weights file ({', '.join(HF_WEIGHTS_FILES)})")


def _read_hf_shards(index: Path) -> dict[str, Tensor]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise WeightsMismatchError(f"{index}: not a weights index with a weight_map ({error!r})") from error
    state = {}
    for shard in shards:
        state.update(read_state_dict(index.parent / shard)[0])
    return state


def _fill_from_hf(model: MaskedAutoencoderViT, folder: Path, hf: dict) -> MaskedAutoencoderViT:
    _check_built_like_config(model, hf, folder)
    load_mae_state(model, from_hf_state(read_hf_weights(folder), model, str(folder)), str(folder))
    return model


def load_hf_model(folder: str | Path) -> MaskedAutoencoderViT:
    """The MAE of a ViTMAEForPreTraining folder, of any shape its config.json gives (transformers not needed)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    try:
        model = MaskedAutoencoderViT(**hf_model_kwargs(hf, folder))
    except ValueError as error:  # sizes the model refuses, e.g. a width not divisible by the heads
        raise ConfigError(f"{folder / HF_CONFIG_FILE}: {error}") from error
    return _fill_from_hf(model, folder, hf).eval()


def import_hf(
    folder: str | Path, out_dir: str | Path, config: str | None = None, model_name: str | None = None
) -> Path:
    """Write `out_dir` as a maescale run at step 0 holding a ViTMAEForPreTraining folder's weights.

    The model is the registered one with the folder's encoder, the rest of config.json (image and
    patch size, decoder, mask ratio, norm_pix_loss) becoming model.* keys of the run config.
    """
    folder = Path(folder)
    hf = read_hf_config(folder)
    name, overrides = named_model_of(hf_model_kwargs(hf, folder), folder)
    if model_name is not None and model_name != name:
        raise ConfigError(f"{folder / HF_CONFIG_FILE} describes {name}, not {model_name}")
    cfg = load_config(config, [f"output_dir={out_dir}", *overrides])
    model = _fill_from_hf(build_model(**asdict(cfg.model)), folder, hf)
    return write_imported_run(cfg, model, Path(out_dir), folder)


def export_hf(model: MaskedAutoencoderViT, out: str | Path, model_name: str | None = None) -> Path:
    """A folder that ViTMAEForPreTraining.from_pretrained(out) loads (transformers 4.x and 5.x), written without it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file: the hf format writes a folder ({HF_CONFIG_FILE}, {HF_WEIGHTS_FILE})")
    config = hf_config_of(model)
    state = to_hf_state(model.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    (out / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # transformers 4.x refuses a safetensors file whose metadata lacks format=pt (see ml-explore/mlx#743).
    metadata = {METADATA_FORMAT: "pt", **({METADATA_MODEL: model_name} if model_name else {})}
    save_safetensors(state, out / HF_WEIGHTS_FILE, metadata)
    return out
