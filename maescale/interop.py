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

Reading, writing and fitting weight files, shared with `maescale.hf_interop`, are in
`maescale.weight_files`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_model_weights
from .config import Config, ConfigError, load_config
from .hf_interop import export_hf
from .models import MaskedAutoencoderViT, build_model
from .sizes import size_for_config
from .weight_files import (
    METADATA_FORMAT,
    METADATA_MODEL,
    METADATA_MODEL_CONFIG,
    METADATA_TIMM_KWARGS,
    WeightsMismatchError,
    load_mae_state,
    read_state_dict,
    save_safetensors,
    write_imported_run,
)

TIMM_FORMAT = "timm"


# ---------------------------------------------------------------- run folders


def run_config_of(ckpt: Path) -> Path | None:
    """The resolved config.yaml of the run that wrote `ckpt` (output_dir/checkpoints/step_X)."""
    candidate = ckpt.parent.parent / "config.yaml"
    return candidate if candidate.is_file() else None


def load_run_model(
    ckpt: Path, config: str | None = None, overrides=(), flag: str = "--ckpt"
) -> tuple[Config, nn.Module]:
    """Build the run's model (from its config.yaml unless `config` is given) with the checkpoint's weights;
    `flag` names the checkpoint in the calling command's words (export and visualize: --ckpt)."""
    cfg = load_config(config or run_config_of(ckpt), overrides)
    model = load_model_weights(build_model(**asdict(cfg.model)), ckpt, flag)
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


# ---------------------------------------------------------------- reading files


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
    load_mae_state(model, state, str(path), "encoder.model")
    return model.eval()


# ---------------------------------------------------------------- import into a run folder


def import_official(weights: str | Path, model_name: str, out_dir: str | Path, config: str | None = None) -> Path:
    """Write `out_dir` as a maescale run at step 0 holding the file's weights; return the checkpoint.

    `maescale pretrain output_dir=<out_dir>` then resumes from it (continued pretraining), and
    linprobe / knn / finetune / export read the checkpoint like any other.
    """
    cfg = load_config(config, [f"output_dir={out_dir}", f"model.name={model_name}"])
    model = build_model(**asdict(cfg.model))
    load_mae_state(model, read_state_dict(weights)[0], str(weights), "--model")
    return write_imported_run(cfg, model, Path(out_dir), weights)


