"""Tests for maescale.models: patching, masking, loss, position embeddings, init,
state-dict layout, timm interoperability, meta-device / FSDP2 initialisation."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from maescale.models import (
    MODEL_SPECS,
    MaskedAutoencoderViT,
    build_model,
    get_2d_sincos_pos_embed,
)
from maescale.models.mae import is_encoder_key, patchify, random_masking, unpatchify

MICRO = "mae_vit_micro_patch4"
PAPER_MODELS = {
    "mae_vit_base_patch16": "vit_base_patch16_224",
    "mae_vit_large_patch16": "vit_large_patch16_224",
    "mae_vit_huge_patch14": "vit_huge_patch14_224",
    "mae_vit_giant_patch14": "vit_giant_patch14_224",
}
# Paper widths (ViT-B sized) but shallow, so init statistics are meaningful yet cheap.
SHALLOW_BASE = {**MODEL_SPECS["mae_vit_base_patch16"], "depth": 2, "decoder_depth": 1}


@pytest.fixture
def micro() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return build_model(MICRO)


def coded_image(channels: int, size: int) -> torch.Tensor:
    """[1, C, S, S] image whose pixel (c, y, x) holds the value c*10000 + y*100 + x."""
    c = torch.arange(channels).view(-1, 1, 1) * 10000
    y = torch.arange(size).view(1, -1, 1) * 100
    x = torch.arange(size).view(1, 1, -1)
    return (c + y + x).unsqueeze(0).float()


# --------------------------------------------------------------------------- patchify


def test_patchify_inner_order_is_row_col_channel():
    p, size, channels = 4, 8, 3
    patches = patchify(coded_image(channels, size), p)
    assert patches.shape == (1, 4, p * p * channels)
    for patch_row in range(2):
        for patch_col in range(2):
            vector = patches[0, patch_row * 2 + patch_col]
            for dy in range(p):
                for dx in range(p):
                    for c in range(channels):
                        expected = c * 10000 + (patch_row * p + dy) * 100 + patch_col * p + dx
                        assert vector[(dy * p + dx) * channels + c] == expected


def test_unpatchify_is_exact_inverse(micro):
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(micro.unpatchify(micro.patchify(imgs)), imgs)
    patches = torch.randn(2, 64, 48)
    assert torch.equal(micro.patchify(micro.unpatchify(patches)), patches)
    assert torch.equal(unpatchify(patchify(coded_image(1, 8), 2), 2, 1), coded_image(1, 8))


def test_patchify_rejects_indivisible_image():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 30, 32), 4)


# --------------------------------------------------------------------------- masking


def test_random_masking_invariants():
    torch.manual_seed(1)
    n, length, dim, ratio = 3, 16, 5, 0.75
    x = torch.randn(n, length, dim)
    noise = torch.rand(n, length)
    x_masked, mask, ids_restore = random_masking(x, ratio, noise)
    keep = int(length * (1 - ratio))

    assert x_masked.shape == (n, keep, dim)
    assert mask.shape == ids_restore.shape == (n, length)
    assert torch.equal(mask.sum(dim=1), torch.full((n,), float(length - keep)))
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(length).expand(n, -1))
    kept_ids = ids_shuffle[:, :keep]
    for i in range(n):
        assert torch.equal(x_masked[i], x[i, kept_ids[i]])
        assert torch.all(mask[i, kept_ids[i]] == 0)
    again = random_masking(x, ratio, noise.clone())
    for first, second in zip((x_masked, mask, ids_restore), again):
        assert torch.equal(first, second)


def test_mask_is_in_original_token_order():
    n, length, ratio = 2, 16, 0.75
    keep = int(length * (1 - ratio))
    x = torch.randn(n, length, 3)
    noise = torch.arange(length, dtype=torch.float32).expand(n, -1)  # lowest ids are kept
    x_masked, mask, ids_restore = random_masking(x, ratio, noise)
    expected_mask = torch.cat([torch.zeros(keep), torch.ones(length - keep)]).expand(n, -1)
    assert torch.equal(mask, expected_mask)
    assert torch.equal(x_masked, x[:, :keep])
    assert torch.equal(ids_restore, torch.arange(length).expand(n, -1))
    # Reversed noise keeps the last tokens, and the mask follows them.
    _, mask_rev, _ = random_masking(x, ratio, noise.flip(1))
    assert torch.equal(mask_rev, expected_mask.flip(1))


def test_random_masking_rejects_bad_inputs():
    x = torch.randn(2, 16, 3)
    with pytest.raises(ValueError, match="noise"):
        random_masking(x, 0.5, torch.rand(2, 15))
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(x, 1.0)


# --------------------------------------------------------------------------- decoder and loss


def test_decoder_restores_original_token_order(micro):
    imgs = torch.randn(2, 3, 32, 32)
    latent, mask, ids_restore = micro.forward_encoder(imgs, 0.75)
    captured = {}
    micro.decoder_blocks[0].register_forward_pre_hook(lambda _, args: captured.setdefault("x", args[0]))
    micro.forward_decoder(latent, ids_restore)
    tokens = captured["x"] - micro.decoder_pos_embed  # [N, 1+L, Dd] without positions
    embedded = micro.decoder_embed(latent)  # [N, 1+K, Dd], kept tokens in shuffled order
    keep = latent.shape[1] - 1
    torch.testing.assert_close(tokens[:, 0], embedded[:, 0])
    for i in range(2):
        for token in range(micro.num_patches):
            rank = ids_restore[i, token]
            expected = embedded[i, 1 + rank] if rank < keep else micro.mask_token[0, 0]
            assert bool(mask[i, token]) == bool(rank >= keep)
            torch.testing.assert_close(tokens[i, 1 + token], expected)


def test_loss_only_counts_masked_patches(micro):
    torch.manual_seed(2)
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = micro(imgs)
    visible = (mask[0] == 0).nonzero()[0, 0]
    removed = (mask[0] == 1).nonzero()[0, 0]
    pred_visible = pred.detach().clone()
    pred_visible[0, visible] += 100.0
    assert torch.equal(micro.forward_loss(imgs, pred_visible, mask), loss.detach())
    pred_removed = pred.detach().clone()
    pred_removed[0, removed] += 100.0
    assert micro.forward_loss(imgs, pred_removed, mask) > loss.detach() + 1.0


def test_loss_value_is_masked_mean_of_patch_mse(micro):
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 64, 48)
    mask = (torch.rand(2, 64) < 0.7).float()
    target = micro.patchify(imgs)
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    expected = per_patch[mask.bool()].mean()
    torch.testing.assert_close(micro.forward_loss(imgs, pred, mask), expected)


def test_norm_pix_target_uses_unbiased_variance():
    model = build_model(MICRO, norm_pix_loss=True)
    imgs = torch.rand(1, 3, 32, 32) * 3
    pred = torch.zeros(1, 64, 48)
    mask = torch.zeros(1, 64)
    mask[0, 5] = 1.0
    patch = [float(v) for v in model.patchify(imgs)[0, 5]]
    mean = sum(patch) / len(patch)
    squares = sum((v - mean) ** 2 for v in patch)
    unbiased_target = [(v - mean) / math.sqrt(squares / (len(patch) - 1) + 1e-6) for v in patch]
    expected = sum(t * t for t in unbiased_target) / len(patch)  # MSE against pred = 0
    biased = sum(((v - mean) / math.sqrt(squares / len(patch) + 1e-6)) ** 2 for v in patch) / len(patch)
    assert abs(expected - biased) > 1e-3  # the two conventions are distinguishable here
    loss = model.forward_loss(imgs, pred, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- position embeddings


def test_sincos_pos_embed_values_by_hand():
    dim, grid = 16, 3
    table = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert table.shape == (1 + grid * grid, dim)
    assert table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(dim))
    quarter = dim // 4
    for y, x in [(0, 1), (1, 0), (2, 1), (1, 2), (2, 2)]:
        row = table[1 + y * grid + x]  # row-major tokens
        for i in range(quarter):
            omega = 1.0 / 10000 ** (i / quarter)
            assert row[i].item() == pytest.approx(math.sin(x * omega), abs=1e-6)  # column first
            assert row[quarter + i].item() == pytest.approx(math.cos(x * omega), abs=1e-6)
            assert row[2 * quarter + i].item() == pytest.approx(math.sin(y * omega), abs=1e-6)
            assert row[3 * quarter + i].item() == pytest.approx(math.cos(y * omega), abs=1e-6)
    assert torch.equal(get_2d_sincos_pos_embed(dim, grid), table[1:])


def test_sincos_pos_embed_rejects_width_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(18, 3)


# --------------------------------------------------------------------------- init


def assert_reference_init(model: MaskedAutoencoderViT) -> None:
    """Check every parameter against the reference MAE initialisation."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            assert_uniform(module.weight, math.sqrt(6 / (fan_in + fan_out)), name)
            assert torch.all(module.bias == 0), name
        elif isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    proj = model.patch_embed.proj
    fan_out, fan_in = proj.weight.shape[0], proj.weight[0].numel()  # xavier on the (D, -1) view
    assert_uniform(proj.weight, math.sqrt(6 / (fan_in + fan_out)), "patch_embed.proj.weight")
    assert proj.bias.abs().max() <= 1 / math.sqrt(fan_in)  # Conv2d default, as in the reference
    for token in (model.cls_token, model.mask_token):
        assert token.mean().abs() < 0.005
        assert token.std().item() == pytest.approx(0.02, rel=0.15)
    grid = model.grid_size
    for table in (model.pos_embed, model.decoder_pos_embed):
        expected = get_2d_sincos_pos_embed(table.shape[-1], grid, cls_token=True).unsqueeze(0)
        assert torch.equal(table, expected)
        assert not table.requires_grad


