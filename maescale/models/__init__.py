"""MAE models: the masked autoencoder ViT, its registry and position embeddings."""

from .mae import (
    DECODER_KEY_PREFIXES,
    MODEL_SPECS,
    OVERRIDABLE_KEYS,
    POSITION_TABLE_KEYS,
    MaskedAutoencoderViT,
    build_model,
    is_encoder_key,
    normalize_patches,
    patchify,
    random_masking,
    unpatchify,
)
from .pos_embed import get_1d_sincos_pos_embed, get_2d_sincos_pos_embed

__all__ = [
    "DECODER_KEY_PREFIXES",
    "MODEL_SPECS",
    "OVERRIDABLE_KEYS",
    "POSITION_TABLE_KEYS",
    "MaskedAutoencoderViT",
    "build_model",
    "get_1d_sincos_pos_embed",
    "get_2d_sincos_pos_embed",
    "is_encoder_key",
    "normalize_patches",
    "patchify",
    "random_masking",
    "unpatchify",
]
