"""Masked Autoencoder ViT (He et al. 2021, arXiv 2111.06377) and its named configurations.

Parameter names and layouts follow the reference MAE so that official checkpoints
load unchanged and the encoder part loads into ``timm``'s ``VisionTransformer``
with ``strict=True`` (see :meth:`MaskedAutoencoderViT.encoder_state_dict`).

Shape legend: ``N`` batch, ``C`` image channels, ``H, W`` image size, ``p`` patch
size, ``L`` number of patches, ``K`` number of kept (visible) patches, ``D``
encoder width, ``Dd`` decoder width.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..shards import full_shape
from ..sizes import image_hw
from .pos_embed import get_2d_sincos_pos_embed

__all__ = [
    "DECODER_KEY_PREFIXES",
    "MODEL_SPECS",
    "OVERRIDABLE_KEYS",
    "POSITION_TABLE_KEYS",
    "MaskedAutoencoderViT",
    "build_model",
    "is_encoder_key",
    "patchify",
    "random_masking",
    "unpatchify",
]

# --------------------------------------------------------------------------- registry

_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

MODEL_SPECS: dict[str, dict[str, Any]] = {
    # Fast unit tests.
    "mae_vit_micro_patch4": dict(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
    ),
    # CPU demo (CIFAR-sized images).
    "mae_vit_tiny_patch4": dict(
        img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0,
        decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4,
    ),
    # CIFAR-10 on a few CPU cores (configs/pretrain/cifar10_tiny.yaml): 6 blocks of width 128.
    "mae_vit_mini_patch4": dict(
        img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
    ),
    # Paper sizes.
    "mae_vit_base_patch16": dict(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
        **_PAPER_DECODER,
    ),
    "mae_vit_large_patch16": dict(
        img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
        **_PAPER_DECODER,
    ),
    "mae_vit_huge_patch14": dict(
        img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0,
        **_PAPER_DECODER,
    ),
    # ViT-g/14: MLP hidden 6144 = int(1408 * 48 / 11), as in timm's vit_giant_patch14_224.
    "mae_vit_giant_patch14": dict(
        img_size=224, patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11,
        **_PAPER_DECODER,
    ),
    # Web-SSL scaling family (Fan et al. 2025, "Scaling Language-Free Visual Representation
    # Learning", arXiv 2504.01017, Table 1): patch 14 at 224 px, MLP 4x width. The papers
    # publish no decoder for these MAEs, so they keep MAE's 512-d, 8-block decoder.
    "mae_vit_1b_patch14": dict(
        img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4.0,
        **_PAPER_DECODER,
    ),
    "mae_vit_2b_patch14": dict(
        img_size=224, patch_size=14, embed_dim=2688, depth=24, num_heads=21, mlp_ratio=4.0,
        **_PAPER_DECODER,
    ),
    "mae_vit_3b_patch14": dict(
        img_size=224, patch_size=14, embed_dim=3072, depth=26, num_heads=24, mlp_ratio=4.0,
        **_PAPER_DECODER,
    ),
    "mae_vit_5b_patch14": dict(
        img_size=224, patch_size=14, embed_dim=3584, depth=32, num_heads=28, mlp_ratio=4.0,
        **_PAPER_DECODER,
    ),
    # Also MAWS' 6.5B (Singh et al. 2023, arXiv 2303.13496, Table 1): the same 4096 / 32 / 32 shape.
    "mae_vit_7b_patch14": dict(
        img_size=224, patch_size=14, embed_dim=4096, depth=32, num_heads=32, mlp_ratio=4.0,
        **_PAPER_DECODER,
    ),
    # MAWS' ViT-2B (Singh et al. 2023, Table 1): 2560 / 24 blocks / 32 heads, MLP 10240.
    "mae_vit_maws_2b_patch14": dict(
        img_size=224, patch_size=14, embed_dim=2560, depth=24, num_heads=32, mlp_ratio=4.0,
        **_PAPER_DECODER,
    ),
}

# Keys of MODEL_SPECS entries that build_model lets the user change.
OVERRIDABLE_KEYS = frozenset({
    "img_size", "patch_size", "mask_ratio", "norm_pix_loss",
    "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "in_chans",
    "mask_tokens_in_encoder",
})

# A state-dict key belongs to the decoder iff one of its dotted parts starts with one
# of these; everything else is the encoder that timm's VisionTransformer can load.
DECODER_KEY_PREFIXES: tuple[str, ...] = ("decoder_", "mask_token")


# The frozen sin-cos position tables: functions of the patch grid, nothing learned.
POSITION_TABLE_KEYS: tuple[str, ...] = ("pos_embed", "decoder_pos_embed")


def is_encoder_key(key: str) -> bool:
    """True for state-dict keys of the encoder (robust to wrapper prefixes like ``module.``)."""
    return not any(part.startswith(DECODER_KEY_PREFIXES) for part in key.split("."))


def build_model(name: str, **overrides: Any) -> MaskedAutoencoderViT:
    """Build a registered model, e.g. ``build_model("mae_vit_base_patch16", mask_ratio=0.9)``.

    Overrides whose value is ``None`` are ignored, so config fields left unset can be
    passed straight through. Allowed override keys: :data:`OVERRIDABLE_KEYS`.
    """
    spec = _lookup_spec(name)
    unknown = sorted(set(overrides) - OVERRIDABLE_KEYS)
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for build_model({name!r}); "
            f"allowed: {sorted(OVERRIDABLE_KEYS)}"
        )
    kwargs = {**spec, **{k: v for k, v in overrides.items() if v is not None}}
    return MaskedAutoencoderViT(**kwargs)


def _lookup_spec(name: str) -> dict[str, Any]:
    if name in MODEL_SPECS:
        return MODEL_SPECS[name]
    close = difflib.get_close_matches(name, list(MODEL_SPECS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown model {name!r}.{hint} Valid names: {', '.join(sorted(MODEL_SPECS))}")


# --------------------------------------------------------------------------- tensor ops


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """Cut images into flattened patches.

    Args:
        imgs: ``[N, C, H, W]`` with ``H`` and ``W`` divisible by ``patch_size``.

    Returns:
        ``[N, (H/p) * (W/p), p * p * C]``; patches row-major, and inside each patch
        the order is (row-in-patch, column-in-patch, channel), as in the reference MAE.
    """
    n, c, height, width = imgs.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not divisible by patch size {p}")
    h, w = height // p, width // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [N, h, w, p, p, C]
    return x.reshape(n, h * w, p * p * c)


def unpatchify(
    patches: Tensor, patch_size: int, in_chans: int = 3, grid_size: int | tuple[int, int] | None = None
) -> Tensor:
    """Exact inverse of :func:`patchify`.

    Args:
        patches: ``[N, L, p * p * C]``.
        grid_size: the patch grid ``(h, w)`` with ``h * w = L`` (an int for a square one);
            ``None`` takes a square grid, so a rectangular one must be given.

    Returns:
        ``[N, C, h * p, w * p]``.
    """
    n, num_patches, patch_dim = patches.shape
    p, c = patch_size, in_chans
    if grid_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches are no square grid: pass grid_size=(h, w)")
        grid_size = side
    h, w = image_hw(grid_size, "grid_size")
    if h * w != num_patches:
        raise ValueError(f"grid_size={grid_size} holds {h * w} patches, got {num_patches}")
    if patch_dim != p * p * c:
        raise ValueError(f"patch vectors have {patch_dim} values, expected p*p*C = {p * p * c}")
    x = patches.reshape(n, h, w, p, p, c)
    x = x.permute(0, 5, 1, 3, 2, 4)  # [N, C, h, p, w, p]
    return x.reshape(n, c, h * p, w * p)


def random_masking(
    x: Tensor, mask_ratio: float, noise: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by sorting uniform noise (lowest noise is kept).

    Args:
        x: ``[N, L, D]`` tokens.
        mask_ratio: fraction of tokens to remove, in ``[0, 1)``.
        noise: optional ``[N, L]`` noise; defaults to ``U[0, 1)`` on ``x``'s device.

    Returns:
        x_masked: ``[N, K, D]`` kept tokens, ``K = int(L * (1 - mask_ratio))``.
        mask: ``[N, L]`` float32, 1 = removed, 0 = kept, in the original token order.
        ids_restore: ``[N, L]`` inverse permutation that undoes the shuffle.
    """
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if not 0 <= mask_ratio < 1 or len_keep < 1:
        raise ValueError(f"mask_ratio must be in [0, 1) and keep >= 1 of {length} tokens, got {mask_ratio}")
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")

    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    # expand() is a view, so the only copy is the gathered output itself.
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    # Token j sits at shuffled rank ids_restore[j]; it was removed iff that rank is
    # past len_keep. Same as "ones, zero the first len_keep, unshuffle", minus two copies.
    mask = (ids_restore >= len_keep).to(torch.float32)
    return x_masked, mask, ids_restore


