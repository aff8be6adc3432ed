"""kNN accuracy of the encoder while it pretrains: a cheap sign that the representation improves.

Every `monitor.knn_every` steps the trainer's own model (sharded or not) encodes the center
crops of fixed, evenly spaced samples of two labelled splits, and each held-out image is
classified by its k nearest bank images: the protocol of `maescale knn` on fewer images.
Every process encodes its share and computes the same result.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from ..config import Config
from ..data import build_loader
from .accuracy import topk_accuracy
from .config import refuse_same_images
from .features import extract_features
from .knn import knn_scores


class KnnMonitor:
    def __init__(self, cfg: Config, accelerator: Accelerator, img_size: int, embed_dim: int):
        self.cfg = cfg.monitor
        if not self.cfg.allow_same_images:
            refuse_same_images(cfg.data, ("monitor.bank_split", self.cfg.bank_split),
                               ("monitor.val_split", self.cfg.val_split), "monitor.allow_same_images")
        self.accelerator = accelerator
        self.embed_dim = embed_dim
        self.bank = self._loader(cfg, img_size, self.cfg.bank_split, self.cfg.bank_images)
        self.val = self._loader(cfg, img_size, self.cfg.val_split, self.cfg.val_images)

    def _loader(self, cfg: Config, img_size: int, split: str, images: int):
        acc = self.accelerator
        return build_loader(
            cfg.data, img_size=img_size, in_chans=cfg.model.in_chans, seed=cfg.seed, rank=acc.process_index,
            world_size=acc.num_processes,
            train=False, split=split, eval_subset=images,
        )

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """{'knn_top1', 'knn_top5'} (percent) of `model`'s encoder; call on every process."""
        cfg, acc = self.cfg, self.accelerator
        was_training = model.training
        model.eval()
        try:
            bank, bank_labels = extract_features(model, self.bank, cfg.pool, acc, "kNN bank", self.embed_dim)
            queries, labels = extract_features(model, self.val, cfg.pool, acc, "kNN val", self.embed_dim)
        finally:
            model.train(was_training)
        classes = max(self.bank.num_classes, self.val.num_classes)
        scores = knn_scores(bank, bank_labels, queries, k=cfg.k, temperature=cfg.temperature, num_classes=classes)
        return {f"knn_{name}": value for name, value in topk_accuracy(scores, labels).items()}
