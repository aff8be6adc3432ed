"""Checkpoints as ordinary files: the full MAE in one safetensors file, from any strategy."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .checkpoint import load_model_weights
from .config import Config, load_config
from .models import build_model


def run_config_of(ckpt: Path) -> Path | None:
    """The resolved config.yaml of the run that wrote `ckpt` (output_dir/checkpoints/step_X)."""
    candidate = ckpt.parent.parent / "config.yaml"
    return candidate if candidate.is_file() else None


def load_run_model(ckpt: Path, config: str | None = None, overrides=()) -> tuple[Config, nn.Module]:
    """Build the run's model (from its config.yaml unless `config` is given) with the checkpoint's weights."""
    cfg = load_config(config or run_config_of(ckpt), overrides)
    model = load_model_weights(build_model(**asdict(cfg.model)), ckpt)
    return cfg, model.eval()


def export_consolidated(ckpt: str | Path, out: str | Path, config: str | None = None) -> Path:
    """Gather a (sharded) checkpoint into one safetensors file with the official MAE key names."""
    _, model = load_run_model(Path(ckpt), config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return out


def export(ckpt: str | Path, out: str | Path, fmt: str = "consolidated", config: str | None = None) -> Path:
    """Write a checkpoint in `fmt`: consolidated (full MAE), timm (encoder) or release ({'model': sd})."""
    from .interop import export_release, export_timm

    if fmt == "consolidated":
        return export_consolidated(ckpt, out, config=config)
    cfg, model = load_run_model(Path(ckpt), config)
    if fmt == "timm":
        return export_timm(model, out, cfg.model.name)
    if fmt == "release":
        return export_release(model, out)
    raise ValueError(f"unknown export format {fmt!r}; choose consolidated, timm or release")
