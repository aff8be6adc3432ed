"""Variants of the training step side by side, timed in interleaved rounds in one process.

    python benchmarks/step_variants.py --models mae_vit_base_patch16 --batch-size 4 \\
        --variants maescale explicit_attention compile fused_adamw checkpointing straightforward

The first variant is the reference: "speedup" is its step time over each variant's, the
median of per-round ratios (rounds alternate the variants, so a machine whose load
changes affects all alike). Variants share one model's weights (see maescale/bench.py);
"straightforward" is the yardstick below: the same sizes written the plain way, in the
style of the original research code (every layer a small `nn.Module`, attention as an
explicit `softmax(q @ k^T / sqrt(d)) @ v`, masking by sorting noise and gathering, the mask
built as ones / zero / unshuffle, mask tokens appended and unshuffled for the decoder, fixed
2-D sin-cos position tables, the loss on the removed patches, torch's default AdamW). Same
FLOPs as maescale's model of the same name; only the implementation choices differ.
Prints a Markdown table; --jsonl appends one JSON object per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maescale.bench import COMPARE_HEADER, COMPARE_RULE, StepVariant, compare_row, compare_variants  # noqa: E402
from maescale.models import MODEL_SPECS, get_2d_sincos_pos_embed  # noqa: E402

# ------------------------------------------------------------------ the straightforward MAE


class PlainAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class PlainMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PlainBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PlainAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = PlainMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class StraightforwardMAE(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio,
                 decoder_embed_dim, decoder_depth, decoder_num_heads, in_chans=3, mask_ratio=0.75):
        super().__init__()
        self.patch_size, self.mask_ratio = patch_size, mask_ratio
        grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(embed_dim, grid, cls_token=True).unsqueeze(0))
        self.blocks = nn.ModuleList([PlainBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", get_2d_sincos_pos_embed(decoder_embed_dim, grid, cls_token=True).unsqueeze(0)
        )
        self.decoder_blocks = nn.ModuleList(
            [PlainBlock(decoder_embed_dim, decoder_num_heads, 4.0) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs):
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def random_masking(self, x):
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs):
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward(self, imgs):
        latent, mask, ids_restore = self.forward_encoder(imgs)
        pred = self.forward_decoder(latent, ids_restore)
        loss = ((pred - self.patchify(imgs)) ** 2).mean(dim=-1)
        loss = (loss * mask).sum() / mask.sum()
        return loss, pred, mask


def build_straightforward(model_name: str) -> StraightforwardMAE:
    """The straightforward model with the sizes of maescale's `model_name`."""
    spec = dict(MODEL_SPECS[model_name])
    spec.pop("decoder_mlp_ratio", None)
    return StraightforwardMAE(**spec)


def straightforward_step(model: nn.Module, images: torch.Tensor, optimizer_step: bool = True):
    """The plain training step: forward, backward, AdamW (torch's default implementation);
    `optimizer_step=False` stops after the backward pass."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95)
    )

    def step():
        loss, _, _ = model(images)
        optimizer.zero_grad()
        loss.backward()
        if optimizer_step:
            optimizer.step()
        return loss

    return step


# ------------------------------------------------------------------ the comparison

VARIANTS = {
    "maescale": StepVariant(),
    "mask_tokens_in_encoder": StepVariant(mask_tokens_in_encoder=True),
    "explicit_attention": StepVariant(attention="explicit"),
    "compile": StepVariant(compile=True),
    "fused_adamw": StepVariant(fused_adamw=True),
    "unfused_adamw": StepVariant(fused_adamw=False),
    "checkpointing": StepVariant(activation_checkpointing=True),
    "selective_checkpointing": StepVariant(activation_checkpointing="selective"),
    "compile_fused": StepVariant(compile=True, fused_adamw=True),
}
OTHERS = ("straightforward",)


def straightforward_factory(model_name: str, device: torch.device, optimizer_step: bool):
    def build(images: torch.Tensor):
        return straightforward_step(build_straightforward(model_name).to(device), images, optimizer_step)

    return build


def run(model: str, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = {
        name: replace(VARIANTS[name], optimizer_step=args.optimizer) for name in args.variants if name in VARIANTS
    }
    others = {name: straightforward_factory(model, device, args.optimizer) for name in args.variants if name in OTHERS}
    if args.variants[0] not in VARIANTS:
        raise SystemExit(f"the first (reference) variant must be one of {sorted(VARIANTS)}")
    return compare_variants(
        model, variants, others=others, batch_size=args.batch_size, precision=args.precision,
        rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup,
        device=args.device, clock=args.clock, log=lambda line: print(f"{model}: {line}", file=sys.stderr, flush=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mae_vit_base_patch16"])
    parser.add_argument("--variants", nargs="+", choices=[*VARIANTS, *OTHERS], default=["maescale", "straightforward"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-optimizer", dest="optimizer", action="store_false",
                        help="time forward + backward only (the per-image work; AdamW's per-step cost left out)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (use with OMP_NUM_THREADS=1 on a shared machine)")
    parser.add_argument("--jsonl", help="append each result as a JSON line to this file")
    args = parser.parse_args()
    print(COMPARE_HEADER)
    print(COMPARE_RULE)
    for model in args.models:
        for row in run(model, args):
            print(compare_row(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
