"""Tar shards in the webdataset layout: where they are, how many samples they hold, and reading them.

A shard is a tar file (``00000.tar``, ...) whose members group into samples by key, as
webdataset and img2dataset write them: ``n0001.jpg``, ``n0001.cls`` and ``n0001.json`` are the
sample ``n0001`` (the key is a member's path up to the first dot of its file name, and a sample's
members are consecutive). A sample is one picture member (.jpg, .jpeg, .png, .webp) and, when
present, its integer label (.cls); other members are passed over.

Shards are named by ``data.path`` (see :func:`list_shards`): a folder of ``*.tar`` (or of
``<split>/`` folders of them), a brace pattern (``/data/{00000..00999}.tar``), a ``.txt`` list
or a shard index ``.json``; a shard may be a web address (``https://...``) or stream through a
command, ``pipe:CMD``, whose standard output is the tar file. Every shard's sample count must be
known before an epoch is planned: from the index (``maescale write-shards`` writes one), from img2dataset's
``<shard>_stats.json``, or, for local files without either, by reading the tar headers once.

The index is the one of webdataset's ``wids`` (``{"__kind__": "wids-shard-index-v1",
"shardlist": [{"url": ..., "nsamples": ...}, ...]}``, urls relative to the index's folder),
with maescale's ``num_classes`` and ``classes`` beside them.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import subprocess
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, NamedTuple, Sequence

from ..errors import ConfigError, DataError
from .folder import SPLIT_NAMES

logger = logging.getLogger(__name__)

PICTURE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_NAME = "shards.json"
INDEX_KIND = "wids-shard-index-v1"
PIPE = "pipe:"
WEB = ("http://", "https://")
WEB_TIMEOUT_S = 60  # a web shard that sends nothing for this long ends early (reported, refilled)
TAR_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")  # compressed shards are read too, but cannot seek over samples


@dataclass(frozen=True)
class Shard:
    url: str
    """A local path, an http(s):// address, or ``pipe:CMD`` whose standard output is the tar file."""
    samples: int


@dataclass(frozen=True)
class ShardList:
    shards: tuple[Shard, ...]
    num_classes: int | None
    """From the index or the counted labels; None when nothing says (pretraining needs no labels)."""
    source: str
    """What data.path named, for messages."""

    @property
    def num_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)


class Sample(NamedTuple):
    """One sample as read from its shard: the picture's file bytes and its label."""

    name: str  # "<shard url>#<key>", to report it
    data: bytes
    label: int


# ---------------------------------------------------------------- naming the shards


