"""`maescale visualize`: the paper's reconstruction figure from a saved checkpoint."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoint import load_model_weights
from .config import Config, load_config
from .data import first_images
from .data.folder import ImageFolderDataset
from .data.transforms import EvalTransform
from .models import build_model
from .viz import save_reconstruction_figure


def run_config_of(ckpt: Path) -> Path | None:
    """The resolved config.yaml of the run that wrote `ckpt` (output_dir/checkpoints/step_X)."""
    candidate = ckpt.parent.parent / "config.yaml"
    return candidate if candidate.is_file() else None


def load_model_from_checkpoint(cfg: Config, ckpt: Path) -> torch.nn.Module:
    return load_model_weights(build_model(**asdict(cfg.model)), ckpt).eval()


def folder_images(folder: str, img_size: int, count: int) -> torch.Tensor:
    dataset = ImageFolderDataset(folder)
    transform = EvalTransform(img_size)
    return torch.stack([transform(dataset[i].image) for i in range(min(count, len(dataset)))])


def visualize(cfg_path: str | None, overrides, *, ckpt: str, out: str, images: str | None, num_images: int, seed: int) -> Path:
    ckpt = Path(ckpt)
    cfg = load_config(cfg_path or run_config_of(ckpt), overrides)
    model = load_model_from_checkpoint(cfg, ckpt)
    img_size = model.img_size
    batch = folder_images(images, img_size, num_images) if images else first_images(cfg.data, img_size=img_size, seed=cfg.seed, count=num_images)
    return save_reconstruction_figure(model, batch, out, seed=seed, title=f"{cfg.model.name}, {ckpt.name}")
