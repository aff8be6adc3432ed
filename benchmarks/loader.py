"""Loader throughput: the FFCV pipeline vs torchvision ImageFolder + PIL, same photos, same work.

Both produce MAE training batches (random-resized crop to 224 px with scale 0.2-1 and
ratio 3/4-4/3, horizontal flip, normalised float32 [B, 3, 224, 224]) with the same
worker count and batch size; the maescale folder loader (kind=folder) is measured too.
Source: BSDS500 photographs (481x321) repeated with flips and JPEG qualities into
``--images`` distinct files; FFCV reads them from a .beton written by write-beton
(short side 256, JPEG q90). Reported per pipeline: images/s over one epoch after a
warm-up epoch, and CPU time per image (user + system of this process, its threads and
its worker processes), i.e. what each image costs in CPU cores.

    python benchmarks/loader.py --images 3000 --workers 2 --batch-size 64
"""

from __future__ import annotations

import argparse
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
BSDS = REPO.parent / "shared" / "data" / "bsds500-jpeg.tar.gz"
IMG_SIZE = 224


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
    """User + system CPU time of this process (all threads) and its reaped children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_epoch(batches) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of iterating ``batches`` to the end."""
    wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
    for batch in batches:
        images += len(batch[0])
    return images, time.perf_counter() - wall, cpu_seconds() - cpu


def torchvision_epochs(folder: Path, workers: int, batch_size: int):
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(IMG_SIZE, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    # Worker processes end with each epoch, so their CPU time is counted (RUSAGE_CHILDREN).
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True)
    return lambda epoch: iter(loader)


def maescale_loader_epochs(data_cfg, workers: int, batch_size: int):
    from dataclasses import replace

    from maescale.data import build_loader

    loader = build_loader(replace(data_cfg, batch_size=batch_size, num_workers=workers), img_size=IMG_SIZE, seed=0)
    return lambda epoch: loader.epoch(epoch)


def measure(name: str, epochs, rows: list) -> None:
    epochs_iter = epochs(0)
    timed_epoch(epochs_iter)  # warm-up: FFCV compiles its pipeline, file pages get cached
    images, wall, cpu = timed_epoch(epochs(1))
    rows.append((name, images / wall, 1000 * cpu / images))
    print(f"{name}: {images} images in {wall:.1f} s, {images / wall:.0f} img/s, "
          f"{1000 * cpu / images:.2f} CPU-ms/img", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bsds", type=Path, default=BSDS, help="bsds500-jpeg.tar.gz")
    parser.add_argument("--skip-folder", action="store_true", help="leave out the maescale folder loader")
    args = parser.parse_args()
    from maescale.config import DataConfig
    from maescale.data.ffcv_writer import BetonOptions, write_beton

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        folder = make_photo_folder(args.bsds, Path(tmp), args.images)
        beton = Path(tmp) / "photos.beton"
        start = time.perf_counter()
        write_beton(folder, beton, BetonOptions(max_resolution=256, jpeg_quality=90, num_workers=args.workers))
        print(f"write-beton: {args.images} images in {time.perf_counter() - start:.1f} s, "
              f"{beton.stat().st_size / 2**20:.0f} MiB")
        rows: list = []
        # FFCV's first: its threads finish with the epoch, before any worker process exists.
        measure("FFCV (maescale data.kind=ffcv)",
                maescale_loader_epochs(DataConfig(kind="ffcv", path=str(beton)), args.workers, args.batch_size), rows)
        measure("torchvision ImageFolder + PIL", torchvision_epochs(folder, args.workers, args.batch_size), rows)
        if not args.skip_folder:
            measure("maescale data.kind=folder (PIL decode, bicubic v2)",
                    maescale_loader_epochs(DataConfig(kind="folder", path=str(folder)), args.workers, args.batch_size),
                    rows)
    reference = rows[1]
    print(f"\n{args.images} images, batch {args.batch_size}, {args.workers} workers, {IMG_SIZE} px crops\n")
    print("| pipeline | images/s | CPU ms / image | images/s per core vs torchvision |")
    print("| --- | ---: | ---: | ---: |")
    for name, rate, cpu_ms in rows:
        print(f"| {name} | {rate:.0f} | {cpu_ms:.2f} | {reference[2] / cpu_ms:.1f}x |")


if __name__ == "__main__":
    main()
