"""The frozen encoder of the evaluation protocols and feature extraction across processes.

Extraction is data parallel: each process encodes its share of the split (the eval loader
gives it every world_size-th image), then the features are gathered back into dataset order
on every process. Everything downstream (head, kNN) then sees the same tensors whatever the
number of processes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm

from .. import parallel
from ..checkpoint import load_model_weights
from ..config import ConfigError, check_image_size, load_config
from ..data import Loader, build_loader
from ..interop import load_weights_file, run_config_of
from ..models import MaskedAutoencoderViT, build_model
from .config import EncoderConfig, EvalConfig


def load_encoder(cfg: EncoderConfig, seed: int) -> MaskedAutoencoderViT:
    """The MAE whose encoder is evaluated, in eval mode, from `encoder.ckpt` or at random init, taking
    images of `encoder.img_size` (default: the size it was built for)."""
    return at_img_size(_load_weights(cfg, seed), cfg.img_size, "encoder.img_size")


def _load_weights(cfg: EncoderConfig, seed: int) -> MaskedAutoencoderViT:
    if cfg.ckpt is None:
        set_seed(seed)  # the random baseline is the model's own initialisation, reproducibly
        return build_model(cfg.model).eval()
    path = Path(cfg.ckpt)
    if path.is_file():
        return load_weights_file(path, cfg.model)
    if not path.is_dir():
        raise FileNotFoundError(f"encoder.ckpt={cfg.ckpt!r}: no such checkpoint folder or weights file")
    return load_model_weights(_model_of_run(path, cfg.model), path, "encoder.ckpt").eval()


def at_img_size(model: MaskedAutoencoderViT, img_size, key: str) -> MaskedAutoencoderViT:
    """`model` taking images of `img_size` (null: as it is), its position tables recomputed for the new
    grid; a size its patches do not tile is the error of config key `key`."""
    if img_size is not None:
        check_image_size(img_size, key, model.patch_size)
        try:
            model.set_img_size(img_size)
        except ValueError as error:  # e.g. a grid too small to keep a patch at the model's mask ratio
            raise ConfigError(f"{key}: {error}") from None
    return model


def _model_of_run(ckpt: Path, name: str | None) -> MaskedAutoencoderViT:
    """The model a checkpoint was written from: its run's config.yaml, or `encoder.model`."""
    run_config = run_config_of(ckpt)
    if run_config is None:
        if name is None:
            raise ConfigError(f"{ckpt} has no run config.yaml next to it: set encoder.model")
        return build_model(name)
    model_cfg = load_config(run_config).model
    if name is not None and name != model_cfg.name:
        raise ConfigError(f"encoder.model={name!r} but {ckpt} was trained as {model_cfg.name!r}")
    return build_model(**asdict(model_cfg))


def pooled(tokens: Tensor, pool: str) -> Tensor:
    """[N, 1 + L, D] encoder output -> [N, D]: the cls token or the mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


@torch.no_grad()
def encode(model: torch.nn.Module, images: Tensor, pool: str) -> Tensor:
    """Pooled features of `images`; `model` is an MAE or a sharding wrapper around one."""
    return pooled(model(images, features_only=True), pool).float()


def eval_loader(cfg: EvalConfig, model: MaskedAutoencoderViT, split: str, accelerator: Accelerator) -> Loader:
    """Center-crop loader over `split` of the images `model` takes, this process's share, dataset order."""
    return build_loader(
        cfg.data, img_size=model.img_size, in_chans=model.in_chans, seed=cfg.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, train=False, split=split,
    )


def extract_features(
    model: torch.nn.Module, loader: Loader, pool: str, accelerator: Accelerator, desc: str, dim: int
) -> tuple[Tensor, Tensor]:
    """(features [N, dim], labels [N]) of the images the eval `loader` visits (the split or its
    `eval_subset`), in its order, on every process."""
    features, labels = [], []
    bar = tqdm(
        loader.epoch(0),
        total=len(loader),
        desc=desc,
        unit="batch",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
        leave=False,
    )
    for batch in bar:
        images = batch.images.to(accelerator.device, parallel.input_dtype(accelerator))
        features.append(encode(model, images, pool).cpu())
        labels.append(batch.labels)
    local_features = torch.cat(features) if features else torch.zeros(0, dim)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    # This process encoded every world_size-th image of the loader's selection.
    total = len(loader.eval_selection())
    positions = torch.arange(accelerator.process_index, total, accelerator.num_processes)
    return gather_in_order(local_features, positions, total), gather_in_order(local_labels, positions, total)


FEATURE_CACHE = "features"


class SplitFeatures(NamedTuple):
    """Features [N, D] and labels [N] of a split's images in order, and the split's class count."""

    features: Tensor
    labels: Tensor
    num_classes: int


def split_features(model: MaskedAutoencoderViT, cfg: EvalConfig, split: str, loader: Loader, run) -> SplitFeatures:
    """`extract_features` of `split` through its eval `loader`, reused from output_dir/features/ when
    the same encoder, data and pooling were extracted before (linprobe and knn on one output_dir
    encode once). The loaders are built first, so that a bad split fails before any encoding."""
    path = run.output_dir / FEATURE_CACHE / f"{split}-{cfg.encoder.pool}.pt"
    key = _feature_key(cfg, split, model.img_size)
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached["key"] == key and "num_classes" in cached:
            run.print(f"features of {split} read from {path}")
            return SplitFeatures(cached["features"], cached["labels"], cached["num_classes"])
    features, labels = extract_features(
        model, loader, cfg.encoder.pool, run.accelerator, f"features ({split})", model.embed_dim
    )
    if run.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "features": features, "labels": labels, "num_classes": loader.num_classes}, path)
    return SplitFeatures(features, labels, loader.num_classes)


def _feature_key(cfg: EvalConfig, split: str, img_size: int) -> str:
    """What the features depend on: the weights (path and modification time), model, pooling, data."""
    ckpt = Path(cfg.encoder.ckpt).resolve() if cfg.encoder.ckpt else None
    stamp = max((p.stat().st_mtime_ns for p in [ckpt, *ckpt.rglob("*")]), default=0) if ckpt else cfg.seed
    data = {k: v for k, v in asdict(cfg.data).items() if k not in ("batch_size", "num_workers")}
    return json.dumps([str(ckpt), stamp, cfg.encoder.model, cfg.encoder.pool, img_size, split, data], sort_keys=True)


def gather_in_order(local: Tensor, indices: Tensor, total: int) -> Tensor:
    """Place every process's rows (`local[i]` belongs at `indices[i]`) into one [total, ...] tensor."""
    out = local.new_zeros((total, *local.shape[1:]))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        out[indices] = local
        return out
    # all_gather needs equal sizes: pad every share to the longest one.
    longest = -(-total // dist.get_world_size())
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: len(local)] = local
    padded_indices = torch.full((longest,), -1, dtype=torch.int64)
    padded_indices[: len(indices)] = indices
    rows = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    where = [torch.empty_like(padded_indices) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, padded)
    dist.all_gather(where, padded_indices)
    rows, where = torch.cat(rows), torch.cat(where)
    valid = where >= 0
    out[where[valid]] = rows[valid]
    return out


def all_gather_cat(local: Tensor) -> Tensor:
    """Concatenate equal-sized tensors of all processes in rank order (identity on one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)
