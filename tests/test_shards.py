"""data.kind=shards: naming shards, the epoch's division over processes and workers, resume, bad shards.

Shards are written by `maescale write-shards` from real JPEG folders (CIFAR-10 photos from
../shared/data where present); the runs are real pretraining runs, 1 and 2 processes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import maescale_printed, run_maescale
from test_distributed import REPO
from test_distributed import run as run_processes
from test_matrix import write_jpeg_split

from maescale import checkpoint
from maescale.config import load_config
from maescale.data import build_loader, sample_mask_seed
from maescale.data.shard_loader import EpochPlan
from maescale.data.tar_shards import ShardReader, expand_braces, list_shards
from maescale.errors import ConfigError, DataError
from maescale.metrics import read_metrics

CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
IMAGES, PER_SHARD, BATCH = 60, 7, 4


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    """root/train and root/val of shards (7 samples each, the last shorter) written from JPEG folders."""
    base = tmp_path_factory.mktemp("shards")
    write_jpeg_split(base / "jpegs" / "train", IMAGES, seed=21)
    write_jpeg_split(base / "jpegs" / "val", 20, seed=22)
    for split in ("train", "val"):
        maescale_printed("write-shards", "--src", base / "jpegs", "--split", split, "--out", base / "shards" / split,
                         "--samples-per-shard", PER_SHARD)
    return base / "shards"


def data_cfg(path, *overrides: str):
    return load_config(None, ["data.kind=shards", f"data.path={path}", f"data.batch_size={BATCH}",
                              "data.num_workers=0", "data.shuffle_buffer=8", *overrides]).data


def dataset_indices(batches, seed: int, epoch: int, size: int) -> list[int]:
    """The dataset index of every sample read, recovered from its mask seed (a function of (seed, epoch, index))."""
    index_of = {sample_mask_seed(seed, epoch, index): index for index in range(size)}
    return [index_of[int(s)] for batch in batches for s in batch.seeds]


# ---------------------------------------------------------------- naming shards


def test_brace_patterns_expand_like_the_shell():
    assert expand_braces("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    with pytest.raises(ConfigError, match="neither a range"):
        expand_braces("data/{train}.tar")


def test_a_folder_a_pattern_a_list_an_index_and_a_pipe_name_the_same_shards(shard_root, tmp_path):
    folder = list_shards(str(shard_root), "train")
    counts = [shard.samples for shard in folder.shards]
    classes = len(list((shard_root.parent / "jpegs" / "train").iterdir()))
    assert counts == [7] * 8 + [4] and folder.num_samples == IMAGES and folder.num_classes == classes
    names = [Path(shard.url).name for shard in folder.shards]
    pattern = list_shards(f"{shard_root}/{{split}}/{{00000..00008}}.tar", "train")  # counted from the headers
    assert [shard.samples for shard in pattern.shards] == counts and pattern.num_classes == classes
    (tmp_path / "list.txt").write_text("".join(f"{shard_root}/train/{name}\n" for name in names))
    assert [shard.samples for shard in list_shards(str(tmp_path / "list.txt"), "train").shards] == counts
    index = json.loads((shard_root / "train" / "shards.json").read_text())
    for entry in index["shardlist"]:
        entry["url"] = f"pipe:cat {shard_root / 'train' / entry['url']}"
    (tmp_path / "piped.json").write_text(json.dumps(index))
    piped = data_cfg(tmp_path / "piped.json")
    local = data_cfg(shard_root)
    local_batches, piped_batches = (build_loader(cfg, img_size=32, seed=3).epoch(0) for cfg in (local, piped))
    for a, b in zip(local_batches, piped_batches):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_an_index_written_once_names_the_same_shards_and_counts(shard_root, tmp_path):
    """`maescale index-shards`: counted once from the headers, then read by every loader without counting."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for shard in sorted((shard_root / "train").glob("*.tar")):
        (copy / shard.name).write_bytes(shard.read_bytes())
    beside, elsewhere = copy / "shards.json", tmp_path / "train.json"
    for out in (beside, elsewhere):
        printed = maescale_printed("index-shards", "--shards", f"{copy}/{{00000..00008}}.tar", "--out", out)
        assert f"wrote {out}: 9 shards, {IMAGES} samples" in printed
    urls = [entry["url"] for entry in json.loads(beside.read_text())["shardlist"]]
    assert urls[0] == "00000.tar"  # beside the index: by name, so the folder can move
    assert json.loads(elsewhere.read_text())["shardlist"][0]["url"] == str(copy / "00000.tar")
    reference = build_loader(data_cfg(shard_root), img_size=32, seed=2)
    for path in (copy, elsewhere):  # the folder reads its shards.json
        indexed = build_loader(data_cfg(path), img_size=32, seed=2)
        assert indexed.shard_list.num_classes == reference.shard_list.num_classes
        assert torch.equal(indexed.rank_indices(0), reference.rank_indices(0))


