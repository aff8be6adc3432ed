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
import math
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .pos_embed import get_2d_sincos_pos_embed

__all__ = [
    "DECODER_KEY_PREFIXES",
    "MODEL_SPECS",
    "OVERRIDABLE_KEYS",
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


def unpatchify(patches: Tensor, patch_size: int, in_chans: int = 3) -> Tensor:
    """Exact inverse of :func:`patchify` for a square patch grid.

    Args:
        patches: ``[N, L, p * p * C]`` with ``L`` a perfect square.

    Returns:
        ``[N, C, H, W]`` with ``H = W = sqrt(L) * p``.
    """
    n, num_patches, patch_dim = patches.shape
    p, c = patch_size, in_chans
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"unpatchify needs a square patch grid, got {num_patches} patches")
    if patch_dim != p * p * c:
        raise ValueError(f"patch vectors have {patch_dim} values, expected p*p*C = {p * p * c}")
    x = patches.reshape(n, side, side, p, p, c)
    x = x.permute(0, 5, 1, 3, 2, 4)  # [N, C, h, p, w, p]
    return x.reshape(n, c, side * p, side * p)


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
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        # Recompute each block in the backward pass instead of storing its activations
        # (set by the parallel layer; see maescale/parallel.py).
        self.activation_checkpointing = False
        self.mask_tokens_in_encoder = mask_tokens_in_encoder
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

    # Init lives in its own method (not only in __init__) because sharded training
    # builds the model on the meta device, shards it, materialises it with
    # to_empty(), and only then calls init_weights() on the real (possibly DTensor)
    # parameters. Hence: no numpy, no .item(), nothing that reads tensor values.
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter in place, as the reference MAE does."""
        _copy_full_(self.pos_embed, self._sincos_table(self.pos_embed))
        _copy_full_(self.decoder_pos_embed, self._sincos_table(self.decoder_pos_embed))
        self._init_patch_embed()
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.mask_tokens_in_encoder:
            nn.init.normal_(self.encoder_mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _sincos_table(self, param: Tensor) -> Tensor:
        """``[1, 1 + L, width]`` sin-cos table matching ``param`` (built on its device)."""
        table = get_2d_sincos_pos_embed(param.shape[-1], self.grid_size, cls_token=True,
                                        device=param.device, dtype=param.dtype)
        return table.unsqueeze(0)

    def _init_patch_embed(self) -> None:
        proj = self.patch_embed.proj
        # Treat the conv as a Linear over flattened patches, like the reference.
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        # The reference keeps Conv2d's default bias init; restate it explicitly since
        # a meta-built model never ran the default initialiser.
        fan_in = proj.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(proj.bias, -bound, bound)

    # ----------------------------------------------------------------------- patches

    def patchify(self, imgs: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, L, p*p*C]``; see module-level :func:`patchify`."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """``[N, L, p*p*C]`` -> ``[N, C, H, W]``; exact inverse of :meth:`patchify`."""
        return unpatchify(patches, self.patch_size, self.in_chans)

    random_masking = staticmethod(random_masking)

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
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, tokens, use_reentrant=False)
        return block(tokens)

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


def _copy_full_(param: Tensor, full: Tensor) -> None:
    """Copy a full-size tensor into ``param``, which may be an FSDP2-sharded DTensor."""
    if not torch.distributed.is_available():  # some builds ship without distributed
        param.copy_(full)
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # Every rank computes the same table, so each can slice its own shard:
        # src_data_rank=None skips the broadcast.
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def _validate_sizes(
    img_size: int, patch_size: int, in_chans: int, mask_ratio: float,
    embed_dim: int, depth: int, num_heads: int,
    decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int,
) -> None:
    for name, value in [("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                        ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads),
                        ("decoder_embed_dim", decoder_embed_dim), ("decoder_depth", decoder_depth),
                        ("decoder_num_heads", decoder_num_heads)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if img_size % patch_size != 0:
        raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in the open interval (0, 1), got {mask_ratio}")
    if int((img_size // patch_size) ** 2 * (1 - mask_ratio)) < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of a {img_size // patch_size}^2 grid")
    for prefix, dim, heads in [("", embed_dim, num_heads), ("decoder_", decoder_embed_dim, decoder_num_heads)]:
        if dim % heads != 0:
            raise ValueError(f"{prefix}embed_dim={dim} is not divisible by {prefix}num_heads={heads}")
        if dim % 4 != 0:
            raise ValueError(f"{prefix}embed_dim={dim} must be divisible by 4 for 2-D sin-cos position embeddings")
