"""End-to-end fine-tuning (He et al. 2021, appendix A.1) on timm's VisionTransformer.

The pretrained encoder becomes a ViT classifier with global average pooling and fc_norm (the
final norm moves after the pooling, as in the paper), stochastic depth, a fresh head, and
the sin-cos position table of the `finetune.img_size` grid. AdamW with layer-wise lr decay
(timm's `param_groups_layer_decay`), mixup / cutmix with label smoothing (timm's `Mixup` and
`SoftTargetCrossEntropy`), lr = blr * global batch / 256, linear warmup then half-cosine.
The model is replicated with DDP through the pretraining seam (`parallel.prepare`).

Left out from the paper's recipe: RandAugment and random erasing (their timm versions draw from
the global random state, which the per-sample-seeded loader avoids), and the EMA of weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import parallel
from ..config import check_image_size
from ..data import Stream, build_loader, derive_seed
from ..interop import METADATA_FORMAT, METADATA_TIMM_KWARGS, build_timm_vit, save_safetensors, timm_kwargs
from ..models import MaskedAutoencoderViT, get_2d_sincos_pos_embed
from ..optim import lr_at, scaled_lr, set_lr
from ..sizes import image_hw, size_for_config
from .accuracy import as_percentages, topk_hits
from .config import EvalConfig
from .features import load_encoder
from .run import EvalRun

FINETUNED_FILE = "finetuned.safetensors"
# Weights the classifier has and the pretrained encoder does not (and the final norm it drops).
NEW_KEYS = frozenset({"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"})
DROPPED_KEYS = frozenset({"norm.weight", "norm.bias"})


def classifier_from_mae(
    mae: MaskedAutoencoderViT, classes: int, img_size: int | tuple[int, int] | None = None, drop_path: float = 0.0
) -> nn.Module:
    """timm ViT (global pool + fc_norm) holding `mae`'s encoder, at `img_size` (an int or (height, width);
    default: the MAE's)."""
    kwargs = timm_kwargs(mae)
    if img_size is not None:
        kwargs["img_size"] = size_for_config(image_hw(img_size))
    model = build_timm_vit(kwargs, num_classes=classes, global_pool="avg", fc_norm=True, drop_path_rate=drop_path)
    state = {k: v for k, v in mae.encoder_state_dict().items() if k not in DROPPED_KEYS}
    if tuple(state["pos_embed"].shape) != tuple(model.pos_embed.shape):
        # MAE's table is the fixed sin-cos function of the patch grid: fine-tuning starts from the one of
        # the new grid (then learns it, as the classifier's position embedding is trainable).
        grid = model.patch_embed.grid_size
        state["pos_embed"] = get_2d_sincos_pos_embed(mae.embed_dim, grid, cls_token=True).unsqueeze(0)
    result = model.load_state_dict(state, strict=False)
    if set(result.missing_keys) != NEW_KEYS or result.unexpected_keys:
        raise ValueError(
            f"encoder does not fit the classifier: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    nn.init.trunc_normal_(model.head.weight, std=2e-5)  # a near-zero head, as the reference recipe starts from
    nn.init.zeros_(model.head.bias)
    return model


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-decay groups: embeddings get layer_decay^(L+1), block i layer_decay^(L-i), the
    head 1; biases, norms, cls token and position embedding get no weight decay."""
    return param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=list(model.no_weight_decay()), layer_decay=layer_decay
    )


def build_mixup(cfg: EvalConfig, classes: int) -> Mixup | None:
    ft = cfg.finetune
    if ft.mixup == 0 and ft.cutmix == 0:
        return None
    return Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.label_smoothing, num_classes=classes)


class Finetuner:
    """The pieces of one fine-tuning run; `run()` trains, evaluates each epoch and saves the classifier."""

    def __init__(self, cfg: EvalConfig):
        self.cfg, ft = cfg, cfg.finetune
        self.run = EvalRun(cfg, "finetune")
        acc = self.run.accelerator
        mae = load_encoder(cfg.encoder, cfg.seed)
        check_image_size(ft.img_size, "finetune.img_size", mae.patch_size)
        self.img_size = mae.img_size if ft.img_size is None else image_hw(ft.img_size)
        self.loader = build_loader(cfg.data, img_size=self.img_size, in_chans=mae.in_chans, seed=cfg.seed,
                                   rank=acc.process_index, world_size=acc.num_processes, train=True,
                                   split=cfg.train_split)
        self.val_loader = build_loader(cfg.data, img_size=self.img_size, in_chans=mae.in_chans, seed=cfg.seed,
                                       rank=acc.process_index, world_size=acc.num_processes, train=False,
                                       split=cfg.val_split)
        self.classes = max(self.loader.num_classes, self.val_loader.num_classes)
        set_seed(cfg.seed)  # identical head and drop-path streams on every process
        model = classifier_from_mae(mae, self.classes, self.img_size, ft.drop_path).to(acc.device)
        self.timm_kwargs = {**timm_kwargs(mae), "img_size": size_for_config(self.img_size), "num_classes": self.classes,
                            "global_pool": "avg", "fc_norm": True}
        self.global_batch = cfg.data.batch_size * acc.num_processes
        self.peak_lr = scaled_lr(ft.blr, self.global_batch, ft.lr)
        optimizer = torch.optim.AdamW(
            layer_decay_groups(model, ft.weight_decay, ft.layer_decay), lr=self.peak_lr, betas=(0.9, 0.999)
        )
        self.model, self.optimizer = parallel.prepare(model, optimizer, self.run.layout, acc)
        self.mixup = build_mixup(cfg, self.classes)
        self.steps_per_epoch = self.loader.batches_per_epoch
        total = self.steps_per_epoch * ft.epochs
        self.last_step = min(total, ft.max_steps) if ft.max_steps else total

    def lr(self, step: int) -> float:
        ft = self.cfg.finetune
        return lr_at(step, peak=self.peak_lr, min_lr=ft.min_lr, steps_per_epoch=self.steps_per_epoch,
                     warmup_epochs=ft.warmup_epochs, epochs=ft.epochs)

    def loss(self, images: Tensor, labels: Tensor, step: int) -> Tensor:
        if self.mixup is None:
            return F.cross_entropy(self.model(images), labels, label_smoothing=self.cfg.finetune.label_smoothing)
        # timm's Mixup draws from numpy's global RNG: seed it per step (and rank) for reproducible runs.
        np.random.seed(derive_seed(self.cfg.seed, step, self.run.accelerator.process_index, Stream.MIXUP) % 2**32)
        images, targets = self.mixup(images, labels)
        return SoftTargetCrossEntropy()(self.model(images), targets)

    def train_step(self, batch, step: int) -> tuple[Tensor, float]:
        acc = self.run.accelerator
        lr = self.lr(step)
        set_lr(self.optimizer, lr)
        loss = self.loss(batch.images.to(acc.device), batch.labels.to(acc.device), step)
        acc.backward(loss)
        parallel.clip_gradients(self.model, self.cfg.finetune.clip_grad, acc)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), lr

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 / top-5 (percent) on the center-cropped `val_split`, summed over processes."""
        self.model.eval()
        counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
        for batch in self.val_loader.epoch(0):
            logits = self.model(batch.images.to(self.run.accelerator.device)).float().cpu()
            counts += torch.cat(
                [topk_hits(logits, batch.labels), torch.tensor([len(batch.labels)], dtype=torch.float64)]
            )
        self.model.train()
        if dist.is_initialized():
            dist.all_reduce(counts)
        return as_percentages(counts[:2], counts[2].item())

    def run_training(self) -> dict:
        cfg, ft, run = self.cfg, self.cfg.finetune, self.run
        run.save_config(
            {
                "lr": self.peak_lr,
                "global_batch": self.global_batch,
                "world_size": run.world_size,
                "steps_per_epoch": self.steps_per_epoch,
                "last_step": self.last_step,
                "img_size": size_for_config(self.img_size),
            }
        )
        run.print(
            f"finetune: {self.last_step} steps of {self.global_batch} at {self.img_size[0]}x{self.img_size[1]} px, "
            f"lr {self.peak_lr:.3g} "
            f"(blr {ft.blr:.3g} x {self.global_batch}/256), layer decay {ft.layer_decay}, {run.world_size} process(es)"
        )
        self.model.train()
        step, result, window = 0, {}, []
        bar = tqdm(total=self.last_step, desc="finetune", unit="step", disable=not run.is_main, dynamic_ncols=True)
        for epoch in range(ft.epochs):
            for batch in self.loader.epoch(epoch):
                loss, lr = self.train_step(batch, step)
                step += 1
                window.append(loss)
                bar.update(1)
                if step % ft.log_every == 0 or step == self.last_step:
                    loss_value = parallel.mean_across_processes(torch.stack(window).mean()).item()
                    run.log({"step": step, "epoch": step / self.steps_per_epoch, "loss": loss_value, "lr": lr})
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                    window = []
                if step == self.last_step:
                    break
            result = self.evaluate()
            run.log({"step": step, "epoch": step / self.steps_per_epoch, **result})
            if step == self.last_step:
                break
        bar.close()
        path = self.save()
        run.print(f"finetune {cfg.val_split}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  -> {path}")
        run.close()
        return {**result, "steps": step, "weights": path}

    def save(self) -> Path:
        """The classifier as timm weights, with the VisionTransformer arguments in the metadata."""
        path = self.run.output_dir / FINETUNED_FILE
        if self.run.is_main:
            model = parallel.unwrap(self.model, self.run.accelerator)
            save_safetensors(
                model.state_dict(), path, {METADATA_FORMAT: "timm", METADATA_TIMM_KWARGS: json.dumps(self.timm_kwargs)}
            )
        self.run.accelerator.wait_for_everyone()
        return path


def finetune(cfg: EvalConfig) -> dict:
    """`maescale finetune`: fine-tune the encoder end to end; returns the last top-1 / top-5."""
    return Finetuner(cfg).run_training()
