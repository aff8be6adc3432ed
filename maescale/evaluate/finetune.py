"""End-to-end fine-tuning (He et al. 2021, appendix A.1) on timm's VisionTransformer.

The pretrained encoder becomes a ViT classifier with global average pooling and fc_norm (the
final norm moves after the pooling, as in the paper), stochastic depth, a fresh head, and
the sin-cos position table of the `finetune.img_size` grid. AdamW with layer-wise lr decay
(timm's `param_groups_layer_decay`), mixup / cutmix with label smoothing (timm's `Mixup` and
`SoftTargetCrossEntropy`), lr = blr * global batch / 256, linear warmup then half-cosine, and an
optional EMA of the weights (`finetune.ema_decay`).

It resumes and shards like pretraining: a checkpoint every `checkpoint.every_steps` and at a stop
signal (the same atomic checkpoints), `checkpoint.resume=auto` continuing at the exact data
position with the same random draws (mixup and stochastic depth are seeded per step), and the
classifier wrapped or sharded by the Layout of the `parallel` section (ddp, fsdp2, hsdp: encoder
blocks in FSDP2 units of `parallel.blocks_per_unit`). `encoder.ckpt=null` fine-tunes from random
initialisation: the from-scratch baseline.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm.auto import tqdm

from .. import checkpoint, parallel
from ..config import check_image_size
from ..data import Stream, build_loader, derive_seed
from ..data.finetune_augment import FinetuneAugment
from ..interop import METADATA_FORMAT, METADATA_TIMM_KWARGS, build_timm_vit, save_safetensors, timm_kwargs
from ..layout import Layout
from ..models import MaskedAutoencoderViT, get_2d_sincos_pos_embed
from ..optim import LocalShardAdamW, lr_at, scaled_lr, set_lr
from ..shards import local_tensor
from ..sizes import image_hw, size_for_config
from ..train import StopRequest
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


class WeightAverage:
    """An exponential moving average of the weights, tensor for tensor like the parameters (sharded
    ones included), so it lives, is checkpointed and resumes like them."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        names, params = zip(*model.named_parameters())
        averages = [local_tensor(self.state[name]) for name in names]
        torch._foreach_lerp_(averages, [local_tensor(p.detach()) for p in params], 1 - self.decay)

    @contextmanager
    def swapped_in(self, model: nn.Module):
        """The model holds the average inside the block (to evaluate or save it), its weights after."""
        with torch.no_grad():
            named = model.named_parameters()
            params = [(local_tensor(p.detach()), local_tensor(self.state[name])) for name, p in named]
            kept = [weight.clone() for weight, _ in params]
            for weight, average in params:
                weight.copy_(average)
            try:
                yield
            finally:
                for (weight, _), value in zip(params, kept):
                    weight.copy_(value)


