"""Weights in and out of maescale: single files from checkpoints, timm, the official MAE release files.

- consolidated: a (possibly sharded) checkpoint of any strategy as one safetensors file of the
  full MAE, official key names (`export_consolidated`);
- timm: the encoder part of the MAE (official key names) is exactly the state dict of
  timm's `VisionTransformer(num_classes=0)`; `timm_kwargs` says how to build that model.
- official release: a `.pth` file holding `{'model': state_dict}` with the encoder only
  (the released pretrained weights) or encoder + decoder (the visualisation weights).
- maescale: `import_official` turns such a file into a run folder with a step-0 checkpoint,
  which `pretrain` resumes from (continued pretraining) and every evaluation command reads.
- Hugging Face: a `ViTMAEForPreTraining` folder (config.json + model.safetensors) in the
  transformers 4.x or 5.x key names, read (`load_hf_model`, `import_hf`) and written
  (`export_hf`) without transformers itself.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .checkpoint import load_model_weights
from .config import Config, ConfigError, ModelConfig, load_config
from .models import MODEL_SPECS, POSITION_TABLE_KEYS, MaskedAutoencoderViT, build_model, is_encoder_key
from .sizes import image_hw, size_for_config

logger = logging.getLogger(__name__)

TIMM_FORMAT = "timm"
METADATA_FORMAT = "format"
METADATA_MODEL = "maescale_model"
METADATA_TIMM_KWARGS = "timm_kwargs"
# The run's model section (JSON): the shape a file's named model was built with (img_size, in_chans, ...).
METADATA_MODEL_CONFIG = "maescale_model_config"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsMismatchError(ConfigError):
    """A weights file does not fit the model it is loaded into (names the keys); a user error
    like a bad config value, so the CLI reports it without a traceback."""


# ---------------------------------------------------------------- run folders


def run_config_of(ckpt: Path) -> Path | None:
    """The resolved config.yaml of the run that wrote `ckpt` (output_dir/checkpoints/step_X)."""
    candidate = ckpt.parent.parent / "config.yaml"
    return candidate if candidate.is_file() else None


def load_run_model(ckpt: Path, config: str | None = None, overrides=()) -> tuple[Config, nn.Module]:
    """Build the run's model (from its config.yaml unless `config` is given) with the checkpoint's weights."""
    cfg = load_config(config or run_config_of(ckpt), overrides)
    model = load_model_weights(build_model(**asdict(cfg.model)), ckpt)
    return cfg, model.eval()


# ---------------------------------------------------------------- export


def export(ckpt: str | Path, out: str | Path, fmt: str = "consolidated", config: str | None = None) -> Path:
    """Write a checkpoint in `fmt`: consolidated (full MAE), timm (encoder), release ({'model': sd}), hf (folder)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose {', '.join(EXPORT_FORMATS)}")
    cfg, model = load_run_model(Path(ckpt), config)
    if fmt == "consolidated":
        return save_safetensors(
            model.state_dict(), out,
            {METADATA_FORMAT: "consolidated", METADATA_MODEL: cfg.model.name, **model_config_metadata(cfg)},
        )
    if fmt == "timm":
        return export_timm(model, out, cfg.model.name, model_config_metadata(cfg))
    if fmt == "hf":
        return export_hf(model, out, cfg.model.name)
    return export_release(model, out)


def model_config_metadata(cfg: Config) -> dict[str, str]:
    return {METADATA_MODEL_CONFIG: json.dumps(asdict(cfg.model))}


def export_consolidated(ckpt: str | Path, out: str | Path, config: str | None = None) -> Path:
    """Gather a (sharded) checkpoint into one safetensors file with the official MAE key names."""
    return export(ckpt, out, "consolidated", config)


EXPORT_FORMATS = ("consolidated", "timm", "release", "hf")


# ---------------------------------------------------------------- timm


def timm_kwargs(model: MaskedAutoencoderViT) -> dict:
    """Arguments of timm's VisionTransformer whose state dict equals `model`'s encoder."""
    dim = model.cls_token.shape[-1]
    block = model.blocks[0]
    return dict(
        img_size=size_for_config(model.img_size),
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / dim,
        qkv_bias=True,
    )


def build_timm_vit(kwargs: dict, **extra) -> nn.Module:
    """timm VisionTransformer from `timm_kwargs(...)` plus e.g. num_classes, global_pool."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**{"num_classes": 0, **kwargs, **extra})


def export_timm(
    model: MaskedAutoencoderViT, out: str | Path, model_name: str, extra_metadata: dict[str, str] | None = None
) -> Path:
    """The encoder as a safetensors file that timm's VisionTransformer(num_classes=0) loads strictly."""
    metadata = {
        METADATA_FORMAT: TIMM_FORMAT,
        METADATA_MODEL: model_name,
        METADATA_TIMM_KWARGS: json.dumps(timm_kwargs(model)),
        **(extra_metadata or {}),
    }
    return save_safetensors(model.encoder_state_dict(), out, metadata)


