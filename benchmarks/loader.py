"""Loader benchmark: what an MAE training image costs each of maescale's loaders, side by side.

Comparison (default). BSDS500 photographs (481x321), repeated with flips and JPEG qualities into
``--images`` distinct JPEG files, read as MAE training batches (random-resized crop to 224 px with
scale 0.2-1, flip, normalise: float32 [B, 3, 224, 224]), the same batch size and worker count for all:

  torchvision ImageFolder + PIL      the reference pipeline (MAE's own code)
  folder                             data.kind=folder: the reference of the ratios
  ffcv                               data.kind=ffcv from a .beton of write_beton (short side 256, JPEG q90),
                                     when ffcv imports
  shards                             data.kind=shards from tar shards of write_shards (the original files)
  shards / folder, decode=gpu        data.decode=gpu: workers read bytes, the main process decodes
                                     (torchvision) and augments; without a GPU that is its CPU cost,
                                     not its GPU speed

each (but the first) built by maescale's build_loader. After a warm-up epoch of each, --rounds
rounds each read one epoch of every variant, in a changing order; reported per variant, the median
over rounds of images/s and of CPU ms per image: user + system time of this process, its threads
(FFCV's) and its worker processes. Images/s depends on what else the machine runs; CPU time does
not, so images/s per core = 1000 / CPU ms per image is the number to compare, and the one
`maescale plan --loader-rate` takes. The main process runs torch on one thread, so every variant's
work is counted per core.

Then, when webdataset imports: the same shards read by webdataset.WebDataset and by maescale's
ShardReader (Python's tarfile), interleaved: (a) every sample's bytes, (b) reaching the middle
sample of each shard, as a resumed epoch does (ShardReader seeks over the first half's data,
webdataset streams through it); ms per shard. webdataset is not a maescale dependency.

Own data. ``--config RECIPE [key=value ...]`` builds the training loader as pretraining does (the
config's data section, the model's crop size) and times --batches batches after 5 warm-up ones.

    python benchmarks/loader.py --images 1000 --workers 2 --batch-size 64 --rounds 3 --out results.jsonl
    python benchmarks/loader.py --config configs/pretrain/vit_b.yaml data.kind=shards \\
        'data.path=/data/{00000..00099}.tar' data.num_workers=8
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
BSDS = REPO.parent / "shared" / "data" / "bsds500-jpeg.tar.gz"
IMG_SIZE = 224
SAMPLES_PER_SHARD = 256
REFERENCE = "folder"
WARMUP_BATCHES = 5
TAR_ROUNDS = 7  # a pass over the shards takes well under a second: more rounds steady the median

Epochs = Callable[[int], Iterator]  # epoch number -> its batches


# ---------------------------------------------------------------- data and clocks


def make_photo_folder(archive: Path, root: Path, count: int) -> Path:
    """``count`` JPEG files under ``root/photos/photo/`` made from the BSDS500 photographs."""
    folder = root / "photos" / "photo"
    folder.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
        photos = [Image.open(tar.extractfile(m)).convert("RGB") for m in members]
    for i in range(count):
        photo, variant = photos[i % len(photos)], i // len(photos)
        if variant % 2:
            photo = ImageOps.mirror(photo)
        photo.save(folder / f"{i:06d}.jpg", quality=90 - variant % 5)
    return folder.parent


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads), its reaped children and its live ones.

    The live ones count because --config stops mid-epoch, its workers still running; a worker moves
    from the live sum to RUSAGE_CHILDREN when reaped (at an epoch's end), so none counts twice."""
    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # ended since it was listed
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def timed(batches: Iterator) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of iterating ``batches`` to the end."""
    wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
    for batch in batches:
        images += len(batch[0])
    return images, time.perf_counter() - wall, cpu_seconds() - cpu


@dataclass
class Rate:
    name: str
    images_per_s: float
    cpu_ms_per_image: float

    @property
    def per_core(self) -> float:
        """Images/s one fully busy core delivers."""
        return 1000 / self.cpu_ms_per_image


# ---------------------------------------------------------------- the variants


def torchvision_epochs(folder: Path, workers: int, batch_size: int) -> Epochs:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(IMG_SIZE, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True)
    return lambda epoch: iter(loader)


def maescale_epochs(data_cfg) -> Epochs:
    from maescale.data import build_loader

    return build_loader(data_cfg, img_size=IMG_SIZE, seed=0).epoch


def comparison_variants(work: Path, args: argparse.Namespace) -> tuple[list[tuple[str, Epochs]], Path]:
    """The variants by name, and the shard folder (for the tar reading part)."""
    from maescale.config import DataConfig
    from maescale.data.ffcv_compat import INSTALL_HINT, ffcv_available
    from maescale.data.shard_writer import write_shards

    folder = make_photo_folder(args.bsds, work, args.images)
    shards = work / "shards"
    start = time.perf_counter()
    write_shards(folder, shards, samples_per_shard=SAMPLES_PER_SHARD, num_workers=args.workers)
    print(f"write_shards: {args.images} images in {time.perf_counter() - start:.1f} s, "
          f"{sum(f.stat().st_size for f in shards.glob('*.tar')) / 2**20:.0f} MiB", flush=True)

    def kind(**data) -> Epochs:
        return maescale_epochs(DataConfig(batch_size=args.batch_size, num_workers=args.workers, **data))

    on = "GPU" if torch.cuda.is_available() else "CPU"
    variants = [("torchvision ImageFolder + PIL", torchvision_epochs(folder, args.workers, args.batch_size)),
                (REFERENCE, kind(kind="folder", path=str(folder)))]
    if ffcv_available():
        variants.append(("ffcv", kind(kind="ffcv", path=str(write_ffcv(folder, work, args.workers)))))
    else:
        print(f"ffcv: left out, `import ffcv` fails here. {INSTALL_HINT}")
    variants += [("shards", kind(kind="shards", path=str(shards))),
                 (f"shards, decode=gpu (on {on})", kind(kind="shards", path=str(shards), decode="gpu")),
                 (f"folder, decode=gpu (on {on})", kind(kind="folder", path=str(folder), decode="gpu"))]
    return variants, shards


def write_ffcv(folder: Path, work: Path, workers: int) -> Path:
    from maescale.data.ffcv_writer import BetonOptions, write_beton

    beton = work / "photos.beton"
    start = time.perf_counter()
    write_beton(folder, beton, BetonOptions(max_resolution=256, jpeg_quality=90, num_workers=workers))
    print(f"write_beton: in {time.perf_counter() - start:.1f} s, {beton.stat().st_size / 2**20:.0f} MiB", flush=True)
    return beton


# ---------------------------------------------------------------- comparison mode


def interleaved(variants: list[tuple[str, Epochs]], rounds: int) -> list[Rate]:
    """Median rates over ``rounds`` rounds of one epoch per variant: a load that comes and goes on a
    shared machine then falls on every variant alike."""
    for _, epochs in variants:
        timed(epochs(0))  # warm-up: FFCV compiles its pipeline, file pages get cached
    runs: dict[str, list[tuple[int, float, float]]] = {name: [] for name, _ in variants}
    for round_ in range(rounds):
        # Rotated, and reversed every other round: no variant always runs first, or always after the
        # same one (whose leftovers, caches it evicted or threads still winding down, it would pay).
        shift = round_ % len(variants)
        order = variants[shift:] + variants[:shift]
        for name, epochs in reversed(order) if round_ % 2 else order:
            images, wall, cpu = timed(epochs(1 + round_))
            runs[name].append((images, wall, cpu))
            print(f"round {round_ + 1}, {name}: {images} images in {wall:.1f} s, {images / wall:.0f} img/s, "
                  f"{1000 * cpu / images:.2f} CPU-ms/img", flush=True)
    return [Rate(name, statistics.median(i / w for i, w, _ in run), statistics.median(1000 * c / i for i, _, c in run))
            for name, run in runs.items()]


def print_comparison(rates: list[Rate], args: argparse.Namespace, load: tuple[float, float]) -> None:
    reference = next(rate for rate in rates if rate.name == REFERENCE)
    print(f"\n{args.images} images, batch {args.batch_size}, {args.workers} workers, {IMG_SIZE} px crops, "
          f"median of {args.rounds} rounds; {os.cpu_count()} CPUs, load average {load[0]:.1f} at the start, "
          f"{load[1]:.1f} at the end\n")
    print("| variant | images/s | CPU ms / image | images/s per core | per core vs folder | images/s vs folder |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for rate in rates:
        print(f"| {rate.name} | {rate.images_per_s:.0f} | {rate.cpu_ms_per_image:.2f} | {rate.per_core:.0f} | "
              f"{rate.per_core / reference.per_core:.2f}x | {rate.images_per_s / reference.images_per_s:.2f}x |")


def append_jsonl(path: Path | None, rows: list[dict]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for row in rows:
            out.write(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine_cpus": os.cpu_count(), **row}) + "\n")


def rate_rows(rates: list[Rate], **common) -> list[dict]:
    return [dict(common, variant=r.name, images_per_s=round(r.images_per_s, 1),
                 cpu_ms_per_image=round(r.cpu_ms_per_image, 3), images_per_core_s=round(r.per_core, 1)) for r in rates]


# ---------------------------------------------------------------- webdataset vs tarfile


def tar_reading(shard_folder: Path) -> list[dict]:
    """ms per shard of webdataset and ShardReader, reading every sample and reaching the middle one."""
    try:
        import webdataset
    except ImportError as error:
        print(f"\nwebdataset vs tarfile: left out, webdataset does not import ({error}); "
              f"`pip install webdataset` to measure it")
        return []
    from maescale.data.tar_shards import ShardReader, list_shards

    shards = list_shards(str(shard_folder), "train").shards

    def wds_all() -> None:
        for _ in webdataset.WebDataset([s.url for s in shards], shardshuffle=False):
            pass

    def reader_all() -> None:
        for shard in shards:
            with ShardReader(shard.url) as reader:
                for _ in reader.samples():
                    pass

    def wds_middle() -> None:
        for shard in shards:
            samples = iter(webdataset.WebDataset(shard.url, shardshuffle=False))
            for _ in itertools.islice(samples, shard.samples // 2 + 1):  # through the first half, to the middle one
                pass
            samples.close()

    def reader_middle() -> None:
        for shard in shards:
            half = shard.samples // 2
            with ShardReader(shard.url) as reader:  # the first half passed over: headers only
                next(itertools.islice(reader.samples(read=lambda ordinal, half=half: ordinal >= half), half, None))

    passes = {("every sample's bytes", "webdataset"): wds_all, ("every sample's bytes", "ShardReader"): reader_all,
              ("reach the middle sample", "webdataset"): wds_middle,
              ("reach the middle sample", "ShardReader"): reader_middle}
    for run in passes.values():
        run()  # warm-up: imports, file pages
    times: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in passes}
    for _ in range(TAR_ROUNDS):
        for key, run in passes.items():
            # process_time: all of it runs in this process; cpu_seconds' child scan would cost ms here
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    return print_tar_reading(times, len(shards), sum(s.samples for s in shards))


def print_tar_reading(times: dict, shards: int, samples: int) -> list[dict]:
    ms = {key: (1000 * statistics.median(w for w, _ in t) / shards, 1000 * statistics.median(c for _, c in t) / shards)
          for key, t in times.items()}
    print(f"\nwebdataset vs ShardReader (tarfile): {shards} shards, {samples} samples, median of {TAR_ROUNDS} rounds\n")
    print("| read | webdataset ms / shard | ShardReader ms / shard | webdataset / ShardReader "
          "| CPU ms / shard (webdataset, ShardReader) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = []
    for what in dict.fromkeys(what for what, _ in ms):
        (wds, wds_cpu), (own, own_cpu) = ms[(what, "webdataset")], ms[(what, "ShardReader")]
        print(f"| {what} | {wds:.1f} | {own:.1f} | {wds / own:.1f}x | {wds_cpu:.1f}, {own_cpu:.1f} |")
        rows += [{"variant": f"tar read, {what}: {reader}", "shards": shards, "samples": samples,
                  "ms_per_shard": round(ms[(what, reader)][0], 2), "cpu_ms_per_shard": round(ms[(what, reader)][1], 2)}
                 for reader in ("webdataset", "ShardReader")]
    return rows


# ---------------------------------------------------------------- own data


def own_data(args: argparse.Namespace) -> None:
    """Time --batches batches of the loader pretraining builds from the config."""
    from maescale.config import load_config
    from maescale.data import build_loader
    from maescale.train import model_from_config

    cfg = load_config(args.config, args.overrides)
    with torch.device("meta"):  # the model's crop size, read as the trainer reads it, without weights
        img_size = model_from_config(cfg).img_size
    loader = build_loader(cfg.data, img_size=img_size, in_chans=cfg.model.in_chans, seed=cfg.seed, train=True)
    batches = (batch for epoch in itertools.count() for batch in loader.epoch(epoch))
    for _ in range(WARMUP_BATCHES):  # workers start, the first files are opened
        next(batches)
    images, wall, cpu = timed(itertools.islice(batches, args.batches))
    batches.close()
    data, workers = cfg.data, max(1, cfg.data.num_workers)
    rate = Rate(f"{data.kind}, decode={data.decode}", images / wall, 1000 * cpu / images)
    print(f"data.kind={data.kind} decode={data.decode} data.path={data.path}: {img_size[0]}x{img_size[1]} crops, "
          f"batch {data.batch_size}, {data.num_workers} workers; {images} images ({args.batches} batches after "
          f"{WARMUP_BATCHES} warm-up) in {wall:.1f} s; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| images/s | CPU ms / image | images/s per worker | images/s per core |")
    print("| ---: | ---: | ---: | ---: |")
    print(f"| {rate.images_per_s:.0f} | {rate.cpu_ms_per_image:.2f} | {rate.images_per_s / workers:.0f} | "
          f"{rate.per_core:.0f} |")
    overrides = "".join(f" {item}" for item in args.overrides)
    print(f"\nmaescale plan --config {args.config}{overrides} --loader-rate {rate.per_core:.0f}  (images/s per core; "
          f"per worker is lower when the workers do not each have a core to themselves)")
    append_jsonl(args.out, rate_rows([rate], mode="config", config=str(args.config), path=data.path, images=images,
                                     workers=data.num_workers, batch=data.batch_size))


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="own data: a pretraining recipe, then key=value overrides")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (with --config)")
    parser.add_argument("--batches", type=int, default=50, help="own data: batches timed")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bsds", type=Path, default=BSDS, help="bsds500-jpeg.tar.gz")
    parser.add_argument("--workdir", type=Path, help="write the photos, shards and .beton here and keep them "
                        "(a new folder; default: a temporary one)")
    parser.add_argument("--out", type=Path, help="append one JSON line per variant to this file")
    args = parser.parse_args()
    if args.overrides and args.config is None:
        parser.error(f"key=value overrides need --config: {args.overrides}")
    # One intra-op thread: the CPU time of the decode=gpu path (main process) and of the batch
    # hand-over is then its own work, not idle threads spinning, as in the worker processes.
    torch.set_num_threads(1)
    if args.config is not None:
        own_data(args)
        return
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        work = args.workdir or Path(tmp)
        variants, shards = comparison_variants(work, args)
        load_start = os.getloadavg()[0]
        rates = interleaved(variants, args.rounds)
        print_comparison(rates, args, (load_start, os.getloadavg()[0]))
        common = dict(mode="comparison", images=args.images, workers=args.workers, batch=args.batch_size,
                      rounds=args.rounds)
        append_jsonl(args.out, rate_rows(rates, **common))
        append_jsonl(args.out, tar_reading(shards))


if __name__ == "__main__":
    main()
