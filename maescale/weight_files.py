"""MAE weights as files, shared by the importers and exporters of `maescale.interop` (timm, the
official release) and `maescale.hf_interop` (Hugging Face): the safetensors metadata keys, reading
and writing weight files, fitting a state dict into a model, and a run folder at step 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import Config, ConfigError
from .models import POSITION_TABLE_KEYS, MaskedAutoencoderViT, is_encoder_key

logger = logging.getLogger(__name__)

METADATA_FORMAT = "format"
METADATA_MODEL = "maescale_model"
METADATA_TIMM_KWARGS = "timm_kwargs"
# The run's model section (JSON): the shape a file's named model was built with (img_size, in_chans, ...).
METADATA_MODEL_CONFIG = "maescale_model_config"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsMismatchError(ConfigError):
    """A weights file does not fit the model it is loaded into (names the keys); a user error
    like a bad config value, so the CLI reports it without a traceback."""


# ---------------------------------------------------------------- writing


def save_safetensors(state: dict[str, Tensor], out: str | Path, metadata: dict[str, str]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out), metadata=metadata)
    return out


# ---------------------------------------------------------------- reading


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


def load_mae_state(
    model: MaskedAutoencoderViT, state: dict[str, Tensor], source: str, model_flag: str | None = None
) -> bool:
    """Load an encoder-only or full MAE state dict strictly; return whether it had the decoder.
    `model_flag` is the calling command's key or option that chose the model, named when shapes differ.

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
        suspect = f"wrong {model_flag}?" if model_flag else "a model of another size?"
        raise WeightsMismatchError(f"{source}: shapes differ ({suspect}): {shapes[:4]}")
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


# ---------------------------------------------------------------- a run folder at step 0


def write_imported_run(cfg: Config, model: MaskedAutoencoderViT, out_dir: Path, source: str | Path) -> Path:
    """`out_dir`/config.yaml and a step-0 checkpoint of `model` (built from `cfg.model`); return the checkpoint."""
    from . import checkpoint, parallel
    from .config import save_resolved
    from .layout import Layout
    from .optim import build_optimizer, peak_lr

    accelerator = parallel.build_accelerator(Layout())  # this process alone writes the step-0 checkpoint
    optimizer = build_optimizer(model, cfg.optim, peak_lr(cfg, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out_dir / "config.yaml", {"imported_from": str(source)})
    root = checkpoint.checkpoint_root(out_dir)
    return checkpoint.save(model, optimizer, {"step": 0}, root, 0, cfg.checkpoint.keep_last, accelerator)