class Finetuner:
    """The pieces of one fine-tuning run; `run_training()` trains (resuming when it can), evaluates
    each epoch, checkpoints, and saves the classifier."""

    def __init__(self, cfg: EvalConfig, layout: Layout):
        self.cfg, ft = cfg, cfg.finetune
        self.run = EvalRun(cfg, "finetune", layout)
        acc = self.run.accelerator
        mae = load_encoder(cfg.encoder, cfg.seed)
        check_image_size(ft.img_size, "finetune.img_size", mae.patch_size)
        self.img_size = mae.img_size if ft.img_size is None else image_hw(ft.img_size)
        self.in_chans = mae.in_chans
        self.loader = build_loader(cfg.data, img_size=self.img_size, in_chans=mae.in_chans, seed=cfg.seed,
                                   rank=acc.process_index, world_size=acc.num_processes, train=True,
                                   split=cfg.train_split, augment=FinetuneAugment.from_config(ft))
        self.val_loader = build_loader(cfg.data, img_size=self.img_size, in_chans=mae.in_chans, seed=cfg.seed,
                                       rank=acc.process_index, world_size=acc.num_processes, train=False,
                                       split=cfg.val_split)
        self.classes = max(self.loader.num_classes, self.val_loader.num_classes)
        self.timm_kwargs = {**timm_kwargs(mae), "img_size": size_for_config(self.img_size), "num_classes": self.classes,
                            "global_pool": "avg", "fc_norm": True}
        self.global_batch = cfg.data.batch_size * acc.num_processes
        self.peak_lr = scaled_lr(ft.blr, self.global_batch, ft.lr)
        self.model, self.optimizer = self._build_model_and_optimizer(mae)
        self.ema = WeightAverage(self._module, ft.ema_decay) if ft.ema_decay else None
        self.mixup = build_mixup(cfg, self.classes)
        self.steps_per_epoch = self.loader.batches_per_epoch
        total = self.steps_per_epoch * ft.epochs
        self.last_step = min(total, ft.max_steps) if ft.max_steps else total
        self.val_steps = max_over_processes(self.val_loader.batches_per_epoch)
        self.ckpt_root = checkpoint.checkpoint_root(self.run.output_dir)

    def _build_model_and_optimizer(self, mae: MaskedAutoencoderViT):
        """The classifier, wrapped (DDP, a whole model) or sharded (FSDP2 units) by the layout, and
        AdamW stepping its local shards with layer-wise lr decay."""
        cfg, ft, layout, acc = self.cfg, self.cfg.finetune, self.run.layout, self.run.accelerator
        set_seed(cfg.seed)  # the same head on every process
        model = classifier_from_mae(mae, self.classes, self.img_size, ft.drop_path)
        model.set_grad_checkpointing(bool(cfg.parallel.activation_checkpointing))
        if layout.fsdp2_units:
            # Built whole in host memory (the encoder's weights are read there), then sharded onto the devices.
            options = parallel.FSDP2Options.of(layout, cfg.parallel)
            parallel.shard_fsdp2(model, layout.build_mesh(acc.device.type), options)
        else:
            model = model.to(acc.device)
        optimizer = LocalShardAdamW(layer_decay_groups(model, ft.weight_decay, ft.layer_decay), lr=self.peak_lr,
                                    betas=(0.9, ft.beta2))
        model, optimizer = parallel.prepare(model, optimizer, layout, acc)
        self.strategy = parallel.check_active(model, layout, acc)
        return model, optimizer

    @property
    def _module(self) -> nn.Module:
        return parallel.unwrap(self.model, self.run.accelerator)

    def lr(self, step: int) -> float:
        ft = self.cfg.finetune
        return lr_at(step, peak=self.peak_lr, min_lr=ft.min_lr, steps_per_epoch=self.steps_per_epoch,
                     warmup_epochs=ft.warmup_epochs, epochs=ft.epochs)

    def loss(self, images: Tensor, labels: Tensor, step: int) -> Tensor:
        # Stochastic depth draws from torch's global RNG, timm's Mixup from numpy's: both are seeded
        # per step (and rank), so a resumed run draws what the uninterrupted one did.
        rank = self.run.accelerator.process_index
        torch.manual_seed(derive_seed(self.cfg.seed, step, rank, Stream.DROP_PATH))
        if self.mixup is None:
            return F.cross_entropy(self.model(images), labels, label_smoothing=self.cfg.finetune.label_smoothing)
        np.random.seed(derive_seed(self.cfg.seed, step, rank, Stream.MIXUP) % 2**32)
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
        if self.ema is not None:
            self.ema.update(self._module)
        return loss.detach(), lr

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 / top-5 (percent) on the center-cropped `val_split` (of the EMA when kept), summed over
        processes. Every process runs `val_steps` forwards, a sharded model needs them all in each."""
        device = self.run.accelerator.device
        self.model.eval()
        counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
        batches = self.val_loader.epoch(0)
        with self.ema.swapped_in(self._module) if self.ema else nullcontext():
            for _ in range(self.val_steps):
                batch = next(batches, None)
                if batch is None:  # this process's share ended: keep the others' collectives company
                    self.model(torch.zeros(1, self.in_chans, *self.img_size, device=device))
                    continue
                logits = self.model(batch.images.to(device)).float().cpu()
                images = torch.tensor([len(batch.labels)], dtype=torch.float64)
                counts += torch.cat([topk_hits(logits, batch.labels), images])
        self.model.train()
        if dist.is_initialized():
            dist.all_reduce(counts)
        return as_percentages(counts[:2], counts[2].item())

    # ------------------------------------------------------------ checkpoints

    def _extra_state(self) -> dict[str, Tensor] | None:
        return {"ema": self.ema.state} if self.ema else None

    def save_checkpoint(self, step: int) -> Path:
        return self.run.save_checkpoint(self.model, self.optimizer, step, self.ckpt_root, self._extra_state())

    # ------------------------------------------------------------ loop

    def run_training(self, stop: StopRequest) -> dict:
        cfg, ft, run = self.cfg, self.cfg.finetune, self.run
        run.save_config({"lr": self.peak_lr, "global_batch": self.global_batch, "world_size": run.world_size,
                         "steps_per_epoch": self.steps_per_epoch, "last_step": self.last_step,
                         "img_size": size_for_config(self.img_size)})
        start = self.run.resume(self.model, self.optimizer, self.ckpt_root, self._extra_state())
        run.print(
            f"finetune: {self.last_step} steps of {self.global_batch} at {self.img_size[0]}x{self.img_size[1]} px, "
            f"lr {self.peak_lr:.3g} (blr {ft.blr:.3g} x {self.global_batch}/256), layer decay {ft.layer_decay}, "
            f"{self.strategy}"
        )
        step, stopped_by = self._loop(start, stop)
        result = {}
        if stopped_by is None:
            result = self._last_result
            if step % self.steps_per_epoch:  # the last step ends no epoch: evaluate it too
                result = self.evaluate()
                run.log({"step": step, "epoch": step / self.steps_per_epoch, **result})
            path = self.save()
            run.print(f"finetune {cfg.val_split}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  -> {path}")
        else:
            run.print(f"stopped by {stopped_by} at step {step}: run the same command again to resume")
        run.close()
        return {**result, "steps": step, "stopped_by": stopped_by,
                "weights": self.run.output_dir / FINETUNED_FILE if stopped_by is None else None}

    def _loop(self, step: int, stop: StopRequest) -> tuple[int, str | None]:
        """Train from `step` to the last step; the step reached and the signal that stopped it, if any."""
        ft, run, every = self.cfg.finetune, self.run, self.cfg.checkpoint.every_steps
        self.model.train()
        self._last_result = {}
        window = []
        bar = tqdm(initial=step, total=self.last_step, desc="finetune", unit="step", disable=not run.is_main,
                   dynamic_ncols=True)
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        while step < self.last_step:
            batches = self.loader.epoch(epoch, start_batch=in_epoch)
            for batch in batches:
                loss, lr = self.train_step(batch, step)
                step += 1
                window.append(loss)
                bar.update(1)
                if step % ft.log_every == 0 or step == self.last_step:
                    loss_value = parallel.mean_across_processes(torch.stack(window).mean()).item()
                    run.log({"step": step, "epoch": step / self.steps_per_epoch, "loss": loss_value, "lr": lr})
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                    window = []
                stopping = parallel.any_process(stop.requested)  # every process stops after the same step
                if step % every == 0 or step == self.last_step or stopping:
                    self.save_checkpoint(step)
                if stopping:
                    bar.close()
                    return step, stop.signal_name
                if step == self.last_step:
                    break
            if step % self.steps_per_epoch == 0:
                self._last_result = self.evaluate()
                run.log({"step": step, "epoch": step / self.steps_per_epoch, **self._last_result})
            epoch, in_epoch = epoch + 1, 0
        bar.close()
        return step, None

    def save(self) -> Path:
        """The classifier (its EMA when kept) as timm weights, with the VisionTransformer arguments in
        the metadata; gathered whole from a sharded model."""
        path = self.run.output_dir / FINETUNED_FILE
        with self.ema.swapped_in(self._module) if self.ema else nullcontext():
            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.run.is_main:
            save_safetensors(state, path, {METADATA_FORMAT: "timm", METADATA_TIMM_KWARGS: json.dumps(self.timm_kwargs)})
        self.run.accelerator.wait_for_everyone()
        return path


def max_over_processes(count: int) -> int:
    """The largest `count` of any process (`count` without a process group)."""
    if not dist.is_initialized():
        return count
    value = torch.tensor([count])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def finetune(cfg: EvalConfig) -> dict:
    """`maescale finetune`: fine-tune the encoder end to end (resuming from `output_dir`); returns the
    last top-1 / top-5, or the signal that stopped it after a checkpoint."""
    layout = parallel.launch_layout(cfg.parallel, cfg.finetune.precision)
    with StopRequest() as stop, parallel.process_group_for(layout, cfg.parallel.backend):
        return Finetuner(cfg, layout).run_training(stop)
