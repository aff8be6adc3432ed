"""Top-k accuracy, the one rule of every evaluation (kNN, linear probe, fine-tuning, the monitor)."""

from __future__ import annotations

import torch
from torch import Tensor


def topk_hits(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """[len(ks)] float64 counts of rows whose label is among their `k` highest scores."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels.unsqueeze(1)
    return torch.tensor([hits[:, :k].any(dim=1).sum().item() for k in ks], dtype=torch.float64)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percentages of rows whose label is among the `k` highest scores, as {'top1': .., 'top5': ..}."""
    return as_percentages(topk_hits(scores, labels, ks), len(labels), ks)


def as_percentages(hits: Tensor, count: int | float, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{'top<k>': 100 * hits / count} from `topk_hits` counts (summed over batches or processes)."""
    return {f"top{k}": 100.0 * float(h) / float(count) for k, h in zip(ks, hits.tolist())}
