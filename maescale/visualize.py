"""`maescale visualize`: the paper's reconstruction figure from a saved checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .data import UnreadableImageWarning, first_images
from .data.folder import IMAGE_EXTENSIONS, load_rgb
from .data.transforms import EvalTransform
from .export import load_run_model
from .viz import save_reconstruction_figure


def folder_images(folder: str, img_size: int, count: int) -> torch.Tensor:
    """The first `count` images (sorted by path) of a folder: flat, or with class subfolders."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not paths:
        raise FileNotFoundError(f"--images {folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in it")
    transform = EvalTransform(img_size)
    images = []
    for path in paths:
        if len(images) == count:
            break
        try:
            images.append(transform(load_rgb(str(path))))
        except Exception as error:  # noqa: BLE001 - decoders raise many types on corrupt input
            warnings.warn(f"skipping unreadable image {path}: {error}", UnreadableImageWarning, stacklevel=2)
    if not images:
        raise FileNotFoundError(f"--images {folder}: none of the images could be read")
    return torch.stack(images)


def visualize(cfg_path: str | None, overrides, *, ckpt: str, out: str, images: str | None, num_images: int, seed: int) -> Path:
    ckpt = Path(ckpt)
    cfg, model = load_run_model(ckpt, cfg_path, overrides)
    img_size = model.img_size
    if images:
        batch = folder_images(images, img_size, num_images)
    else:
        batch = first_images(cfg.data, img_size=img_size, seed=cfg.seed, count=num_images)
    return save_reconstruction_figure(model, batch, out, seed=seed, title=f"{cfg.model.name}, {ckpt.name}")
