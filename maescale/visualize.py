"""`maescale visualize`: the paper's reconstruction figure from a saved checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import first_images
from .data.folder import ImageFolderDataset
from .data.transforms import EvalTransform
from .export import load_run_model
from .viz import save_reconstruction_figure


def folder_images(folder: str, img_size: int, count: int) -> torch.Tensor:
    dataset = ImageFolderDataset(folder)
    transform = EvalTransform(img_size)
    return torch.stack([transform(dataset[i].image) for i in range(min(count, len(dataset)))])


def visualize(cfg_path: str | None, overrides, *, ckpt: str, out: str, images: str | None, num_images: int, seed: int) -> Path:
    ckpt = Path(ckpt)
    cfg, model = load_run_model(ckpt, cfg_path, overrides)
    img_size = model.img_size
    if images:
        batch = folder_images(images, img_size, num_images)
    else:
        batch = first_images(cfg.data, img_size=img_size, seed=cfg.seed, count=num_images)
    return save_reconstruction_figure(model, batch, out, seed=seed, title=f"{cfg.model.name}, {ckpt.name}")
