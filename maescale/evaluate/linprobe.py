"""Linear probing (He et al. 2021, section 4 and appendix A.2).

Frozen encoder; its cls token (or mean patch token) goes through BatchNorm without affine
parameters and one linear layer, trained with LARS at lr = blr * batch / 256, linear warmup
then half-cosine; evaluated on center crops. The default blr keeps the paper's budget on any data
size (`budget_blr`). With `linprobe.augment=false` the features of the
center-cropped training images are extracted once and the head trains on them.

Processes split the encoder work; the head (a few thousand parameters) then trains on the
full global batch on every process, so every process holds the same head and the result does
not depend on the number of processes. The frozen encoder is replicated: even a 7B encoder's bf16
weights (14 GB) fit one GPU for inference, so there is nothing to shard.

The head resumes like a training run: a checkpoint of head and LARS state every
`checkpoint.every_steps` and at a stop signal (in `output_dir/linprobe_checkpoints/`), and
`checkpoint.resume=auto` continues at the exact step (the paper's 90 augmented epochs on ImageNet
survive a requeue).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import Loader, Stream, build_loader, seeded_generator
from ..errors import ConfigError, DataError
from ..optim import lr_at, scaled_lr, set_lr
from ..parallel import any_process
from ..train import StopRequest
from .accuracy import topk_accuracy
from .config import EvalConfig
from .features import SplitFeatures, all_gather_cat, encode, eval_loader, load_encoder, split_features
from .lars import LARS
from .run import EvalRun

# The head's checkpoints, apart from those of a fine-tuning run in the same output_dir.
HEAD_CHECKPOINTS = "linprobe_checkpoints"


def build_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm without affine parameters (a per-feature whitening the linear layer can absorb)
    then a linear classifier initialised with std 0.01, as in the paper's protocol."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def check_head_batch(batch_size: int, train_images: int) -> None:
    if train_images < batch_size:
        raise DataError(f"linprobe.batch_size={batch_size} exceeds the {train_images} training images: lower it")


class CachedTrainFeatures:
    """Training batches drawn from features extracted once (no augmentation)."""

    def __init__(self, train: SplitFeatures, batch_size: int, seed: int):
        check_head_batch(batch_size, len(train.features))
        self.features, self.labels, self.num_classes = train
        self.batch_size, self.seed = batch_size, seed
        self.num_images = len(self.features)
        self.steps_per_epoch = len(self.features) // batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.features), generator=seeded_generator(self.seed, epoch, Stream.HEAD_ORDER))
        for step in range(start, self.steps_per_epoch):
            rows = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield self.features[rows], self.labels[rows]


class AugmentedTrainFeatures:
    """Training batches encoded at every step from RandomResizedCrop + flip crops; each process
    encodes its slice of the global batch and the features are gathered."""

    def __init__(self, loader: Loader, model, pool: str, device):
        self.loader, self.model, self.pool, self.device = loader, model, pool, device
        self.steps_per_epoch = loader.batches_per_epoch
        self.num_classes = loader.num_classes
        self.num_images = loader.num_samples

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.loader.epoch(epoch, start_batch=start):
            features = encode(self.model, batch.images.to(self.device), self.pool).cpu()
            yield all_gather_cat(features), all_gather_cat(batch.labels)


# The paper's probe: blr 0.1 for 90 epochs on ImageNet-1k's training images.
PAPER_BLR, PAPER_EPOCHS, PAPER_TRAIN_IMAGES = 0.1, 90, 1_281_167
# The largest peak lr of the default rule. Each LARS step moves the head by up to lr x 1e-3 / (1 - momentum)
# of its norm: 26% at 25.6, measured stable (CIFAR-10 in docs/RESULTS.md; 16 classes of 20 images); at lr 50
# the training loss spiked to 7x ln(classes), at 100 to 600x (the weight norm outgrows the features).
MAX_BUDGET_LR = 25.6


def budget_blr(train_images: int, epochs: int) -> float:
    """The blr that moves the head as far as the paper's probe did. LARS scales each step of the
    weight matrix to lr x 1e-3 of its norm, and lr = blr x batch / 256 over images x epochs / batch
    steps, so the whole run moves it by about blr x images x epochs / 256 x 1e-3 whatever the batch:
    the paper's blr on a small set leaves the head where it started. (`head_lr` caps the lr it gives.)"""
    return PAPER_BLR * PAPER_TRAIN_IMAGES * PAPER_EPOCHS / (train_images * epochs)


def head_lr(cfg: EvalConfig, train_images: int) -> tuple[float, str]:
    """The head's peak lr and how it was chosen (for the log line)."""
    lp = cfg.linprobe
    if lp.lr is not None:
        return lp.lr, "linprobe.lr"
    if lp.blr is not None:
        return scaled_lr(lp.blr, lp.batch_size), f"blr {lp.blr:.3g} x {lp.batch_size}/256"
    blr = budget_blr(train_images, lp.epochs)
    rule = (f"blr {blr:.3g} x {lp.batch_size}/256, blr = the paper's {PAPER_BLR} x {PAPER_TRAIN_IMAGES:,} images x "
            f"{PAPER_EPOCHS} epochs / ({train_images:,} images x {lp.epochs} epochs)")
    lr = scaled_lr(blr, lp.batch_size)
    if lr > MAX_BUDGET_LR:
        return MAX_BUDGET_LR, f"{rule} = {lr:.3g}, capped at {MAX_BUDGET_LR} for stable steps"
    return lr, rule


