"""Reconstruction figures (original | masked | reconstruction | reconstruction + visible), during
training and from a saved checkpoint (`maescale visualize`).

Images of any channel count: three chosen channels are drawn as one RGB picture, any other
selection as grey rows, one per channel (`train.figure_channels`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .data import IMAGENET_MEAN, IMAGENET_STD, first_images
from .data.folder import FOLDER_EXTENSIONS, read_image
from .data.stats import channel_stats
from .data.transforms import EvalTransform
from .errors import DataError
from .interop import load_run_model
from .sizes import image_hw

logger = logging.getLogger(__name__)


def fill_from_visible(values: torch.Tensor, visible: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """Fill masked grid cells with the mean of the nearest visible cells.

    values, visible: [N, L] on a grid of (h, w) cells (an int for a square one), row-major;
    returns [N, L]. Repeated 3x3 normalised averaging grows the visible region until every
    cell has an estimate, so masked patches never use their own (hidden) pixels.
    """
    rows, cols = image_hw(grid, "grid")
    filled = values.reshape(-1, 1, rows, cols).float()
    known = visible.reshape(-1, 1, rows, cols)
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


def denormalize_prediction(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, grid: int | tuple[int, int]
) -> torch.Tensor:
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


@dataclass(frozen=True)
class FigureDisplay:
    """How normalised images become pictures: the per-channel statistics they were normalised
    with (undone first) and the channels shown (three: one RGB picture; otherwise grey rows)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: tuple[int, ...]


# Reconstructing ImageNet-normalised RGB images, the default of the figure functions.
IMAGENET_DISPLAY = FigureDisplay(IMAGENET_MEAN, IMAGENET_STD, (0, 1, 2))


def figure_display(data_cfg: Any, figure_channels: Sequence[int] | None, in_chans: int) -> FigureDisplay:
    """The display of a run's images: the statistics its loader normalises with, `train.figure_channels`."""
    stats = channel_stats(data_cfg, in_chans)
    return FigureDisplay(tuple(stats.mean), tuple(stats.std), shown_channels(figure_channels, in_chans))


def shown_channels(figure_channels: Sequence[int] | None, in_chans: int) -> tuple[int, ...]:
    """`train.figure_channels`, or its default: channels 0, 1, 2 as RGB, or every channel in grey when fewer."""
    if figure_channels is not None:
        return tuple(figure_channels)
    return (0, 1, 2) if in_chans >= 3 else tuple(range(in_chans))


def unnormalize(images: torch.Tensor, display: FigureDisplay) -> torch.Tensor:
    """[N, C, H, W] normalised -> the pixel values the loader read, channel by channel."""
    if images.shape[1] != len(display.mean):
        raise ValueError(f"{images.shape[1]}-channel images, but statistics of {len(display.mean)} channels")
    mean = torch.tensor(display.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(display.std, device=images.device).view(1, -1, 1, 1)
    return images.float() * std + mean


def display_range(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of [N, K, H, W] un-normalised pixels, the values drawn black and white, [1, K, 1, 1]
    each: 0 and 1 where the pixels lie in [0, 1] (pictures, unsigned-integer files), otherwise the
    channel's own range over these images (files of other units would show as flat black or white)."""
    low = pixels.amin(dim=(0, 2, 3), keepdim=True)
    high = pixels.amax(dim=(0, 2, 3), keepdim=True)
    unit = (low >= -_ROUNDING) & (high <= 1 + _ROUNDING)
    low = torch.where(unit, torch.zeros_like(low), low)
    high = torch.where(unit, torch.ones_like(high), torch.maximum(high, low + 1e-12))
    return low, high


# Undoing the normalisation can move a pixel of 0 or 1 by float rounding; still a [0, 1] image.
_ROUNDING = 1e-4


def to_display(
    images: torch.Tensor, display: FigureDisplay = IMAGENET_DISPLAY, value_range: tuple | None = None
) -> torch.Tensor:
    """Normalised [N, C, H, W] -> pictures in [0, 1]: [N, H, W, 3] for three shown channels (RGB),
    else [N * K, H, W, 3], each image's K shown channels as consecutive grey rows.

    `value_range` (from :func:`display_range`) fixes the black and white levels, so that every panel of a
    figure maps pixels alike; by default they come from `images` themselves.
    """
    pixels = unnormalize(images, display)[:, list(display.channels)]
    low, high = display_range(pixels) if value_range is None else value_range
    pictures = ((pixels - low) / (high - low)).clamp(0, 1)
    if len(display.channels) != 3:
        n, k, height, width = pictures.shape
        pictures = pictures.reshape(n * k, 1, height, width).expand(-1, 3, -1, -1)
    return pictures.permute(0, 2, 3, 1).cpu()


def reconstruction_panels(
    model, images: torch.Tensor, seed: int = 0, display: FigureDisplay = IMAGENET_DISPLAY
) -> dict[str, torch.Tensor]:
    """Run the MAE (in eval mode, without gradients) with a fixed mask; return the four panels.

    A compiled model runs this eagerly: without gradients it would compile a second graph, which
    costs as long as compiling the training step, for a handful of images.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            return _panels(model, images, seed, display)
    finally:
        model.train(was_training)


def _panels(model, images: torch.Tensor, seed: int, display: FigureDisplay) -> dict[str, torch.Tensor]:
    images = images.float()
    patches = model.patchify(images)
    n, num_patches, _ = patches.shape
    grid = model.grid_size
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
    # Black and white levels from the originals: the reconstruction is drawn on the same scale.
    value_range = display_range(unnormalize(images, display)[:, list(display.channels)])
    return {name: to_display(value, display, value_range) for name, value in panels.items()}


def save_reconstruction_figure(
    model, images: torch.Tensor, path: str | Path, seed: int = 0, title: str = "",
    display: FigureDisplay = IMAGENET_DISPLAY,
) -> Path:
    """Reconstruct `images` with a fixed mask and save the four-panel figure as PNG."""
    return draw_panels(reconstruction_panels(model, images, seed, display), path, title)


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


def folder_images(
    folder: str, img_size: int | tuple[int, int], count: int, display: FigureDisplay = IMAGENET_DISPLAY
) -> torch.Tensor:
    """The first `count` readable images (sorted by path) of a folder, flat or with class subfolders,
    center-cropped and normalised with `display`'s statistics (pictures for 3 channels, TIFF / .npy
    files of that many channels for any count)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in FOLDER_EXTENSIONS and not p.name.startswith(".")
    )
    if not paths:
        raise DataError(f"--images {folder}: no images ({', '.join(sorted(FOLDER_EXTENSIONS))}) in it")
    # No clipping: values read from files keep their units (pictures are uint8 and saturate anyway).
    transform = EvalTransform(img_size, mean=display.mean, std=display.std, clip=False)
    channels = len(display.mean)
    images = []
    for path in paths:
        if len(images) == count:
            break
        try:
            images.append(transform(read_image(str(path), channels)))
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
    display = figure_display(cfg.data, cfg.train.figure_channels, model.in_chans)
    if images:
        batch = folder_images(images, model.img_size, num_images, display)
    else:
        batch = first_images(
            cfg.data, img_size=model.img_size, in_chans=model.in_chans, seed=cfg.seed, count=num_images
        )
    return save_reconstruction_figure(
        model, batch, out, seed=seed, title=f"{cfg.model.name}, {ckpt.name}", display=display
    )