def assert_uniform(weight: torch.Tensor, bound: float, name: str) -> None:
    """weight looks like U(-bound, bound): inside the bound, filling it, right std."""
    assert torch.isfinite(weight).all(), name
    assert weight.abs().max() <= bound * (1 + 1e-6), name
    assert weight.abs().max() >= 0.95 * bound, name
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name


def test_init_matches_reference_statistics():
    torch.manual_seed(3)
    assert_reference_init(MaskedAutoencoderViT(**SHALLOW_BASE))


def test_every_layer_norm_uses_eps_1e_6(micro):
    norms = [m for m in micro.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * (2 + 1) + 2  # two per block, plus the two final norms
    assert all(norm.eps == 1e-6 for norm in norms)


def test_meta_build_then_init_weights_matches_normal_build():
    torch.manual_seed(4)
    normal = MaskedAutoencoderViT(**SHALLOW_BASE)
    with torch.device("meta"):
        model = MaskedAutoencoderViT(**SHALLOW_BASE)
    assert model.pos_embed.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_reference_init(model)
    assert torch.equal(model.pos_embed, normal.pos_embed)
    assert torch.equal(model.decoder_pos_embed, normal.decoder_pos_embed)


# Expected on a CPU mesh / with a 3-D Linear output; irrelevant to what is tested.
@pytest.mark.filterwarnings("ignore:DTensor random operators:UserWarning")
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module:UserWarning")
def test_init_weights_works_on_fsdp2_sharded_model(tmp_path):
    """The FSDP flow: meta build -> fully_shard -> to_empty -> init_weights (DTensor params)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = build_model(MICRO)
        for block in [*model.blocks, *model.decoder_blocks]:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device="cpu")
        model.init_weights()
        assert isinstance(model.pos_embed, DTensor)
        expected = get_2d_sincos_pos_embed(64, 8, cls_token=True).unsqueeze(0)
        assert torch.equal(model.pos_embed.full_tensor(), expected)
        assert all(torch.isfinite(p.full_tensor()).all() for p in model.parameters())
        loss, _, _ = model(torch.randn(2, 3, 32, 32))
        loss.backward()
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- state dict


def expected_state_dict_keys(spec: dict) -> set[str]:
    """The reference MAE key set for a registry spec."""
    keys = {
        "patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
        "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token",
        "decoder_pos_embed", "decoder_norm.weight", "decoder_norm.bias",
        "decoder_pred.weight", "decoder_pred.bias",
    }
    block_keys = [f"{layer}.{kind}" for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                  for kind in ("weight", "bias")]
    keys |= {f"blocks.{i}.{k}" for i in range(spec["depth"]) for k in block_keys}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(spec["decoder_depth"]) for k in block_keys}
    return keys


EXPECTED_SHAPES = {
    "mae_vit_base_patch16": {
        "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
        "blocks.11.attn.qkv.weight": (2304, 768), "blocks.11.mlp.fc1.weight": (3072, 768),
        "decoder_embed.weight": (512, 768), "decoder_pos_embed": (1, 197, 512),
        "decoder_pred.weight": (768, 512),
    },
    "mae_vit_large_patch16": {
        "pos_embed": (1, 197, 1024), "blocks.23.mlp.fc1.weight": (4096, 1024),
        "blocks.23.attn.proj.weight": (1024, 1024), "decoder_embed.weight": (512, 1024),
        "decoder_blocks.7.mlp.fc1.weight": (2048, 512), "decoder_pred.weight": (768, 512),
    },
    "mae_vit_huge_patch14": {
        "pos_embed": (1, 257, 1280), "patch_embed.proj.weight": (1280, 3, 14, 14),
        "blocks.31.mlp.fc1.weight": (5120, 1280), "decoder_pos_embed": (1, 257, 512),
        "decoder_pred.weight": (588, 512), "mask_token": (1, 1, 512),
    },
    "mae_vit_giant_patch14": {
        "pos_embed": (1, 257, 1408), "blocks.39.mlp.fc1.weight": (6144, 1408),
        "blocks.39.mlp.fc2.weight": (1408, 6144), "blocks.39.attn.qkv.weight": (4224, 1408),
        "decoder_blocks.7.mlp.fc1.weight": (2048, 512), "decoder_pred.weight": (588, 512),
    },
}


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_state_dict_keys_and_shapes_on_meta(name):
    with torch.device("meta"):
        model = build_model(name)
    state = model.state_dict()
    assert set(state) == expected_state_dict_keys(MODEL_SPECS[name])
    assert list(model.buffers()) == []
    for key, shape in EXPECTED_SHAPES[name].items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_encoder_state_dict_loads_strictly_into_timm(name):
    with torch.device("meta"):
        model = build_model(name)
        vit = timm.create_model(PAPER_MODELS[name], pretrained=False, num_classes=0)
    encoder_state = model.encoder_state_dict()
    assert not any(k.startswith(("decoder_", "mask_token")) for k in encoder_state)
    vit.load_state_dict(encoder_state, strict=True, assign=True)


def test_is_encoder_key_handles_wrapper_prefixes():
    assert is_encoder_key("blocks.0.attn.qkv.weight")
    assert is_encoder_key("module.pos_embed")
    assert not is_encoder_key("module.decoder_blocks.0.norm1.weight")
    assert not is_encoder_key("_orig_mod.mask_token")


def test_forward_features_match_timm(micro):
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=0)
    vit.load_state_dict(micro.encoder_state_dict(), strict=True)
    micro.eval()
    vit.eval()
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = micro.forward_features(imgs)
        theirs = vit.forward_features(imgs)
    assert ours.shape == (3, 65, 64)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_forward_features_equals_unmasked_encoder(micro):
    imgs = torch.randn(2, 3, 32, 32)
    identity_order = torch.arange(64, dtype=torch.float32).expand(2, -1)
    latent, mask, _ = micro.forward_encoder(imgs, 0.0, noise=identity_order)
    assert mask.sum() == 0
    torch.testing.assert_close(latent, micro.forward_features(imgs))


# --------------------------------------------------------------------------- build_model


def test_build_model_suggests_closest_name():
    with pytest.raises(ValueError, match="mae_vit_base_patch16") as info:
        build_model("mae_vit_base_patch15")
    assert "Did you mean" in str(info.value)


def test_build_model_rejects_unknown_override():
    with pytest.raises(ValueError, match="depth"):
        build_model(MICRO, depth=3)


def test_build_model_rejects_indivisible_image():
    with pytest.raises(ValueError, match=r"img_size=30.*patch_size=4"):
        build_model(MICRO, img_size=30)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_build_model_rejects_mask_ratio_outside_open_interval(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        build_model(MICRO, mask_ratio=ratio)


def test_build_model_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match="decoder_num_heads=5"):
        build_model(MICRO, decoder_num_heads=5)


def test_build_model_applies_overrides_and_ignores_none():
    model = build_model(MICRO, mask_ratio=None, img_size=16, in_chans=1, decoder_embed_dim=48)
    assert model.mask_ratio == MODEL_SPECS[MICRO].get("mask_ratio", 0.75)
    assert model.pos_embed.shape == (1, 17, 64)
    assert model.decoder_pred.weight.shape == (16, 48)
    loss, pred, mask = model(torch.randn(2, 1, 16, 16), mask_ratio=0.5)
    assert pred.shape == (2, 16, 16) and mask.sum(dim=1).tolist() == [8.0, 8.0]
    assert build_model(MICRO, mask_ratio=0.6).mask_ratio == 0.6


# --------------------------------------------------------------------------- training step


def test_forward_backward_reaches_every_trainable_parameter(micro):
    loss, pred, mask = micro(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(loss)
    assert pred.shape == (2, 64, 48)
    assert mask.sum(dim=1).tolist() == [48.0, 48.0]  # default mask_ratio 0.75
    loss.backward()
    for name, param in micro.named_parameters():
        if name in ("pos_embed", "decoder_pos_embed"):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name