def export_release(model: MaskedAutoencoderViT, out: str | Path) -> Path:
    """Encoder + decoder as `{'model': state_dict}`, the layout of the official release files."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}, out)
    return out


def save_safetensors(state: dict[str, Tensor], out: str | Path, metadata: dict[str, str]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out), metadata=metadata)
    return out


# ---------------------------------------------------------------- reading files


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file or of a torch file ({'model': sd} or a bare sd)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            return load_file(str(path)), metadata
        except SafetensorError as error:
            raise WeightsMismatchError(f"{path}: not a safetensors file ({error})") from error
    try:
        # weights_only: a checkpoint file must not be able to run code when it is read.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle raises many types
        raise WeightsMismatchError(
            f"{path}: not a tensors-only torch file ({type(error).__name__}: {error}); "
            "re-save it as torch.save({'model': state_dict}, path)"
        ) from error
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path}: expected {{'model': state_dict}} or a state dict of tensors")
    return state, {}


def strip_wrapper_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop `module.` (DDP) and `_orig_mod.` (torch.compile) from key names."""
    cleaned = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def load_mae_state(model: MaskedAutoencoderViT, state: dict[str, Tensor], source: str) -> bool:
    """Load an encoder-only or full MAE state dict strictly; return whether it had the decoder.

    Every encoder key must be present; decoder keys must be all present or all absent (an
    encoder-only file leaves the decoder at its initialisation, with a warning). Anything
    else is an error naming the keys.
    """
    expected = model.state_dict()
    state = own_position_tables(strip_wrapper_prefixes(state), expected, source)
    unexpected = sorted(set(state) - set(expected))
    missing_encoder = sorted(k for k in expected if is_encoder_key(k) and k not in state)
    decoder_keys = [k for k in expected if not is_encoder_key(k)]
    present_decoder = [k for k in decoder_keys if k in state]
    if unexpected or missing_encoder or 0 < len(present_decoder) < len(decoder_keys):
        missing_decoder = sorted(set(decoder_keys) - set(present_decoder)) if present_decoder else []
        raise WeightsMismatchError(
            f"{source} does not fit {type(model).__name__} of this size: unexpected {unexpected[:8]}, "
            f"missing encoder keys {missing_encoder[:8]}, missing decoder keys {missing_decoder[:8]}"
        )
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if shapes:
        raise WeightsMismatchError(f"{source}: shapes differ (wrong encoder.model?): {shapes[:4]}")
    has_decoder = bool(present_decoder)
    if not has_decoder:
        state = {**state, **{k: expected[k] for k in decoder_keys}}
        logger.warning("%s holds no decoder: it keeps its initialisation (fine for evaluation and fine-tuning; "
                       "reconstructions need continued pretraining first)", source)
    model.load_state_dict(state, strict=True)
    return has_decoder


def own_position_tables(state: dict[str, Tensor], expected: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """`state` with the model's position tables in place of tables of another patch grid (a file
    written at another img_size). They are fixed sin-cos functions of the grid, not learned: the
    model's own, computed for its grid, are the ones its images need."""
    other_grid = [
        key for key in POSITION_TABLE_KEYS
        if key in state and key in expected and state[key].shape[-1] == expected[key].shape[-1]
        and state[key].shape != expected[key].shape
    ]
    if other_grid:
        logger.info("%s: position tables of %d patches recomputed for the model's %d", source,
                    state[other_grid[0]].shape[1] - 1, expected[other_grid[0]].shape[1] - 1)
    return {**state, **{key: expected[key] for key in other_grid}}


def file_model_kwargs(name: str, metadata: dict[str, str]) -> dict:
    """build_model arguments for a weights file of model `name`: the model section its run recorded
    (img_size, in_chans, ... overrides) when it names the same model, else the named model's own."""
    recorded = json.loads(metadata.get(METADATA_MODEL_CONFIG, "null"))
    return recorded if isinstance(recorded, dict) and recorded.get("name") == name else {"name": name}


def load_weights_file(path: str | Path, model_name: str | None) -> MaskedAutoencoderViT:
    """An MAE built from a weights file (official .pth, consolidated or timm safetensors)."""
    state, metadata = read_state_dict(path)
    name = model_name or metadata.get(METADATA_MODEL)
    if name is None:
        raise WeightsMismatchError(
            f"{path}: the file does not name its model; set encoder.model (e.g. mae_vit_base_patch16)"
        )
    model = build_model(**file_model_kwargs(name, metadata))
    load_mae_state(model, state, str(path))
    return model.eval()


# ---------------------------------------------------------------- import into a run folder


def import_official(weights: str | Path, model_name: str, out_dir: str | Path, config: str | None = None) -> Path:
    """Write `out_dir` as a maescale run at step 0 holding the file's weights; return the checkpoint.

    `maescale pretrain output_dir=<out_dir>` then resumes from it (continued pretraining), and
    linprobe / knn / finetune / export read the checkpoint like any other.
    """
    cfg = load_config(config, [f"output_dir={out_dir}", f"model.name={model_name}"])
    model = build_model(**asdict(cfg.model))
    load_mae_state(model, read_state_dict(weights)[0], str(weights))
    return write_imported_run(cfg, model, Path(out_dir), weights)


def write_imported_run(cfg: Config, model: MaskedAutoencoderViT, out_dir: Path, source: str | Path) -> Path:
    """`out_dir`/config.yaml and a step-0 checkpoint of `model` (built from `cfg.model`); return the checkpoint."""
    from . import checkpoint, parallel
    from .config import save_resolved
    from .optim import build_optimizer, peak_lr

    accelerator = parallel.build_accelerator(cfg)
    optimizer = build_optimizer(model, cfg, peak_lr(cfg, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out_dir / "config.yaml", {"imported_from": str(source)})
    root = checkpoint.checkpoint_root(out_dir)
    return checkpoint.save(model, optimizer, {"step": 0}, root, 0, cfg.checkpoint.keep_last, accelerator)


# ---------------------------------------------------------------- Hugging Face ViTMAEForPreTraining
#
# A folder of config.json and model.safetensors (or pytorch_model.bin, or either sharded with an
# *.index.json). Parameter names differ between transformers 4.x and 5.x (HF_LAYOUTS); export writes
# the 4.x names, which 4.x loads as they are and 5.x renames on load (its conversion_mapping.py).

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
                          "run folder needs; maescale.interop.load_hf_model() reads it in Python")
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