# --------------------------------------------------------------------------- model

# LayerNorm with the reference eps, in every block and after the encoder and decoder.
_NORM_LAYER = partial(nn.LayerNorm, eps=1e-6)


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder + lightweight ViT decoder that reconstructs masked patches.

    Build from the registry with :func:`build_model`; the constructor takes the raw
    sizes. ``mlp_ratio`` applies to the encoder; the decoder always uses
    ``decoder_mlp_ratio`` (4 in the paper, also for ViT-g).

    ``mask_tokens_in_encoder=True`` builds the paper's "w/ [M] in encoder" baseline
    (He et al. 2021, Table 1c and the wall-clock comparison of section 3): removed patches
    are replaced by a learned mask token and the encoder sees all ``1 + L`` tokens. It exists
    to measure what encoding only the visible patches saves; MAE training uses the default.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        mask_ratio: float = 0.75,
        mask_tokens_in_encoder: bool = False,
    ) -> None:
        super().__init__()
        _validate_sizes(img_size, patch_size, in_chans, mask_ratio,
                        embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self._set_grid(img_size)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        # False, True (recompute each block in the backward pass instead of storing its
        # activations) or "selective" (store the matmul and attention outputs, recompute the
        # rest); set by the parallel layer, see maescale/parallel/construct.py.
        self.activation_checkpointing: bool | str = False
        self.mask_tokens_in_encoder = mask_tokens_in_encoder
        self.init_seed = _draw_init_seed()
        self._build_encoder(embed_dim, depth, num_heads, mlp_ratio)
        self._build_decoder(embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio)
        self.init_weights()

    def _build_encoder(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
        """Patch embedding, cls token, frozen position table, blocks and final norm (timm's names)."""
        self.patch_embed = PatchEmbed(self.img_size, self.patch_size, self.in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_NORM_LAYER) for _ in range(depth)
        )
        self.norm = _NORM_LAYER(embed_dim)
        if self.mask_tokens_in_encoder:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def _build_decoder(self, embed_dim: int, width: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
        """Projection to the decoder width, mask token, frozen position table, blocks, pixel head."""
        self.decoder_embed = nn.Linear(embed_dim, width, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, width), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_NORM_LAYER) for _ in range(depth)
        )
        self.decoder_norm = _NORM_LAYER(width)
        self.decoder_pred = nn.Linear(width, self.patch_size**2 * self.in_chans, bias=True)

    # ----------------------------------------------------------------------- init

    # Init lives in its own method because sharded training builds the model on the meta
    # device, shards it, materialises only the local shards (to_empty) and fills them
    # afterwards. Every parameter draws from its own random stream, seeded by (init_seed,
    # parameter name), so its value does not depend on how the model is cut or in which
    # order the pieces are filled: a sharded build holds, shard by shard, exactly what a
    # single-process build with the same seed holds.
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter in place with the reference MAE's distributions, from
        the streams of :meth:`initial_value`.

        Parameters still on the meta device, or partitioned away by DeepSpeed ZeRO-3 (filled by
        ``maescale.parallel`` one gathered parameter at a time), are left for later.
        """
        for name, param in self.named_parameters():
            if param.is_meta or hasattr(param, "ds_id"):
                continue
            if _is_plain_cpu_fp32(param):
                self._fill_initial(name, param)  # in place: no second full-size copy
            else:
                _copy_full_(param, self.initial_value(name))

    @torch.no_grad()
    def initial_value(self, name: str) -> Tensor:
        """The initial value of parameter ``name``, whole, float32, on the CPU: a pure function
        of ``(self.init_seed, name)``."""
        param = self.get_parameter(name)
        return self._fill_initial(name, torch.empty(full_shape(param), dtype=torch.float32, device="cpu"))

    def _fill_initial(self, name: str, out: Tensor) -> Tensor:
        """Write parameter ``name``'s initial value into ``out`` (its full shape) and return it."""
        generator = torch.Generator().manual_seed(_stream_seed(self.init_seed, name))
        owner, _, leaf = name.rpartition(".")
        module = self.get_submodule(owner)
        if leaf in ("pos_embed", "decoder_pos_embed"):  # frozen sin-cos tables, no randomness
            out.copy_(get_2d_sincos_pos_embed(out.shape[-1], self.grid_size, cls_token=True).unsqueeze(0))
        elif leaf in ("cls_token", "mask_token", "encoder_mask_token"):
            nn.init.normal_(out, std=0.02, generator=generator)
        elif owner == "patch_embed.proj" and leaf == "weight":
            # The conv as a Linear over flattened patches, like the reference.
            nn.init.xavier_uniform_(out.view(out.shape[0], -1), generator=generator)
        elif owner == "patch_embed.proj":
            # The reference keeps Conv2d's default bias init, U(+-1/sqrt(fan_in)); restated,
            # since a meta-built model never ran the default initialiser.
            bound = 1.0 / math.sqrt(self.in_chans * self.patch_size**2)
            nn.init.uniform_(out, -bound, bound, generator=generator)
        elif isinstance(module, nn.Linear) and leaf == "weight":
            nn.init.xavier_uniform_(out, generator=generator)
        elif isinstance(module, nn.LayerNorm) and leaf == "weight":
            out.fill_(1.0)
        elif isinstance(module, (nn.Linear, nn.LayerNorm)) and leaf == "bias":
            out.zero_()
        else:
            raise KeyError(f"no initialisation rule for parameter {name!r}")
        return out

    # ----------------------------------------------------------------------- patches

    def patchify(self, imgs: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, L, p*p*C]``; see module-level :func:`patchify`."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """``[N, L, p*p*C]`` -> ``[N, C, H, W]``; exact inverse of :meth:`patchify`."""
        return unpatchify(patches, self.patch_size, self.in_chans, self.grid_size)

    random_masking = staticmethod(random_masking)

    # ----------------------------------------------------------------------- input size

    def _set_grid(self, img_size: int | tuple[int, int]) -> None:
        """``img_size`` and ``grid_size`` as ``(height, width)`` pairs, and ``num_patches``."""
        self.img_size = image_hw(img_size)
        self.grid_size = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    @torch.no_grad()
    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Take images of another size from now on (evaluation or fine-tuning at another resolution).

        The learned weights do not depend on the grid; the position tables do, and since they
        are fixed sin-cos functions of it (not learned), they are recomputed for the new grid:
        the model then equals one built at ``img_size`` holding the same learned weights.
        Call it on an unsharded model, before any parallel wrapper.
        """
        _validate_grid(img_size, self.patch_size, self.mask_ratio)
        self._set_grid(img_size)
        self.patch_embed.set_input_size(img_size=self.img_size)
        for name in POSITION_TABLE_KEYS:
            old = getattr(self, name)
            table = get_2d_sincos_pos_embed(old.shape[-1], self.grid_size, cls_token=True,
                                            device=old.device, dtype=old.dtype)
            setattr(self, name, nn.Parameter(table.unsqueeze(0), requires_grad=False))

    # ----------------------------------------------------------------------- encoder

    def _embed_patches(self, imgs: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, L, D]`` patch tokens with position added."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:]

    def _prepend_cls(self, tokens: Tensor) -> Tensor:
        """``[N, K, D]`` -> ``[N, 1 + K, D]`` with the positioned cls token first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls.to(tokens.dtype), tokens], dim=1)

    def _encode(self, tokens: Tensor) -> Tensor:
        """Run the encoder blocks and final norm on ``[N, T, D]`` tokens."""
        for block in self.blocks:
            tokens = self._run_block(block, tokens)
        return self.norm(tokens)

    def _run_block(self, block: nn.Module, tokens: Tensor) -> Tensor:
        if not self.activation_checkpointing or not torch.is_grad_enabled():
            return block(tokens)
        if self.activation_checkpointing == "selective":
            return checkpoint(block, tokens, use_reentrant=False, context_fn=_keep_matmuls_and_attention)
        return checkpoint(block, tokens, use_reentrant=False)

    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible patches only.

        Returns:
            latent: ``[N, 1 + K, D]`` (cls first), mask: ``[N, L]`` (1 = removed),
            ids_restore: ``[N, L]``.
        """
        # Position is added before masking so each kept token remembers where it was.
        tokens, mask, ids_restore = random_masking(self._embed_patches(imgs), mask_ratio, noise)
        return self._encode(self._prepend_cls(tokens)), mask, ids_restore

    def forward_encoder_with_mask_tokens(
        self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The "w/ [M] in encoder" baseline: every patch is encoded, removed ones as the mask token.

        Returns:
            latent: ``[N, 1 + L, D]`` in the original patch order (cls first), mask: ``[N, L]``.
        """
        tokens = self._embed_patches(imgs)
        _, mask, _ = random_masking(tokens, mask_ratio, noise)
        # The mask token carries the position of the patch it stands for, as in the decoder.
        stand_ins = self.encoder_mask_token.to(tokens.dtype) + self.pos_embed[:, 1:].to(tokens.dtype)
        tokens = torch.where(mask.unsqueeze(-1).bool(), stand_ins, tokens)
        return self._encode(self._prepend_cls(tokens)), mask

    def forward_features(self, imgs: Tensor) -> Tensor:
        """Encode all patches without masking (evaluation / feature extraction).

        Returns:
            ``[N, 1 + L, D]`` after the final norm; equals timm's ``forward_features``.
        """
        return self._encode(self._prepend_cls(self._embed_patches(imgs)))

    # ----------------------------------------------------------------------- decoder

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Reconstruct every patch from the encoded visible tokens.

        Args:
            latent: ``[N, 1 + K, D]`` encoder output (cls first).
            ids_restore: ``[N, L]`` from :func:`random_masking`.

        Returns:
            ``[N, L, p*p*C]`` predicted pixels (cls dropped).
        """
        x = self.decoder_embed(latent)  # [N, 1 + K, Dd]
        n, num_patches = ids_restore.shape
        num_removed = num_patches + 1 - x.shape[1]
        if num_removed < 0:
            raise ValueError(f"latent has {x.shape[1] - 1} patch tokens but ids_restore only {num_patches}")
        mask_tokens = self.mask_token.to(x.dtype).expand(n, num_removed, -1)
        shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        patches = torch.gather(shuffled, 1, index)  # back to the original patch order
        return self._decode_tokens(torch.cat([x[:, :1], patches], dim=1))

    def _decode_tokens(self, x: Tensor) -> Tensor:
        """``[N, 1 + L, Dd]`` decoder tokens in patch order -> ``[N, L, p*p*C]`` predicted pixels."""
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = self._run_block(block, x)
        # Norm and pred act per token, so dropping cls first is equivalent and saves work.
        return self.decoder_pred(self.decoder_norm(x[:, 1:]))

    # ----------------------------------------------------------------------- loss

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error on the removed patches only.

        Args:
            imgs: ``[N, C, H, W]``; pred: ``[N, L, p*p*C]``; mask: ``[N, L]`` (1 = removed).

        Returns:
            scalar float32 loss.
        """
        # float32 so a bf16 autocast decoder does not make the loss itself lossy.
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            target = normalize_patches(target)
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [N, L]
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None, *, features_only: bool = False
    ) -> tuple[Tensor, Tensor, Tensor] | Tensor:
        """Full MAE step.

        Args:
            imgs: ``[N, C, H, W]``.
            mask_ratio: defaults to ``self.mask_ratio``.
            noise: optional ``[N, L]`` masking noise (for reproducibility).
            features_only: return :meth:`forward_features` instead; the way to encode whole
                images through a sharding wrapper (FSDP2, DeepSpeed), whose weight-gathering
                hooks run on ``forward`` only.

        Returns:
            loss (scalar), pred ``[N, L, p*p*C]``, mask ``[N, L]``.
        """
        if features_only:
            return self.forward_features(imgs)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if self.mask_tokens_in_encoder:
            latent, mask = self.forward_encoder_with_mask_tokens(imgs, ratio, noise)
            pred = self._decode_tokens(self.decoder_embed(latent))
        else:
            latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
            pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ----------------------------------------------------------------------- export

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """Encoder entries only: loads into timm ``VisionTransformer(num_classes=0)`` strictly."""
        return {k: v for k, v in self.state_dict().items() if is_encoder_key(k)}


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch standardisation for ``norm_pix_loss``: ``(t - mean) / sqrt(var + eps)``.

    Uses the unbiased variance (torch's default), as the reference does.
    ``patches``: ``[N, L, P]`` -> same shape.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


# --------------------------------------------------------------------------- helpers


# What selective activation checkpointing keeps of a block: the outputs of its matmuls and of
# attention, the ops whose recomputation costs (nearly all of a block's FLOPs). The norms,
# GELU, residual adds and reshapes are recomputed: cheap in FLOPs, and together they hold
# about half of a block's activations (docs/BENCHMARKS.md, "Activation checkpointing").
_KEPT_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)
)


def _keep_matmuls_and_attention():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _draw_init_seed() -> int:
    """The seed of a new model's per-parameter init streams, drawn from torch's global CPU
    generator: ``torch.manual_seed`` decides the weights, as it does for any torch model."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def _stream_seed(init_seed: int, name: str) -> int:
    """A 63-bit seed for one parameter's stream, the same in every process and Python run."""
    digest = hashlib.blake2b(f"{init_seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _is_plain_cpu_fp32(param: Tensor) -> bool:
    return not isinstance(param, DTensor) and param.device.type == "cpu" and param.dtype == torch.float32


def _copy_full_(param: Tensor, full: Tensor) -> None:
    """Copy a full-size tensor into ``param``, which may be an FSDP2-sharded DTensor."""
    if isinstance(param, DTensor):
        from torch.distributed.tensor import distribute_tensor

        # Every rank computes the same value, so each can slice its own shard:
        # src_data_rank=None skips the broadcast.
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def _validate_sizes(
    img_size: int | tuple[int, int], patch_size: int, in_chans: int, mask_ratio: float,
    embed_dim: int, depth: int, num_heads: int,
    decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int,
) -> None:
    for name, value in [("patch_size", patch_size), ("in_chans", in_chans),
                        ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads),
                        ("decoder_embed_dim", decoder_embed_dim), ("decoder_depth", decoder_depth),
                        ("decoder_num_heads", decoder_num_heads)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in the open interval (0, 1), got {mask_ratio}")
    _validate_grid(img_size, patch_size, mask_ratio)
    for prefix, dim, heads in [("", embed_dim, num_heads), ("decoder_", decoder_embed_dim, decoder_num_heads)]:
        if dim % heads != 0:
            raise ValueError(f"{prefix}embed_dim={dim} is not divisible by {prefix}num_heads={heads}")
        if dim % 4 != 0:
            raise ValueError(f"{prefix}embed_dim={dim} must be divisible by 4 for 2-D sin-cos position embeddings")


def _validate_grid(img_size: int | tuple[int, int], patch_size: int, mask_ratio: float) -> None:
    """An int or [H, W] image size, both sides divisible by the patch size, and at least one
    patch of the grid kept visible."""
    height, width = image_hw(img_size)
    if height % patch_size or width % patch_size:
        raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
    h, w = height // patch_size, width // patch_size
    if int(h * w * (1 - mask_ratio)) < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of a {h}x{w} grid")
