"""Image sizes given as one int (a square) or a pair [height, width]: the one parser of both spellings.

Kept free of heavy imports: the config checks use it before torch is loaded.
"""

from __future__ import annotations

from typing import Any, Sequence


def image_hw(size: int | Sequence[int], name: str = "img_size") -> tuple[int, int]:
    """``(height, width)`` of ``size``: an int ``s`` is ``(s, s)``, a pair ``[h, w]`` is ``(h, w)``.

    Anything else (a bool, a float, one or three numbers, a non-positive side) is a ValueError
    whose message starts with ``name``.
    """
    if _is_int(size):
        pair = (size, size)
    elif isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(side) for side in size):
        pair = (size[0], size[1])
    else:
        raise ValueError(f"{name} must be an int or a pair [height, width] of ints, got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return pair


def size_for_config(hw: tuple[int, int]) -> int | list[int]:
    """The config's spelling of ``(height, width)``: one int when square, else ``[height, width]``.

    Files written for square images (resolved configs, timm arguments) thus read as they always did.
    """
    height, width = hw
    return height if height == width else [height, width]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
