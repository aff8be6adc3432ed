"""`maescale write-shards` on real files: a 3-class ImageFolder of JPEG, PNG, WebP and BMP pictures
with one truncated JPEG, written as webdataset tar shards and read back through data/tar_shards.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import maescale_printed, run_maescale
from PIL import Image

from maescale.data import shard_writer
from maescale.data.tar_shards import INDEX_NAME, ShardReader, list_shards

CLASSES = ("cat", "dog", "emu")
TRUNCATED = "cat/e_truncated.jpg"
CONVERTED = "emu/h_bitmap.bmp"
PER_SHARD = 10
READABLE = 24  # 25 files, one truncated


def picture(seed: int, size=(24, 18)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_folder(root: Path) -> Path:
    """root/train/{cat,dog,emu}/: 25 pictures (.jpg, .JPEG, .png, .webp, .bmp), one of them truncated."""
    split = root / "train"
    for name in CLASSES:
        (split / name).mkdir(parents=True)
    for i in range(8):
        picture(i).save(split / "cat" / f"{'abcdfghi'[i]}.jpg", quality=90)
        picture(100 + i).save(split / "dog" / f"{i}.png")
    for i in range(7):
        picture(200 + i).save(split / "emu" / f"{'abcdefg'[i]}.{'JPEG' if i % 2 else 'webp'}",
                              format="JPEG" if i % 2 else "WEBP")
    picture(300).save(split / CONVERTED)
    picture(400, size=(64, 48)).save(split / TRUNCATED, quality=90)  # a picture of its own, cut in half
    whole = (split / TRUNCATED).read_bytes()
    (split / TRUNCATED).write_bytes(whole[: len(whole) // 2])
    return root  # 25 files: cat 8 + the truncated one, dog 8, emu 7 + the bitmap


def sources(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every source picture by path relative to the split folder: (file bytes, label)."""
    split = root / "train"
    return {path.relative_to(split).as_posix(): (path.read_bytes(), CLASSES.index(path.parent.name))
            for path in sorted(split.rglob("*.*"))}


def shard_members(out: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Every member of every shard, in shard then member order, read with tarfile itself."""
    members = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members.extend((info, tar.extractfile(info).read()) for info in tar.getmembers())
    return members


def samples_by_key(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: content}, keys in writing order."""
    samples: dict[str, dict[str, bytes]] = {}
    for info, content in shard_members(out):
        key, extension = info.name.split(".", 1)
        samples.setdefault(key, {})[extension] = content
    return samples


def write(src: Path, out: Path, *extra) -> str:
    return maescale_printed("write-shards", "--src", src, "--out", out, "--samples-per-shard", PER_SHARD,
                            "--workers", 0, *extra)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, Path, str]:
    """(source root, shards folder, what the command printed), written once for the module."""
    base = tmp_path_factory.mktemp("write_shards")
    root = write_folder(base / "images")
    out = base / "shards"
    return root, out, write(root, out)


def test_shards_hold_the_count_asked_for_and_an_index_that_says_so(written):
    root, out, printed = written
    assert sorted(path.name for path in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", INDEX_NAME]
    listed = list_shards(str(out), "train")
    assert [shard.samples for shard in listed.shards] == [10, 10, 4]
    assert [Path(shard.url) for shard in listed.shards] == [out / f"0000{i}.tar" for i in range(3)]
    assert listed.num_classes == 3 and listed.num_samples == READABLE
    assert json.loads((out / INDEX_NAME).read_text())["classes"] == list(CLASSES)
    assert f"wrote 3 shards, {READABLE} samples, 3 classes to {out} (shards.json)" in printed
    assert "1 .bmp pictures stored as PNG" in printed


def test_every_readable_file_is_stored_once_as_its_own_bytes_with_its_label_and_path(written):
    root, out, printed = written
    samples = samples_by_key(out)
    assert list(samples) == [f"{i:09d}" for i in range(READABLE)]  # consecutive, unique across shards
    stored_paths = []
    for sample in samples.values():
        origin = json.loads(sample["json"])
        stored_paths.append(origin["path"])
        content, label = sources(root)[origin["path"]]
        assert origin["class"] == CLASSES[label] and int(sample["cls"].decode()) == label
        (extension,) = set(sample) - {"cls", "json"}
        if origin["path"] == CONVERTED:  # a lossless PNG of the same pixels
            assert extension == "png"
            assert np.array_equal(np.asarray(Image.open(root / "train" / CONVERTED).convert("RGB")),
                                  np.asarray(Image.open(io.BytesIO(sample["png"]))))
        else:
            assert sample[extension] == content
            assert extension == {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}[
                Path(origin["path"]).suffix.lower()]
    assert sorted(stored_paths) == sorted(set(sources(root)) - {TRUNCATED})


def test_the_truncated_file_is_left_out_and_reported(written):
    root, out, printed = written
    truncated = sources(root)[TRUNCATED][0]
    assert all(truncated not in content for _, content in shard_members(out))
    assert f"1 unreadable files left out: {TRUNCATED} (" in printed


def test_members_carry_no_time_owner_or_user_names(written):
    _, out, _ = written
    for info, _ in shard_members(out):
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)


