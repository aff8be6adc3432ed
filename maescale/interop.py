"""Weights in and out of maescale: single files from checkpoints, timm, the official MAE release files.

- consolidated: a (possibly sharded) checkpoint of any strategy as one safetensors file of the
  full MAE, official key names (`export_consolidated`);
- timm: the encoder part of the MAE (official key names) is exactly the state dict of
  timm's `VisionTransformer(num_classes=0)`; `timm_kwargs` says how to build that model.
- official release: a `.pth` file holding `{'model': state_dict}` with the encoder only
  (the released pretrained weights) or encoder + decoder (the visualisation weights).
- maescale: `import_official` turns such a file into a run folder with a step-0 checkpoint,
  which `pretrain` resumes from (continued pretraining) and every evaluation command reads.
- Hugging Face: a `ViTMAEForPreTraining` folder, in `maescale.hf_interop` (`export` writes it
  through there).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .checkpoint import load_model_weights
from .config import Config, ConfigError, load_config
from .models import POSITION_TABLE_KEYS, MaskedAutoencoderViT, build_model, is_encoder_key
from .sizes import size_for_config

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
        from .hf_interop import export_hf  # it builds on this module's readers and writers

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