def test_compressed_shards_read_the_same_samples(shard_root, tmp_path):
    import gzip

    folder = tmp_path / "gz"
    folder.mkdir()
    for shard in sorted((shard_root / "train").glob("*.tar")):
        (folder / f"{shard.name}.gz").write_bytes(gzip.compress(shard.read_bytes()))
    plain, packed = (build_loader(data_cfg(path), img_size=32, seed=1) for path in (shard_root / "train", folder))
    assert plain.num_samples == packed.num_samples == IMAGES
    for a, b in zip(plain.epoch(0), packed.epoch(0)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_shards_served_over_http_read_as_local_ones(shard_root, tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(shard_root / "train"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = json.loads((shard_root / "train" / "shards.json").read_text())
        for entry in index["shardlist"]:
            entry["url"] = f"http://127.0.0.1:{server.server_port}/{entry['url']}"
        index["shardlist"][-1]["url"] += ".missing"  # a shard the server does not have: reported, refilled
        (tmp_path / "web.json").write_text(json.dumps(index))
        web = build_loader(data_cfg(tmp_path / "web.json"), img_size=32, seed=3)
        local = build_loader(data_cfg(shard_root), img_size=32, seed=3)
        web_batches, local_batches = list(web.epoch(0)), list(local.epoch(0))
    finally:
        server.shutdown()
    assert len(web_batches) == len(local_batches)
    skipped = {name for batch in web_batches for name in batch.skipped}
    assert len(skipped) == 1 and "00008.tar.missing: 0 of 4 samples read (HTTPError" in skipped.pop()
    last = local.shard_list.num_samples - 4  # the missing shard's first sample index
    for a, b in zip(local_batches, web_batches):
        intact = [i for i, s in enumerate(a.seeds.tolist()) if s not in _mask_seeds(3, 0, range(last, IMAGES))]
        assert torch.equal(a.images[intact], b.images[intact])


def _mask_seeds(seed: int, epoch: int, indices) -> set[int]:
    return {sample_mask_seed(seed, epoch, index) for index in indices}


def test_what_cannot_be_read_is_one_clear_line(shard_root, tmp_path):
    with pytest.raises(DataError, match="sample count of a streamed shard must be given"):
        list_shards(f"pipe:cat {shard_root}/train/{{00000..00001}}.tar", "train")
    with pytest.raises(DataError, match="no .tar shards in"):
        list_shards(str(tmp_path), "train")
    with pytest.raises(DataError, match="split folder not found"):
        list_shards(str(shard_root), "test")
    with pytest.raises(DataError, match=r"2 process\(es\) x 8 worker stream\(s\) leave fewer than data.batch_size"):
        build_loader(data_cfg(shard_root, "data.num_workers=8"), img_size=32, seed=0, world_size=2)
    with pytest.raises(ConfigError, match="reads RGB pictures, but model.in_chans=4"):
        build_loader(data_cfg(shard_root), img_size=32, in_chans=4, seed=0)
    printed = run_maescale("pretrain", f"output_dir={tmp_path / 'run'}", "data.kind=shards",
                           f"data.path={tmp_path / 'none'}/{{0..3}}.tar", ok=False)
    assert printed.returncode != 0 and "shard not found" in printed.stderr


# ---------------------------------------------------------------- the epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_two_processes_read_every_sample_once(shard_root, workers):
    cfg = data_cfg(shard_root, f"data.num_workers={workers}")
    read = []
    for rank in range(2):
        loader = build_loader(cfg, img_size=32, seed=5, rank=rank, world_size=2)
        batches = list(loader.epoch(1))
        assert len(batches) == loader.batches_per_epoch > 0
        read.append(dataset_indices(batches, 5, 1, IMAGES))
        assert read[-1] == loader.rank_indices(1).tolist()  # the plan is what is read
    everything = read[0] + read[1]
    assert len(set(everything)) == len(everything)  # no sample twice, within or across processes
    # what an epoch leaves out: fewer than streams x (batch + 1) samples per process
    assert IMAGES - len(everything) < 2 * max(1, workers) * (BATCH + 1)
    # and each process reads its own shards: they share at most the boundary one
    shards_of = [{index // PER_SHARD for index in indices} for indices in read]
    assert len(shards_of[0] & shards_of[1]) <= 1


def test_the_epoch_order_is_a_function_of_seed_and_epoch(shard_root):
    def order(seed: int, epoch: int) -> torch.Tensor:
        return build_loader(data_cfg(shard_root), img_size=32, seed=seed).rank_indices(epoch)

    assert torch.equal(order(5, 0), order(5, 0))
    assert not torch.equal(order(5, 0), order(5, 1)) and not torch.equal(order(5, 0), order(6, 0))
    loader = build_loader(data_cfg(shard_root), img_size=32, seed=5)
    # shuffled within windows of 8 samples: a batch mixes samples of more than one shard
    first = loader.rank_indices(0)[:8].tolist()
    assert len({index // PER_SHARD for index in first}) > 1 and first != sorted(first)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_resumed_at_a_batch_is_the_tail_and_opens_no_earlier_shard(shard_root, tmp_path, workers):
    """The shards are streamed through a command that logs each one it is asked for."""
    log = tmp_path / "opened.txt"
    index = json.loads((shard_root / "train" / "shards.json").read_text())
    for entry in index["shardlist"]:
        path = shard_root / "train" / entry["url"]
        entry["url"] = f"pipe:echo {path.name} >> {log}; cat {path}"
    (tmp_path / "logged.json").write_text(json.dumps(index))
    loader = build_loader(data_cfg(tmp_path / "logged.json", f"data.num_workers={workers}"), img_size=32, seed=2)
    whole = list(loader.epoch(3))
    log.unlink()
    start = loader.batches_per_epoch - 4
    tail = list(loader.epoch(3, start_batch=start))
    assert len(tail) == 4
    for a, b in zip(whole[start:], tail):
        assert torch.equal(a.images, b.images) and torch.equal(a.seeds, b.seeds)
    # what the resumed epoch must read: the shuffling windows holding its batches, and nothing before
    plan = EpochPlan(loader, 3)
    windows = [plan.read_unit(batch)[1] for batch in range(start, loader.batches_per_epoch)]
    needed = {Path(plan.url(plan.locate(p)[0])).name.split(" ")[0] for window in windows for p in window}
    opened = set(log.read_text().split())
    assert opened == needed and len(opened) < 9


# ---------------------------------------------------------------- bad shards


def test_a_truncated_shard_and_a_corrupt_member_are_skipped_and_reported_once(shard_root, tmp_path, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    for shard in sorted((shard_root / "train").glob("*.tar")):
        (bad / shard.name).write_bytes(shard.read_bytes())
    (bad / "shards.json").write_text((shard_root / "train" / "shards.json").read_text())
    whole = (bad / "00002.tar").read_bytes()
    (bad / "00002.tar").write_bytes(whole[: len(whole) // 2])  # ends mid-member
    _replace_member(bad / "00005.tar", 1, b"\xff\xd8 not a JPEG at all")
    loader = build_loader(data_cfg(bad), img_size=32, seed=0)
    with caplog.at_level(logging.WARNING, logger="maescale"):
        batches = list(loader.epoch(0)) + list(loader.epoch(1))
    assert len(batches) == 2 * loader.batches_per_epoch  # every batch is full: slots refilled
    assert all(len(batch.images) == BATCH and torch.isfinite(batch.images).all() for batch in batches)
    skipped = {name for batch in batches for name in batch.skipped}
    assert any("00002.tar" in name and "of 7 samples read" in name for name in skipped), skipped
    assert any("00005.tar#" in name for name in skipped), skipped
    warnings = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warnings) == len(skipped) == 2  # once each, though both epochs met them


def _replace_member(shard: Path, sample: int, data: bytes) -> None:
    """Rewrite ``shard`` with the picture of its ``sample``-th sample replaced by ``data``."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    pictures = [m.name for m, _ in members if m.name.endswith(".jpg")]
    with tarfile.open(shard, "w") as tar:
        for member, content in members:
            content = data if member.name == pictures[sample] else content
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))


def test_a_reader_passes_over_samples_without_reading_their_pictures(shard_root):
    shard = str(sorted((shard_root / "train").glob("*.tar"))[0])
    with ShardReader(shard) as reader:
        samples = list(reader.samples(read=lambda ordinal: ordinal == 3))
    assert len(samples) == 7 and [bool(s.data) for s in samples] == [False, False, False, True, False, False, False]
    assert samples[3].label >= 0 and samples[0].label == -1


# ---------------------------------------------------------------- training on shards

TRAIN = ["model.name=mae_vit_micro_patch4", "schedule.epochs=6", "schedule.warmup_epochs=1", "optim.blr=1.5e-3",
         "train.log_every=1", "data.kind=shards", "data.shuffle_buffer=16", "data.num_workers=0"]


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory) -> Path:
    """Shards of 240 CIFAR-10 training photos (24 per class), 32 per shard."""
    if not CIFAR.is_file():
        pytest.skip(f"{CIFAR} is absent (the shared data set of this project)")
    root = tmp_path_factory.mktemp("cifar")
    taken: dict[str, int] = {}
    with tarfile.open(CIFAR) as archive:
        for member in archive:
            parts = member.name.split("/")
            if len(parts) == 3 and parts[0] == "train" and member.isfile() and taken.get(parts[1], 0) < 24:
                taken[parts[1]] = taken.get(parts[1], 0) + 1
                target = root / "jpegs" / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
            if len(taken) == 10 and min(taken.values()) == 24:
                break
    maescale_printed("write-shards", "--src", root / "jpegs", "--out", root / "shards", "--samples-per-shard", 32)
    return root / "shards"


def test_cifar_shards_train_on_one_and_two_processes(cifar_shards, tmp_path):
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        run_processes(out, processes, *TRAIN, f"data.path={cifar_shards}", steps=12)
        rows = read_metrics(out)
        assert [row["step"] for row in rows] == list(range(1, 13))
        assert rows[-1]["loss"] < rows[0]["loss"]


def _pretrain_process(out: Path, path: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "maescale", "pretrain", *TRAIN, f"data.path={path}", "data.batch_size=8",
               "checkpoint.every_steps=4", f"output_dir={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_run_killed_mid_epoch_resumes_with_the_losses_of_an_uninterrupted_one(shard_root, tmp_path):
    straight = _pretrain_process(tmp_path / "straight", shard_root, "train.max_steps=10", "data.num_workers=2")
    output, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, output[-3000:]
    out = tmp_path / "killed"
    proc = _pretrain_process(out, shard_root, "train.max_steps=1000", "data.num_workers=2")
    try:
        deadline = time.time() + 240
        while checkpoint.latest(checkpoint.checkpoint_root(out)) is None:
            assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    resumed_at = int(checkpoint.latest(checkpoint.checkpoint_root(out)).name.split("_")[1])
    assert resumed_at % 6 != 0  # 2 streams of 3 batches, 6 steps an epoch: the kill came mid-epoch
    rerun = _pretrain_process(out, shard_root, "train.max_steps=10", "data.num_workers=2")
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and "resumed from" in output, output[-3000:]
    rows = {row["step"]: row["loss"] for row in read_metrics(out)}
    expected = {row["step"]: row["loss"] for row in read_metrics(tmp_path / "straight")}
    assert sorted(rows) == list(range(1, 11))
    assert [rows[step] for step in range(1, 11)] == pytest.approx([expected[s] for s in range(1, 11)], rel=1e-5)
