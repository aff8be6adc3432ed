"""The measurements of benchmarks/gpu_check.sh, one section per call (each in its own process).

    python benchmarks/gpu_suite.py sweep   --out DIR    # images/s per batch size; best batch per model
    python benchmarks/gpu_suite.py best    --out DIR    # at the best batch: plain eager vs compiled (whole, per block)
    python benchmarks/gpu_suite.py encoder --out DIR    # encoder-only vs mask tokens in the encoder
    python benchmarks/gpu_suite.py decode  --out DIR    # data.decode=gpu vs one CPU worker core, images/s

Every row goes to DIR/results.jsonl (with its section) and, as Markdown, to DIR/table.md.
`sweep` writes DIR/best_batch.json, which the later sections read. Defaults are the
bf16 ViT-B/L/H measurements; --models/--batch-sizes/--device let a test run it on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maescale.bench import (  # noqa: E402
    COMPARE_HEADER,
    COMPARE_RULE,
    TABLE_HEADER,
    TABLE_RULE,
    StepVariant,
    bench_train_step,
    compare_row,
    compare_variants,
    table_row,
)

PAPER_MODELS = ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]
BEST_BATCH_FILE = "best_batch.json"


def _emit(out: Path, section: str, rows: list[dict], header: str, rule: str, to_row) -> None:
    with (out / "results.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps({"section": section, **row}) + "\n")
    lines = [f"\n### {section}\n", header, rule, *map(to_row, rows)]
    with (out / "table.md").open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sweep(args: argparse.Namespace) -> None:
    """Eager bf16 step at each batch size; the batch with the most images/s is the model's best."""
    best: dict[str, int] = {}
    for model in args.models:
        rows = []
        for batch in args.batch_sizes:
            try:
                rows.append(bench_train_step(model, batch_size=batch, precision=args.precision, steps=args.steps,
                                             warmup=args.warmup, device=args.device))
            except torch.OutOfMemoryError:
                print(f"{model} batch {batch}: out of memory", flush=True)
                break  # larger batches will not fit either
            finally:
                _free_memory()
        if rows:
            best[model] = max(rows, key=lambda r: r["images_per_sec"])["batch_size"]
            _emit(args.out, f"sweep {model}", rows, TABLE_HEADER, TABLE_RULE, table_row)
    (args.out / BEST_BATCH_FILE).write_text(json.dumps(best, indent=1))


def _best_batches(args: argparse.Namespace) -> dict[str, int]:
    path = args.out / BEST_BATCH_FILE
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the sweep section first")
    return {model: batch for model, batch in json.loads(path.read_text()).items() if model in args.models}


def _compare(args, section: str, model: str, batch: int, variants: dict[str, StepVariant]) -> None:
    rows = compare_variants(model, variants, batch_size=batch, precision=args.precision, rounds=args.rounds,
                            steps_per_round=args.steps, warmup=args.warmup, device=args.device)
    _emit(args.out, section, rows, COMPARE_HEADER, COMPARE_RULE, compare_row)
    _free_memory()


def best(args: argparse.Namespace) -> None:
    """Plain step at the best batch: eager vs torch.compile of the whole model and of each block, interleaved."""
    variants = {"eager": StepVariant()}
    if args.compile:
        variants["compile"] = StepVariant(compile=True)
        variants["compile_blocks"] = StepVariant(compile_blocks=True)
    for model, batch in _best_batches(args).items():
        _compare(args, f"best batch {model}", model, batch, variants)


def encoder(args: argparse.Namespace) -> None:
    """Mask tokens in the encoder (reference) vs the MAE encoder on visible patches only."""
    for model in args.models:
        _compare(args, f"encoder {model}", model, args.encoder_batch,
                 {"mask_tokens_in_encoder": StepVariant(mask_tokens_in_encoder=True), "encoder_only": StepVariant()})


def write_photos(folder: Path, count: int) -> list[Path]:
    """``count`` photo-sized JPEGs (500 x 375, quality 90, ImageNet's typical size) in folder/photo/:
    smooth random colour fields with fine noise, so the entropy decoding has real work."""
    import numpy as np
    from PIL import Image

    (folder / "photo").mkdir(parents=True, exist_ok=True)
    paths = [folder / "photo" / f"{i:05d}.jpg" for i in range(count)]
    rng = np.random.default_rng(0)
    for path in paths:
        if not path.is_file():
            colours = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            coarse = Image.fromarray(colours).resize((500, 375), Image.BICUBIC)
            noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def decode(args: argparse.Namespace) -> None:
    """data.decode=gpu's path (batched decode, then crop, flip and normalise on the device) against
    what one DataLoader worker core does (Pillow decode and the same transform): images/s each."""
    import time

    from maescale.data.device_decode import DeviceDecoder, RawBatch, decode_device, file_tensor
    from maescale.data.folder import decode_rgb
    from maescale.data.transforms import MAETrainTransform

    paths = write_photos(args.jpegs, args.decode_images)
    files = [file_tensor(path.read_bytes()) for path in paths]
    transform = MAETrainTransform(224)
    device = torch.device(args.device) if args.device else decode_device()
    decoder = DeviceDecoder(transform, device)
    size = args.decode_batch
    batches = [RawBatch(files[i : i + size], torch.zeros(len(files[i : i + size]), dtype=torch.int64),
                        torch.arange(i, i + len(files[i : i + size])), ("",) * size, ())
               for i in range(0, len(files), size)]

    def device_pass() -> int:
        images = [decoder(batch).images for batch in batches]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return sum(len(i) for i in images)

    def worker_core_pass() -> int:
        for index, data in enumerate(files[: max(size, len(files) // 8)]):
            transform(decode_rgb(data.numpy().tobytes()), torch.Generator().manual_seed(index))
        return max(size, len(files) // 8)

    torch.set_num_threads(1)  # the worker path as one worker process runs it
    rows = []
    for name, run in ((f"data.decode=gpu ({device.type}, batch {size})", device_pass),
                      ("data.decode=cpu, one worker core", worker_core_pass)):
        run()  # warm-up: nvJPEG handles, file pages
        start = time.perf_counter()
        images = sum(run() for _ in range(args.rounds))
        rows.append({"path": name, "images": images, "images_per_s": images / (time.perf_counter() - start)})
    ratio = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    rows[0]["cpu_cores_matched"] = ratio
    _emit(args.out, "decode", rows, "| path | images/s | one worker core = 1 |", "| --- | ---: | ---: |",
          lambda r: f"| {r['path']} | {r['images_per_s']:.0f} | {r['images_per_s'] / rows[1]['images_per_s']:.1f}x |")


SECTIONS = {"sweep": sweep, "best": best, "encoder": encoder, "decode": decode}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=list(SECTIONS))
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--models", nargs="+", default=PAPER_MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 256, 512], help="sweep section")
    parser.add_argument("--encoder-batch", type=int, default=64,
                        help="encoder section (mask tokens need ~4x activations)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (per round when comparing)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds when comparing")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="best section: eager only")
    parser.add_argument("--jpegs", type=Path, default=Path("/tmp/maescale-photos"), help="decode section: JPEG folder")
    parser.add_argument("--decode-images", type=int, default=1024, help="decode section: JPEGs written and decoded")
    parser.add_argument("--decode-batch", type=int, default=256, help="decode section: images per batch")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    SECTIONS[args.section](args)


if __name__ == "__main__":
    main()