def expand_braces(pattern: str) -> list[str]:
    """Every string a shell-like brace pattern names, in order: ``{000..003}`` (zero padding kept
    from the first bound) and ``{a,b}``; a ``{`` with neither is a ConfigError."""
    group = re.search(r"\{([^{}]*)\}", pattern)
    if group is None:
        return [pattern]
    body, head, tail = group.group(1), pattern[: group.start()], pattern[group.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [f"{n:0{width}d}" for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ConfigError(f"data.path={pattern!r}: {{{body}}} is neither a range {{000..099}} nor a list {{a,b}}")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def list_shards(path: str, split: str) -> ShardList:
    """The shards ``data.path`` names for ``split``, with their sample counts."""
    spec = path.replace("{split}", split)
    if not spec.startswith(PIPE) and Path(spec).expanduser().is_dir():
        return _shard_folder(Path(spec).expanduser(), split, source=path)
    if spec.endswith(".json"):
        return read_index(Path(spec).expanduser(), source=path)
    if spec.endswith(".txt"):
        list_file = Path(spec).expanduser()
        if not list_file.is_file():
            raise DataError(f"shard list not found: {list_file}")
        urls = [line.strip() for line in list_file.read_text().splitlines() if line.strip() and line[0] != "#"]
        return _counted([_relative_to(list_file.parent, url) for url in urls], source=path)
    return _counted(expand_braces(spec), source=path)


def _shard_folder(folder: Path, split: str, source: str) -> ShardList:
    if (folder / split).is_dir():
        folder = folder / split
    elif any((folder / name).is_dir() for name in SPLIT_NAMES):
        raise DataError(f"split folder not found: {folder / split}")
    if (folder / INDEX_NAME).is_file():
        return read_index(folder / INDEX_NAME, source=source)
    tars = sorted(str(tar) for pattern in TAR_PATTERNS for tar in folder.glob(pattern))
    if not tars:
        raise DataError(f"no .tar shards in {folder}")
    return _counted(tars, source=source)


def _relative_to(folder: Path, url: str) -> str:
    """A url as given, but a relative local path taken from ``folder`` (where the list or index is)."""
    if url.startswith(PIPE) or "://" in url or Path(url).is_absolute():
        return url
    return str(folder / url)


def read_index(index: Path, source: str) -> ShardList:
    if not index.is_file():
        raise DataError(f"shard index not found: {index}")
    try:
        content = json.loads(index.read_text())
        shards = tuple(
            Shard(_relative_to(index.parent, entry["url"]), int(entry["nsamples"])) for entry in content["shardlist"]
        )
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{index} is not a shard index ({INDEX_KIND}): {type(error).__name__}: {error}") from None
    if not shards:
        raise DataError(f"{index} lists no shards")
    return ShardList(shards, content.get("num_classes"), source)


def write_index(index: Path, shards: Sequence[Shard], num_classes: int | None,
                classes: list[str] | None = None) -> Path:
    """Write the shard index file ``index``: a shard in the index's folder by its file name (so the
    folder can move), any other as given."""
    entries = [{"url": _url_from(index.parent, shard.url), "nsamples": shard.samples} for shard in shards]
    content = {"__kind__": INDEX_KIND, "wids_version": 1, "shardlist": entries, "num_classes": num_classes}
    if classes is not None:
        content["classes"] = classes
    index.write_text(json.dumps(content, indent=1) + "\n")
    return index


def _url_from(folder: Path, url: str) -> str:
    if is_stream(url) or Path(url).resolve().parent != folder.resolve():
        return url if is_stream(url) else str(Path(url).resolve())
    return Path(url).name


def _counted(urls: list[str], source: str) -> ShardList:
    """Shards named without an index: counts from img2dataset's stats files, else from the headers."""
    if not urls:
        raise DataError(f"data.path={source!r} names no shards")
    streamed = next((url for url in urls if is_stream(url)), None)
    if streamed is not None:
        raise DataError(
            f"{streamed}: the sample count of a streamed shard must be given: name the shards in a shard index "
            f".json (shardlist of url and nsamples; `maescale write-shards` writes one)"
        )
    shards, top_label = [], -1
    stats_counts = {url: _stats_count(url) for url in urls}
    unindexed = sum(count is None for count in stats_counts.values())
    if unindexed:
        logger.info("counting the samples of %d shards from their tar headers (`maescale index-shards` counts "
                    "them once for every run)", unindexed)
    for url in urls:
        count = stats_counts[url]
        if count is None:
            count, shard_top = _count_samples(url)
            top_label = max(top_label, shard_top)
        shards.append(Shard(url, count))
    return ShardList(tuple(shards), top_label + 1 if top_label >= 0 else None, source)


def is_stream(url: str) -> bool:
    """A shard read front to back only: a pipe: command's output or a web address."""
    return url.startswith((PIPE, *WEB))


def _stats_count(url: str) -> int | None:
    """The sample count img2dataset wrote beside a local shard (``00000_stats.json``, "successes")."""
    stats = Path(url).with_name(Path(url).stem + "_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _count_samples(url: str) -> tuple[int, int]:
    """(samples, largest label) of a local shard, reading its headers and .cls members only."""
    if not Path(url).is_file():
        raise DataError(f"shard not found: {url}")
    stat = Path(url).stat()
    return _count_file(url, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=65536)
def _count_file(url: str, mtime_ns: int, size: int) -> tuple[int, int]:
    """The header count of one version of a file: once per process, though every loader of a run
    (training, the figures, the kNN monitor) lists the shards again."""
    count, top_label = 0, -1
    with ShardReader(url) as reader:
        for sample in reader.samples(pictures=False):
            count += 1
            top_label = max(top_label, sample.label)
    return count, top_label


# ---------------------------------------------------------------- reading one shard


def sample_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a member: its path up to the first dot of the file name, and the rest."""
    folder, _, name = member_name.rpartition("/")
    stem, _, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


class ShardReader:
    """The samples of one shard, in order. A local file is read with seeks, so samples passed over
    (``read`` false for their members) cost a header read each; a pipe: or http(s):// shard streams
    through.

    ``ended_early`` is set when the tar stops mid-way (a truncated file, a failing command): the
    samples read until then are good, the rest are missing, and the caller reports it.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.ended_early: str | None = None
        self._process: subprocess.Popen | None = None
        self._stream: IO[bytes] | None = None
        if url.startswith(PIPE):
            self._process = subprocess.Popen(url[len(PIPE):], shell=True, stdout=subprocess.PIPE)
            self._stream = self._process.stdout
        elif url.startswith(WEB):
            self._stream = urllib.request.urlopen(url, timeout=WEB_TIMEOUT_S)
        # plain, or gzip/bzip2/xz compressed; a stream is read front to back, a file seeks
        self._tar = tarfile.open(fileobj=self._stream, mode="r|*") if self._stream else tarfile.open(url, mode="r:*")

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tar.close()
        if self._stream is not None:
            self._stream.close()
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()

    def samples(self, read: Callable[[int], bool] = lambda ordinal: True, pictures: bool = True) -> Iterator[Sample]:
        """Every sample with a picture, in order. ``read(ordinal)`` says whether to read the members of
        the ordinal-th one (passed over: empty data, label -1); ``pictures=False`` reads labels only."""
        pending, ordinal = None, 0
        for member in self._members():
            key, extension = sample_key(member.name)
            if pending is None or key != pending.key:
                if pending is not None and pending.has_picture:
                    yield pending.sample(self.url)
                    ordinal += 1
                pending = _Pending(key, wanted=read(ordinal))
            is_picture = extension in PICTURE_EXTENSIONS
            pending.has_picture |= is_picture
            if not pending.wanted or not (extension == "cls" or (pictures and is_picture)):
                continue
            content = self._read(member)
            if content is None:
                return
            if is_picture:
                pending.data = content
            else:
                pending.label = _label(content, f"{self.url}#{member.name}")
        if pending is not None and pending.has_picture and self.ended_early is None:
            yield pending.sample(self.url)

    def _members(self) -> Iterator[tarfile.TarInfo]:
        try:
            for member in self._tar:
                if member.isfile():
                    yield member
        except (tarfile.TarError, OSError, EOFError) as error:
            self.ended_early = f"{type(error).__name__}: {error}"
            return
        if self._process is not None and self._process.wait() != 0:
            self.ended_early = f"the command exited with status {self._process.returncode}"

    def _read(self, member: tarfile.TarInfo) -> bytes | None:
        try:
            return self._tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as error:
            self.ended_early = f"{type(error).__name__}: {error}"
            return None


def _label(content: bytes, name: str) -> int:
    try:
        return int(content.decode().strip())
    except ValueError:
        raise DataError(f"{name}: a .cls member must hold an integer label, got {content[:40]!r}") from None


@dataclass
class _Pending:
    """The sample whose members are being read."""

    key: str
    wanted: bool
    has_picture: bool = False
    data: bytes = b""
    label: int = 0  # a sample without a .cls member is class 0

    def sample(self, url: str) -> Sample:
        return Sample(f"{url}#{self.key}", self.data, self.label if self.wanted else -1)
