"""Weighted k-nearest-neighbour classification on normalised features.

Each query's k most cosine-similar training features vote for their labels with weight
exp(similarity / T) (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination"; k = 20, T = 0.07 as in DINO, Caron et al. 2021). No training, so
it is a cheap monitor of representation quality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

QUERY_CHUNK = 1024  # queries per similarity matrix: bounds memory at QUERY_CHUNK x bank size


def knn_scores(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, *, k: int, temperature: float, num_classes: int
) -> Tensor:
    """[Q, num_classes] summed vote weights of each query's k nearest bank features."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for chunk in queries.float().split(QUERY_CHUNK):
        similarity = F.normalize(chunk, dim=1) @ bank.T  # [q, N]
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(chunk), num_classes, dtype=weights.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[top_idx], weights))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn(cfg) -> dict:
    """`maescale knn`: encode both splits (center crops), classify `val_split` by its neighbours in
    `train_split`; returns top-1 / top-5 (percent)."""
    from .accuracy import topk_accuracy
    from .features import eval_loader, load_encoder, split_features
    from .run import EvalRun

    run = EvalRun(cfg, "knn")
    model = load_encoder(cfg.encoder, cfg.seed).to(run.accelerator.device)
    loaders = {
        split: eval_loader(cfg, model, split, run.accelerator) for split in (cfg.train_split, cfg.val_split)
    }
    bank = split_features(model, cfg, cfg.train_split, loaders[cfg.train_split], run)
    val = split_features(model, cfg, cfg.val_split, loaders[cfg.val_split], run)
    classes = max(bank.num_classes, val.num_classes)
    scores = knn_scores(bank.features, bank.labels, val.features, k=cfg.knn.k, temperature=cfg.knn.temperature,
                        num_classes=classes)
    result = topk_accuracy(scores, val.labels)
    run.save_config({"world_size": run.world_size, "bank_images": len(bank.labels)})
    run.log({"step": 0, "k": cfg.knn.k, "temperature": cfg.knn.temperature, **result})
    run.print(f"knn (k={cfg.knn.k}, T={cfg.knn.temperature}) {cfg.val_split}: top-1 {result['top1']:.2f}%  "
              f"top-5 {result['top5']:.2f}%  ({len(val.labels)} images, bank of {len(bank.labels)})")
    run.close()
    return {**result, "val_images": len(val.labels)}
