"""Reconstruction figures (original | masked | reconstruction | reconstruction + visible), during
training and from a saved checkpoint (`maescale visualize`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import IMAGENET_MEAN, IMAGENET_STD, first_images
from .data.folder import IMAGE_EXTENSIONS, load_rgb
from .data.transforms import EvalTransform
from .errors import DataError
from .interop import load_run_model

logger = logging.getLogger(__name__)


def fill_from_visible(values: torch.Tensor, visible: torch.Tensor, grid: int) -> torch.Tensor:
    """Fill masked grid cells with the mean of the nearest visible cells.

    values, visible: [N, L] on a grid x grid layout (row-major); returns [N, L].
    Repeated 3x3 normalised averaging grows the visible region until every cell
    has an estimate, so masked patches never use their own (hidden) pixels.
    """
    filled = values.reshape(-1, 1, grid, grid).float()
    known = visible.reshape(-1, 1, grid, grid)
    while not bool(known.all()):
        weight = known.float()
        total = F.avg_pool2d(filled * weight, 3, stride=1, padding=1)
        count = F.avg_pool2d(weight, 3, stride=1, padding=1)
        newly = ~known & (count > 0)
        if not bool(newly.any()):
            raise ValueError("no visible patch to estimate statistics from")
        filled = torch.where(newly, total / count.clamp_min(1e-12), filled)
        known = known | newly
    return filled.view_as(values)


def denormalize_prediction(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Undo the norm_pix target normalisation of `pred` [N, L, P].

    Visible patches use their own mean/variance; masked patches use estimates
    interpolated from the visible ones (their true statistics are hidden).
    """
    mean = target.mean(dim=-1)
    var = target.var(dim=-1)
    visible = mask == 0
    mean = fill_from_visible(mean, visible, grid)
    var = fill_from_visible(var, visible, grid)
    return pred * (var.unsqueeze(-1) + 1e-6).sqrt() + mean.unsqueeze(-1)


def to_display(images: torch.Tensor) -> torch.Tensor:
    """Normalised [N,3,H,W] -> [N,H,W,3] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def reconstruction_panels(model, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Run the MAE (in eval mode, without gradients) with a fixed mask; return the four panels."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _panels(model, images, seed)
    finally:
        model.train(was_training)


def _panels(model, images: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    images = images.float()
    patches = model.patchify(images)
    n, num_patches, _ = patches.shape
    grid = int(round(num_patches**0.5))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand(n, num_patches, generator=generator).to(images.device)
    # The parameters' dtype is what the model takes in (bf16 under DeepSpeed bf16).
    _, pred, mask = model(images.to(next(model.parameters()).dtype), noise=noise)
    pred = pred.float()
    if model.norm_pix_loss:
        pred = denormalize_prediction(pred, patches, mask, grid)
    keep = (1 - mask).unsqueeze(-1)
    grey = torch.full_like(patches, 0.0)  # 0 in normalised space is the dataset mean colour
    masked = patches * keep + grey * (1 - keep)
    pasted = patches * keep + pred * (1 - keep)
    panels = {
        "original": images,
        "masked": model.unpatchify(masked),
        "reconstruction": model.unpatchify(pred),
        "reconstruction + visible": model.unpatchify(pasted),
    }
    return {name: to_display(value) for name, value in panels.items()}


def save_reconstruction_figure(model, images: torch.Tensor, path: str | Path, seed: int = 0, title: str = "") -> Path:
    """Reconstruct `images` with a fixed mask and save the four-panel figure as PNG."""
    return draw_panels(reconstruction_panels(model, images, seed), path, title)


def draw_panels(panels: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Save a rows-of-images figure (one row per image, one column per panel) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    rows = panels[names[0]].shape[0]
    fig, axes = plt.subplots(rows, len(names), figsize=(2.0 * len(names), 2.0 * rows), squeeze=False)
    for r in range(rows):
        for c, name in enumerate(names):
            ax = axes[r][c]
            ax.imshow(panels[name][r].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- maescale visualize


def folder_images(folder: str, img_size: int, count: int) -> torch.Tensor:
    """The first `count` readable images (sorted by path) of a folder: flat, or with class subfolders."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not paths:
        raise DataError(f"--images {folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in it")
    transform = EvalTransform(img_size)
    images = []
    for path in paths:
        if len(images) == count:
            break
        try:
            images.append(transform(load_rgb(str(path))))
        except Exception as error:  # noqa: BLE001 - decoders raise many types on corrupt input
            logger.warning("unreadable image %s skipped: %s", path, error)
    if not images:
        raise DataError(f"--images {folder}: none of the images could be read")
    return torch.stack(images)


def visualize(
    cfg_path: str | None, overrides, *, ckpt: str, out: str, images: str | None, num_images: int, seed: int
) -> Path:
    """The figure of `num_images` images (the run's dataset, or `images`) reconstructed by checkpoint `ckpt`."""
    ckpt = Path(ckpt)
    cfg, model = load_run_model(ckpt, cfg_path, overrides)
    if images:
        batch = folder_images(images, model.img_size, num_images)
    else:
        batch = first_images(cfg.data, img_size=model.img_size, seed=cfg.seed, count=num_images)
    return save_reconstruction_figure(model, batch, out, seed=seed, title=f"{cfg.model.name}, {ckpt.name}")
