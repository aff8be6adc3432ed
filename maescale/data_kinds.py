"""The registry of data kinds: what ``data.kind`` may name, and what each kind brings.

A kind is one :class:`DataKind`: the builder of its loaders, the checks of its own config keys,
the optional package it needs and a line of help. :func:`register_kind` adds one, from maescale
or from outside it, and nothing else needs editing::

    from maescale.data import DataKind, register_kind
    from maescale.data_kinds import check_path

    register_kind("shards", DataKind(build=build_shard_loader, check=check_path("tar files"), help="tar shards"))

after which ``data.kind=shards`` trains, evaluates, monitors and draws figures like the built-in
kinds, because every command gets its data from ``maescale.data.build_loader``.

The config reads this module when it is imported (the help of ``data.kind``) and when it
validates (the name, the kind's checks, its extra), so the module stays free of torch: the
built-in builders are named as ``"module:function"`` and imported when a loader is built. It
lives beside ``maescale/data`` rather than in it because importing any module of that package
first runs the package's ``__init__``, which imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol, Sequence

from .errors import ConfigError

if TYPE_CHECKING:
    from .data.base import Loader


class LoaderBuilder(Protocol):
    """Builds a kind's :class:`~maescale.data.base.Loader` for one process, called by ``build_loader``
    after the config checks (the kind's own included). ``train`` chooses augmentation and shuffling
    (``False``: center crops in order, as evaluation, the kNN monitor and the figures read them),
    ``split`` the images ("train", "val", ...), ``eval_subset`` (eval mode) how many evenly spaced
    images of the split; batches hold ``data_cfg.batch_size`` images of [in_chans, *img_size]. A builder
    with an ``augment`` parameter is handed fine-tuning's RandAugment and random erasing settings
    (``maescale.data.finetune_augment.FinetuneAugment``) when they are on; without one, fine-tuning
    with them on is refused for the kind."""

    def __call__(
        self, data_cfg: Any, *, img_size: int | Sequence[int], in_chans: int, seed: int, rank: int,
        world_size: int, train: bool, split: str, eval_subset: int | None,
    ) -> Loader: ...


class Extra(NamedTuple):
    """An optional package a kind needs: the module it imports and the maescale extra installing it."""

    module: str
    extra: str


def no_checks(data_cfg: Any) -> None:
    """The checks of a kind that reads no config key of its own."""


def split_name(data_cfg: Any, split: str) -> str:
    """Which images a split reads, for a kind that knows only that splits of other names differ."""
    return f"split {split!r}"


@dataclass(frozen=True)
class DataKind:
    build: LoaderBuilder | str
    """The builder, or ``"module:function"`` naming it, imported when a loader is first built."""
    check: Callable[[Any], None] = no_checks
    """Raises ConfigError, naming the key, for a data config the kind cannot read."""
    extra: Extra | None = None
    """The optional package the kind needs; commands import it up front and name the extra if missing."""
    help: str = ""
    """What the kind reads, for the help of ``data.kind``."""
    images_of_split: Callable[[Any, str], str] = split_name
    """Which images ``split`` reads, as a name: two splits with the same name read the same images
    (evaluation refuses to score the images it trained on)."""
    device_decode: bool = False
    """Whether the builder honours ``data.decode=gpu`` (workers read bytes, the device decodes them:
    maescale/data/device_decode.py); other kinds refuse that setting."""

    def builder(self) -> LoaderBuilder:
        if not isinstance(self.build, str):
            return self.build
        module, _, name = self.build.partition(":")
        return getattr(importlib.import_module(module), name)


_KINDS: dict[str, DataKind] = {}


def register_kind(name: str, kind: DataKind) -> DataKind:
    """Make ``data.kind=<name>`` read data with ``kind``; a name already taken is refused."""
    if _KINDS.get(name, kind) != kind:
        raise ValueError(f"data kind {name!r} is already registered")
    _KINDS[name] = kind
    return kind


def kind_names() -> list[str]:
    return sorted(_KINDS)


def data_kind(name: str) -> DataKind:
    """The kind ``data.kind=<name>`` reads with; an unknown name is a ConfigError listing the kinds."""
    if name not in _KINDS:
        raise ConfigError(f"data.kind must be one of {', '.join(map(repr, kind_names()))}, got {name!r}")
    return _KINDS[name]


def kinds_help() -> str:
    return "; ".join(f"{name}: {_KINDS[name].help}" for name in kind_names())


# ---------------------------------------------------------------- the built-in kinds


def check_path(layout: str) -> Callable[[Any], None]:
    """The check of a kind that reads files at data.path, laid out as ``layout`` says."""

    def check(data_cfg: Any) -> None:
        if not data_cfg.path:
            raise ConfigError(f"data.path is required when data.kind={data_cfg.kind} ({layout})")

    return check


def _check_synthetic(data_cfg: Any) -> None:
    if data_cfg.synthetic_size <= 0:
        raise ConfigError("data.synthetic_size must be positive")


def _synthetic_images(data_cfg: Any, split: str) -> str:
    # 'train' is one seeded set of shapes, every other split name one other set.
    return "the synthetic training images" if split == "train" else "the synthetic held-out images"


def _folder_images(data_cfg: Any, split: str) -> str:
    # A folder without that split's folder serves the split from its root.
    root = Path(data_cfg.path).expanduser()
    return str((root / split if (root / split).is_dir() else root).resolve())


def _shard_images(data_cfg: Any, split: str) -> str:
    # The shards the loader lists: a folder's split folder when it has one, else what data.path names.
    spec = data_cfg.path.replace("{split}", split)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return str((folder / split if (folder / split).is_dir() else folder).resolve())
    return spec


def _beton_images(data_cfg: Any, split: str) -> str:
    root = Path(data_cfg.path).expanduser()
    return str((root if root.is_file() else root / f"{split}.beton").resolve())


def _check_ffcv(data_cfg: Any) -> None:
    check_path("a .beton file or a folder of <split>.beton")(data_cfg)
    if data_cfg.ffcv_order == "quasi_random" and data_cfg.ffcv_os_cache:
        raise ConfigError(
            "data.ffcv_order=quasi_random needs data.ffcv_os_cache=false (it orders by pages read into process memory)"
        )


register_kind("synthetic", DataKind(
    build="maescale.data.loader:build_synthetic_loader", check=_check_synthetic, images_of_split=_synthetic_images,
    help="generated shapes, data.synthetic_size images, no files",
))
register_kind("folder", DataKind(
    build="maescale.data.loader:build_folder_loader", check=check_path("<root>/<class>/*.jpg or a folder of splits"),
    images_of_split=_folder_images, device_decode=True,
    help="an ImageNet-layout folder at data.path (pictures, .tif/.tiff, .npy)",
))
register_kind("ffcv", DataKind(
    build="maescale.data.ffcv_loader:build_ffcv_loader", check=_check_ffcv, extra=Extra("ffcv", "ffcv"),
    images_of_split=_beton_images, help=".beton files from `maescale write-beton` at data.path",
))
register_kind("shards", DataKind(
    build="maescale.data.shard_loader:build_shard_loader",
    check=check_path("a folder of .tar shards, a brace pattern, pipe:CMD or a list file"),
    images_of_split=_shard_images, device_decode=True,
    help="webdataset-layout .tar shards (key.jpg + key.cls) named by data.path, streamed (`maescale write-shards`)",
))