def test_the_order_is_shuffled_not_class_by_class(written):
    _, out, _ = written
    labels = [int(sample["cls"]) for sample in samples_by_key(out).values()]
    assert labels != sorted(labels)
    for start in range(0, READABLE, PER_SHARD):
        assert len(set(labels[start:start + PER_SHARD])) >= 2, labels


def test_the_same_seed_gives_identical_bytes_and_another_seed_another_order(written, tmp_path):
    root, out, _ = written
    again = tmp_path / "again"
    maescale_printed("write-shards", "--src", root, "--out", again, "--samples-per-shard", PER_SHARD,
                     "--workers", 2)  # other worker processes: the same bytes
    for name in ("00000.tar", "00001.tar", "00002.tar", INDEX_NAME):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other"
    write(root, other, "--seed", 1)
    order = [json.loads(sample["json"])["path"] for sample in samples_by_key(out).values()]
    other_order = [json.loads(sample["json"])["path"] for sample in samples_by_key(other).values()]
    assert other_order != order and sorted(other_order) == sorted(order)


def test_shard_reader_gives_the_samples_in_key_order_with_labels(written):
    _, out, _ = written
    expected = samples_by_key(out)
    read = []
    for shard in list_shards(str(out), "train").shards:
        with ShardReader(shard.url) as reader:
            read.extend(reader.samples())
        assert reader.ended_early is None
    assert [sample.name.rpartition("#")[2] for sample in read] == list(expected)
    for sample, members in zip(read, expected.values()):
        (extension,) = set(members) - {"cls", "json"}
        assert sample.data == members[extension] and sample.label == int(members["cls"])


def test_a_crash_midway_leaves_no_shard_a_listing_would_find(written, tmp_path, monkeypatch):
    """Killed while writing (the clean-up of a failed run disabled, as a kill skips it): only partial
    names remain, which no listing takes for shards, and no index."""
    root, _, _ = written
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 15:
            raise RuntimeError("killed")
        return original(*args)

    original = shard_writer.sample_members
    monkeypatch.setattr(shard_writer, "sample_members", failing)
    monkeypatch.setattr(shard_writer._ShardSet, "discard", lambda self: None)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="killed"):
        shard_writer.write_shards(root, out, samples_per_shard=PER_SHARD)
    assert sorted(path.name for path in out.iterdir()) == ["00000.tar.partial", "00001.tar.partial"]
    with pytest.raises(ValueError, match="no .tar shards"):
        list_shards(str(out), "train")


def refusal_cases(tmp_path: Path, root: Path) -> dict[str, tuple[list, str]]:
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("something else\n")
    arrays = tmp_path / "arrays"
    (arrays / "tiles").mkdir(parents=True)
    picture(1).save(arrays / "tiles" / "a.png")
    np.save(arrays / "tiles" / "b.npy", np.zeros((4, 4, 6), dtype=np.float32))
    new = tmp_path / "new"
    return {
        "non-empty out": (["--src", root, "--out", full], f"--out {full} is not empty"),
        "multi-channel files": (["--src", arrays, "--out", new], "1 multi-channel files (.tif/.tiff/.npy"),
        "missing src": (["--src", tmp_path / "nowhere", "--out", new], "--src "),
        "samples per shard": (["--src", root, "--out", new, "--samples-per-shard", 0],
                              "--samples-per-shard must be positive"),
    }


@pytest.mark.parametrize("case", ["non-empty out", "multi-channel files", "missing src", "samples per shard"])
def test_refusals_are_one_line_and_write_nothing(case, written, tmp_path):
    args, expected = refusal_cases(tmp_path, written[0])[case]
    result = run_maescale("write-shards", *args, ok=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("maescale write-shards: error: "), result.stderr[-2000:]
    assert expected in lines[0] and result.stdout == ""
    if case == "missing src":
        assert "image folder not found" in lines[0]
    assert not (tmp_path / "new").exists()
    assert sorted(path.name for path in (tmp_path / "full").iterdir()) == ["notes.txt"]