@torch.no_grad()
def evaluate_head(head: nn.Module, features: Tensor, labels: Tensor) -> dict[str, float]:
    head.eval()
    try:
        return topk_accuracy(head(features), labels)
    finally:
        head.train()


def linprobe(cfg: EvalConfig) -> dict:
    """Train and evaluate the linear head (resuming from `output_dir`); returns the final top-1 / top-5
    (percent), or the signal that stopped it after a checkpoint."""
    with StopRequest() as stop:
        return _linprobe(cfg, stop)


def _linprobe(cfg: EvalConfig, stop: StopRequest) -> dict:
    run = EvalRun(cfg, "linprobe")
    model = load_encoder(cfg.encoder, cfg.seed).to(run.accelerator.device)
    # Both loaders first: a bad split or a head batch larger than the split fails before any encoding.
    val_loader = eval_loader(cfg, model, cfg.val_split, run.accelerator)
    train_loader = train_images(cfg, model, run)
    check_head_batch(cfg.linprobe.batch_size, train_loader.num_samples)
    val = split_features(model, cfg, cfg.val_split, val_loader, run)
    train = _train_batches(cfg, model, train_loader, run)
    set_seed(cfg.seed)  # the same head on every process
    head = build_head(val.features.shape[1], max(train.num_classes, val.num_classes))
    result, steps, stopped_by = train_head(head, train, val, cfg, run, stop)
    if stopped_by is None:
        run.print(f"linprobe {cfg.val_split}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
                  f"({len(val.labels)} images)")
    else:
        run.print(f"stopped by {stopped_by} at step {steps}: run the same command again to resume")
    run.close()
    return {**result, "val_images": len(val.labels), "steps": steps, "head": head, "stopped_by": stopped_by}


def _train_batches(cfg: EvalConfig, model, loader: Loader, run: EvalRun):
    if cfg.linprobe.augment:
        return AugmentedTrainFeatures(loader, model, cfg.encoder.pool, run.accelerator.device)
    train = split_features(model, cfg, cfg.train_split, loader, run)
    return CachedTrainFeatures(train, cfg.linprobe.batch_size, cfg.seed)


def train_head(head: nn.Module, train, val: SplitFeatures, cfg: EvalConfig, run: EvalRun,
               stop: StopRequest | None = None) -> tuple[dict, int, str | None]:
    """LARS on the head, warmup + cosine per step, evaluated after each epoch, checkpointed every
    `checkpoint.every_steps` and at a stop signal, resumed from `output_dir` (`checkpoint.resume`);
    (last result, steps, the signal that stopped it or None)."""
    lp, every = cfg.linprobe, cfg.checkpoint.every_steps
    lr, lr_rule = head_lr(cfg, train.num_images)
    optimizer = LARS(head.parameters(), lr=lr, weight_decay=lp.weight_decay, momentum=lp.momentum)
    total = train.steps_per_epoch * lp.epochs
    run.save_config(
        {"lr": lr, "lr_rule": lr_rule, "world_size": run.world_size, "steps_per_epoch": train.steps_per_epoch,
         "total_steps": total}
    )
    run.print(
        f"linprobe: {total} steps of {lp.batch_size} "
        f"({'augmented crops' if lp.augment else 'features extracted once'}), "
        f"lr {lr:.3g} ({lr_rule}), LARS, {run.world_size} process(es)"
    )
    root = run.output_dir / HEAD_CHECKPOINTS
    step, result = run.resume(head, optimizer, root), {}
    first_epoch, start = divmod(step, train.steps_per_epoch)
    epochs = range(first_epoch, lp.epochs)
    for epoch in tqdm(epochs, desc="linprobe", unit="epoch", disable=not run.is_main, dynamic_ncols=True):
        losses = []
        for features, labels in train.epoch(epoch, start if epoch == first_epoch else 0):
            step_lr = lr_at(step, peak=lr, min_lr=lp.min_lr, steps_per_epoch=train.steps_per_epoch,
                            warmup_epochs=lp.warmup_epochs, epochs=lp.epochs)
            set_lr(optimizer, step_lr)
            loss = F.cross_entropy(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            step += 1
            stopping = stop is not None and any_process(stop.requested)
            if step % every == 0 or stopping:
                run.save_checkpoint(head, optimizer, step, root)
            if stopping:
                return result, step, stop.signal_name
        result = evaluate_head(head, val.features, val.labels)
        # After a resume inside an epoch, its mean loss is that of the steps after the resume.
        run.log({"step": step, "epoch": epoch + 1, "loss": torch.stack(losses).mean().item(), "lr": step_lr, **result})
    return result, step, None


def train_images(cfg: EvalConfig, model, run: EvalRun) -> Loader:
    """The training split: augmented crops, this process's slice of each global head batch, or
    (linprobe.augment=false) center crops to extract once."""
    if not cfg.linprobe.augment:
        return eval_loader(cfg, model, cfg.train_split, run.accelerator)
    batch_size, world = cfg.linprobe.batch_size, run.world_size
    if batch_size % world:
        raise ConfigError(f"linprobe.batch_size={batch_size} is not divisible by the {world} processes")
    data = replace(cfg.data, batch_size=batch_size // world)
    try:
        return build_loader(data, img_size=model.img_size, in_chans=model.in_chans, seed=cfg.seed,
                            rank=run.accelerator.process_index, world_size=world, train=True, split=cfg.train_split)
    except DataError as error:  # its data.batch_size is the head batch here
        raise DataError(f"linprobe.batch_size={batch_size} (linprobe.augment=true): {error}") from None
