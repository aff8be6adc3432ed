"""Fixed 2-D sine-cosine position embeddings (MAE / MoCo v3 layout), in pure torch.

Layout for an ``h x w`` grid (``h`` rows, ``w`` columns) and width ``D`` (``D % 4 == 0``)::

    channels [0,      D/4)  sin(x * omega)     x = column index
    channels [D/4,    D/2)  cos(x * omega)
    channels [D/2,  3*D/4)  sin(y * omega)     y = row index
    channels [3*D/4,    D)  cos(y * omega)

with ``omega_i = 1 / 10000 ** (i / (D/4))`` for ``i = 0 .. D/4 - 1``. Tokens are
row-major (token ``y * w + x``), matching the order of ``PatchEmbed``'s flatten.
The column-first channel order reproduces the reference implementation, whose
``meshgrid`` puts the width axis first; checkpoints depend on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sizes import image_hw

__all__ = ["get_1d_sincos_pos_embed", "get_2d_sincos_pos_embed"]


def get_1d_sincos_pos_embed(embed_dim: int, positions: Tensor) -> Tensor:
    """Sine-cosine features of scalar positions.

    Args:
        embed_dim: output width, must be even.
        positions: ``[M]`` positions (any real dtype).

    Returns:
        ``[M, embed_dim]`` float64: ``[sin(pos * omega), cos(pos * omega)]``.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"1-D sin-cos embedding width must be even, got {embed_dim}")
    half = embed_dim // 2
    # float64 throughout so the table matches the reference bit-for-bit after the cast.
    omega = torch.arange(half, dtype=torch.float64, device=positions.device) / half
    omega = 1.0 / 10000.0**omega  # [D/2]
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # [M, D/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_size: int | tuple[int, int],
    cls_token: bool = False,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed 2-D sin-cos table for a patch grid.

    Args:
        embed_dim: token width ``D``; must be divisible by 4.
        grid_size: ``g`` for a square ``g x g`` grid, or ``(h, w)``: ``h`` rows, ``w`` columns.
        cls_token: prepend an all-zero row for the class token.
        device: where to build the table (``meta`` builds cost nothing).
        dtype: dtype of the returned table (math is done in float64).

    Returns:
        ``[h*w, D]``, or ``[1 + h*w, D]`` with ``cls_token=True``.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {embed_dim}")
    height, width = image_hw(grid_size, "grid_size")
    row_coords = torch.arange(height, dtype=torch.float64, device=device)
    col_coords = torch.arange(width, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(row_coords, col_coords, indexing="ij")  # rows[y, x] = y, cols[y, x] = x
    emb_cols = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))  # [h*w, D/2]
    emb_rows = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))  # [h*w, D/2]
    table = torch.cat([emb_cols, emb_rows], dim=1)  # column half first, see module docstring
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table], dim=0)
    return table.to(dtype)
