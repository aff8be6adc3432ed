"""Procedurally generated, labelled shape images: the built-in default dataset.

The images are smooth colour gradients with one to three geometric shapes on
top, so an MAE has real structure to reconstruct (edges, flat regions,
periodic textures) and a linear probe has a real label to predict. Image ``i``
is a pure function of ``(seed, i)``; nothing is stored on disk. Other channel
counts than RGB repeat R, G, B in turn (channel ``c`` is colour ``c % 3``), so
that the multi-channel pipeline runs without data files.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset

from ..sizes import image_hw
from .seeding import seeded_generator

SHAPES = ("disc", "rectangle", "triangle", "ring", "cross")
FILLS = ("solid", "patterned")
NUM_CLASSES = len(SHAPES) * len(FILLS)

# The canvas is larger than the training resolution so RandomResizedCrop has
# context to crop from, as with real photographs.
CANVAS_SCALE = 1.15

# Size (fraction of the canvas) and centre ranges. The labelled primary shape
# is big and central so that most random crops still show it.
PRIMARY_RADIUS, PRIMARY_CENTRE = (0.18, 0.32), (0.3, 0.7)
DISTRACTOR_RADIUS, DISTRACTOR_CENTRE = (0.07, 0.15), (0.1, 0.9)

# Uniform draws per image: 8 for the background and shape count, at most 18
# per shape (5 placement + 4 geometry + 9 fill), three shapes.
_DRAWS_PER_IMAGE = 8 + 3 * 18

Mask = torch.Tensor  # bool [S, S]


class SyntheticShapes(Dataset):
    """``size`` deterministic labelled images on a square canvas of about 1.15 * img_size
    (its longer side when a pair [height, width]).

    ``dataset[i]`` returns ``(image, label)``: a uint8 [channels, S, S] tensor (before
    augmentation) and an int in ``[0, NUM_CLASSES)``. The label is shape type x
    fill of the primary shape, which is the largest one and is drawn last so it
    is never occluded.
    """

    num_classes = NUM_CLASSES

    def __init__(self, size: int, img_size: int | tuple[int, int], seed: int = 0, channels: int = 3) -> None:
        if size <= 0:
            raise ValueError(f"synthetic dataset size must be positive, got {size}")
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        self.size = int(size)
        self.img_size = max(image_hw(img_size))
        self.seed = int(seed)
        self.channels = int(channels)
        self.canvas_size = max(self.img_size, round(self.img_size * CANVAS_SCALE))
        # Pixel-centre coordinates in [0, 1] as a column and a row: masks are
        # built by broadcasting, so most arithmetic touches S values, not S*S.
        coords = (torch.arange(self.canvas_size, dtype=torch.float32) + 0.5) / self.canvas_size
        self._ys = coords.view(-1, 1)
        self._xs = coords.view(1, -1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} synthetic images")
        return self.render(index)

    def render(self, index: int) -> tuple[torch.Tensor, int]:
        """Draw image ``index``; a pure function of ``(self.seed, index)``."""
        generator = seeded_generator(self.seed, index)
        draws = iter(torch.rand(_DRAWS_PER_IMAGE, generator=generator).tolist())
        canvas, background_colour = self._background(draws)
        num_distractors = min(2, int(next(draws) * 3))
        for _ in range(num_distractors):
            canvas, _ = self._draw_shape(canvas, draws, background_colour, DISTRACTOR_RADIUS, DISTRACTOR_CENTRE)
        canvas, label = self._draw_shape(canvas, draws, background_colour, PRIMARY_RADIUS, PRIMARY_CENTRE)
        image = canvas.mul_(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)
        if self.channels != 3:
            image = image[torch.arange(self.channels) % 3]
        return image, label

    def _background(self, draws: Iterator[float]) -> tuple[torch.Tensor, list[float]]:
        """A linear gradient between two nearby colours at a random angle."""
        start = [next(draws) for _ in range(3)]
        end = [min(1.0, max(0.0, c + 0.8 * (next(draws) - 0.5))) for c in start]
        angle = 2 * math.pi * next(draws)
        # Projection onto the gradient direction, rescaled to stay within [0, 1].
        along = (math.cos(angle) * (self._xs - 0.5) + math.sin(angle) * (self._ys - 0.5)) / math.sqrt(2) + 0.5
        start_t = torch.tensor(start).view(3, 1, 1)
        end_t = torch.tensor(end).view(3, 1, 1)
        canvas = start_t + (end_t - start_t) * along
        return canvas, start

    def _draw_shape(
        self,
        canvas: torch.Tensor,
        draws: Iterator[float],
        background_colour: list[float],
        radius_range: tuple[float, float],
        centre_range: tuple[float, float],
    ) -> tuple[torch.Tensor, int]:
        """Paint one random shape onto ``canvas``; return the new canvas and the shape's label."""
        shape_id = min(int(next(draws) * len(SHAPES)), len(SHAPES) - 1)
        patterned = next(draws) < 0.5
        radius = radius_range[0] + (radius_range[1] - radius_range[0]) * next(draws)
        low, high = centre_range
        cx = low + (high - low) * next(draws)
        cy = low + (high - low) * next(draws)
        mask = _MASK_BUILDERS[SHAPES[shape_id]](self, cx, cy, radius, draws)
        fill = self._fill(draws, background_colour, radius, patterned)
        return torch.where(mask, fill, canvas), shape_id * len(FILLS) + int(patterned)

    def _fill(
        self, draws: Iterator[float], background_colour: list[float], radius: float, patterned: bool
    ) -> torch.Tensor:
        """A solid colour [3, 1, 1] or a two-colour stripe/checker texture [3, S, S]."""
        colour = torch.tensor(_contrasting_colour(draws, background_colour)).view(3, 1, 1)
        if not patterned:
            return colour
        second = torch.tensor(_contrasting_colour(draws, background_colour)).view(3, 1, 1)
        # 2-4.5 periods across the shape: coarse enough to survive a 32 px crop.
        frequency = (2.0 + 2.5 * next(draws)) / (2 * radius)
        if next(draws) < 0.5:
            angle = math.pi * next(draws)
            phase = (math.cos(angle) * self._xs + math.sin(angle) * self._ys) * frequency
            pattern = torch.frac(phase) < 0.5
        else:
            pattern = (torch.floor(self._xs * frequency) + torch.floor(self._ys * frequency)) % 2 < 1
        return torch.where(pattern, colour, second)

    def _disc(self, cx: float, cy: float, radius: float, draws: Iterator[float]) -> Mask:
        return self._squared_distance(cx, cy) <= radius * radius

    def _ring(self, cx: float, cy: float, radius: float, draws: Iterator[float]) -> Mask:
        inner = radius * (0.45 + 0.25 * next(draws))
        squared = self._squared_distance(cx, cy)
        return (squared <= radius * radius) & (squared >= inner * inner)

    def _rectangle(self, cx: float, cy: float, radius: float, draws: Iterator[float]) -> Mask:
        # Aspect in [0.6, 1.6] keeps it recognisably different from the cross.
        aspect = 0.6 + next(draws)
        half_w = radius * math.sqrt(aspect) * 0.85
        half_h = radius / math.sqrt(aspect) * 0.85
        return ((self._xs - cx).abs() <= half_w) & ((self._ys - cy).abs() <= half_h)

    def _cross(self, cx: float, cy: float, radius: float, draws: Iterator[float]) -> Mask:
        arm = radius * (0.22 + 0.12 * next(draws))
        near_x = (self._xs - cx).abs()
        near_y = (self._ys - cy).abs()
        return ((near_x <= radius) & (near_y <= arm)) | ((near_x <= arm) & (near_y <= radius))

    def _triangle(self, cx: float, cy: float, radius: float, draws: Iterator[float]) -> Mask:
        """Inside = on the same side of all three edges of a jittered equilateral triangle."""
        start = 2 * math.pi * next(draws)
        angles = [start + 2 * math.pi * k / 3 + 0.5 * (next(draws) - 0.5) for k in range(3)]
        vertices = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]
        inside = None
        for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
            # Vertices go counter-clockwise, so interior points have cross >= 0.
            edge = (bx - ax) * (self._ys - ay) - (by - ay) * (self._xs - ax) >= 0
            inside = edge if inside is None else inside & edge
        return inside

    def _squared_distance(self, cx: float, cy: float) -> torch.Tensor:
        return (self._xs - cx).square() + (self._ys - cy).square()


_MASK_BUILDERS: dict[str, Callable[..., Mask]] = {
    "disc": SyntheticShapes._disc,
    "rectangle": SyntheticShapes._rectangle,
    "triangle": SyntheticShapes._triangle,
    "ring": SyntheticShapes._ring,
    "cross": SyntheticShapes._cross,
}


def _contrasting_colour(draws: Iterator[float], background_colour: list[float]) -> list[float]:
    """A random colour pushed darker on light backgrounds and lighter on dark ones.

    Guarantees luminance contrast so the primary shape (and its label) is visible.
    """
    colour = [next(draws) for _ in range(3)]
    if sum(background_colour) / 3 > 0.5:
        return [0.6 * c for c in colour]
    return [0.4 + 0.6 * c for c in colour]
