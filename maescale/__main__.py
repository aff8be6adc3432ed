"""`maescale` / `python -m maescale`: the command-line entry point.

Each subcommand parses its arguments, builds what it needs and runs; the work itself lives in
the modules (train.py, viz.py, interop.py, evaluate/, bench.py, data/ffcv_writer.py,
data/shard_writer.py). A user error (errors.USER_ERRORS) ends the command with one line,
`maescale <command>: error: ...`, and exit code 2; anything else is a defect and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from .config import describe_keys, load_config, required_extras
from .errors import USER_ERRORS, require_extra

USER_ERROR_EXIT = 2


# ---------------------------------------------------------------- console


def configure_console() -> None:
    """Notices as one `LEVEL: message` line each on stderr; Python warnings through the same path.

    Only maescale's own loggers report INFO; libraries keep their warnings and errors.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("maescale").setLevel(logging.INFO)
    warnings.formatwarning = _one_line_warning
    logging.captureWarnings(True)
    silence_uninformative_warnings()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # The default format adds the source line that raised the warning (e.g. `return func(*args,
    # **kwargs)` inside a library), which tells a user nothing: keep the message and its origin.
    return f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})"


def silence_uninformative_warnings() -> None:
    """Ignore third-party warnings that describe intended behaviour; each filter says why."""
    # torch.distributed.checkpoint on a single-process load (visualize, export, evaluation, a
    # one-process resume): loading in one process is exactly what is meant.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    # FSDP2 on every step: a Linear's 3-D output is a view of its 2-D matmul. The warning is about
    # in-place ops on such outputs, which maescale never does.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # DeepSpeed's ZeRO-3 gathers and reduces through torch's older collective names, several
    # times a step; the call sites are DeepSpeed's, nothing a user can change.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    # data.decode=gpu decodes with torchvision's decode_jpeg (nvJPEG), which torchvision 0.29 marks as
    # moving to torchcodec; it is the decoder present wherever torchvision is, and the warning asks
    # nothing of a user (the decoder is one function, data/device_decode.py: decode_pictures).
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
    logging.getLogger("torch.utils.cpp_extension").addFilter(_not_the_no_cuda_notice)


def _not_the_no_cuda_notice(record: logging.LogRecord) -> bool:
    """torch.compile on a machine without CUDA: inductor's C++ toolchain logs, once per process,
    that it found no CUDA runtime, which compiling for the CPU does not need. (A named function,
    so that calling `silence_uninformative_warnings` again adds no second filter.)"""
    return "No CUDA runtime is found" not in record.getMessage()


def check_extras(cfg) -> None:
    """The optional packages a config needs, imported now: a missing one is a user error up front."""
    for module, extra, needed_for in required_extras(cfg):
        require_extra(module, extra, needed_for)


# ---------------------------------------------------------------- commands


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_extras(cfg)
    from .train import pretrain

    summary = pretrain(cfg)
    print(f"finished at step {summary['step']}; checkpoint: {summary['checkpoint']}; figure: {summary['figure']}")
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']}: run the same command again to resume")
        return _stop_exit_code(summary["stopped_by"])
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from .viz import visualize

    path = visualize(args.config, args.overrides, ckpt=args.ckpt, out=args.out, images=args.images,
                     num_images=args.num_images, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .interop import export

    path = export(args.ckpt, args.out, fmt=args.format, config=args.config)
    print(f"wrote {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .hf_interop import import_hf
    from .interop import import_official

    if os.path.isdir(args.weights):
        path = import_hf(args.weights, args.out, config=args.config, model_name=args.model)
    elif args.model is None:
        raise ConfigError("--model is required for a weights file (a Hugging Face folder's config.json names it)")
    else:
        path = import_official(args.weights, args.model, args.out, config=args.config)
    print(f"wrote {path}\n  continue pretraining: maescale pretrain output_dir={args.out} [key=value ...]"
          f"\n  evaluate:             maescale linprobe encoder.ckpt={path} [key=value ...]")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate.config import EvalConfig

    cfg = load_config(args.config, args.overrides, schema=EvalConfig)
    check_extras(cfg)
    from .evaluate.finetune import finetune
    from .evaluate.knn import knn
    from .evaluate.linprobe import linprobe

    protocols = {"linprobe": linprobe, "knn": knn, "finetune": finetune}
    result = protocols[args.command](cfg)
    return _stop_exit_code(result.get("stopped_by")) if isinstance(result, dict) else 0


def _stop_exit_code(signal_name: str | None) -> int:
    """0, or 128 + the signal that stopped a run after its checkpoint (130 SIGINT, 143 SIGTERM, 138 SIGUSR1):
    what the Slurm scripts read to requeue."""
    return 128 + signal.Signals[signal_name].value if signal_name else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import TABLE_HEADER, TABLE_RULE, StepVariant, bench_train_step, table_row

    variant = StepVariant(
        attention=args.attention,
        compile=args.compile,
        fused_adamw=args.fused_adamw,
        activation_checkpointing=args.activation_checkpointing,
        mask_tokens_in_encoder=args.mask_tokens_in_encoder,
    )
    result = bench_train_step(
        args.model,
        batch_size=args.batch_size,
        precision=args.precision,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        variant=variant,
    )
    print(TABLE_HEADER, TABLE_RULE, table_row(result), sep="\n")
    return 0


def cmd_write_beton(args: argparse.Namespace) -> int:
    from .data.ffcv_writer import BetonOptions, write_beton

    options = BetonOptions(
        max_resolution=args.max_resolution,
        resize_side=args.resize_side,
        jpeg_quality=args.jpeg_quality,
        write_mode=args.write_mode,
        compress_probability=args.compress_probability,
        num_workers=args.workers,
    )
    summary = write_beton(args.src, args.out, options, subset=args.subset, split=args.split)
    for path, error in summary.skipped:
        logging.getLogger("maescale").warning("unreadable image %s skipped: %s", path, error)
    print(f"wrote {summary.out}: {summary.written} images, {len(summary.classes)} classes; "
          f"skipped {len(summary.skipped)} unreadable")
    return 0


def cmd_write_shards(args: argparse.Namespace) -> int:
    from .data.shard_writer import describe, write_shards

    summary = write_shards(args.src, args.out, split=args.split, samples_per_shard=args.samples_per_shard,
                           seed=args.seed, num_workers=args.workers)
    print(describe(summary))
    return 0


def cmd_index_shards(args: argparse.Namespace) -> int:
    from .data.tar_shards import list_shards, write_index

    shards = list_shards(args.shards, args.split)
    out = Path(args.out).expanduser()
    staging = write_index(out.with_name(out.name + ".partial"), shards.shards, shards.num_classes)
    staging.replace(out)
    print(f"wrote {out}: {len(shards.shards):,} shards, {shards.num_samples:,} samples, "
          f"{shards.num_classes or 'no'} classes (data.kind=shards data.path={out})")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .data.stats import default_stats_path, format_floats, measure_channel_stats, write_stats_file

    summary = measure_channel_stats(args.data_path, channels=args.channels, split=args.split,
                                    max_images=args.max_images, num_workers=args.workers)
    for path, error in summary.skipped:
        logging.getLogger("maescale").warning("unreadable image %s skipped: %s", path, error)
    print(f"{summary.images} images of {summary.root}, {args.channels} channels; skipped {len(summary.skipped)} "
          f"unreadable\ndata.mean={format_floats(summary.mean)} data.std={format_floats(summary.std)}")
    out = write_stats_file(summary, args.out or default_stats_path(args.data_path))
    print(f"wrote {out}" + ("" if args.out else f" (data.kind=folder runs on {args.data_path} read it)"))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .plan import (
        CPU_LOADER_IMAGES_PER_CORE,
        DEFAULT_HEADROOM,
        DEFAULT_LOADER_CORES_PER_GPU,
        DEFAULT_UTILISATION,
        Setup,
        data_feed,
        format_plan,
        format_sweep,
        lookup_gpu,
        plan,
        sweep,
    )
    from .train import model_from_config

    for flag, key in RETIRED_PLAN_FLAGS.items():
        if getattr(args, _retired_dest(flag)) is not None:
            raise ConfigError(f"{flag} is now the config key {key}: maescale plan [--config FILE] {key}=... "
                              "(the plan reads what pretrain reads)")
    cfg = load_config(args.config, args.overrides)
    if args.world_size < 1 or args.gpus_per_node < 1:
        raise ConfigError("--world-size and --gpus-per-node must be positive")
    nodes = max(1, args.world_size // args.gpus_per_node)
    setup = Setup.from_config(cfg, args.world_size, nodes)
    gpu = lookup_gpu(args.gpu, args.gpu_memory)
    mfu = DEFAULT_UTILISATION if args.mfu is None else args.mfu
    headroom = DEFAULT_HEADROOM if args.headroom is None else args.headroom
    if args.sweep:
        print(format_sweep(sweep(setup, gpu, mfu, headroom)))
        return 0
    import torch

    with torch.device("meta"):
        model = model_from_config(cfg)
    planned = plan(model, setup, gpu, mfu, headroom, name=cfg.model.name)
    loader_rate = CPU_LOADER_IMAGES_PER_CORE if args.loader_rate is None else args.loader_rate
    cores = DEFAULT_LOADER_CORES_PER_GPU if args.cores_per_gpu is None else args.cores_per_gpu
    print(format_plan(planned, data_feed(planned, loader_rate, cores, device_decode=cfg.data.decode == "gpu")))
    return 0


# ---------------------------------------------------------------- parsers, one per command


def _keys_epilog(schema=None) -> str:
    lines = ["config keys (set in the YAML file or as key=value overrides):"]
    for key, default, help_text in describe_keys(schema() if schema else None):
        lines.append(f"  {key} = {default!r}\n      {help_text}")
    return "\n".join(lines)


def _add_config_arguments(parser: argparse.ArgumentParser, examples: str = "configs/pretrain/") -> None:
    parser.add_argument("--config", help=f"YAML config file (see {examples})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotlist overrides, e.g. optim.blr=1e-4 train.max_steps=50")


def _add_pretrain_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain an MAE (resumes automatically from output_dir)",
        description="Pretrain an MAE. Defaults <- --config YAML <- key=value overrides.",
        epilog=_keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(p)
    p.set_defaults(func=cmd_pretrain)


def _add_visualize_parser(sub) -> None:
    p = sub.add_parser(
        "visualize",
        help="reconstruction figure from a checkpoint",
        description="Draw original | masked | reconstruction | reconstruction + visible for a few images.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint folder (output_dir/checkpoints/step_XXXXXXXX)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--images", help="folder of images, flat or with class subfolders; the first --num-images by path "
                   "(default: the config's dataset)")
    p.add_argument("--num-images", type=int, default=8, help="rows in the figure")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_visualize)


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as one ordinary file (or a Hugging Face folder)",
        description="Gather a (possibly sharded) checkpoint into one file with the official MAE key names: "
        "the full MAE (loadable with load_state_dict(strict=True) into build_model(name)) or the encoder for timm; "
        "or into a Hugging Face ViTMAEForPreTraining folder.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint folder (output_dir/checkpoints/step_XXXXXXXX)")
    p.add_argument("--format", choices=["consolidated", "timm", "release", "hf"], default="consolidated",
                   help="consolidated: full MAE, safetensors; timm: the encoder, safetensors that timm's "
                   "VisionTransformer(num_classes=0) loads strictly; release: full MAE as {'model': state_dict} "
                   "(.pth), the official layout; hf: full MAE as a folder (config.json, model.safetensors) that "
                   "transformers' ViTMAEForPreTraining.from_pretrained loads (transformers is not needed to write it)")
    p.add_argument("--out", required=True, help="file to write (.safetensors, or .pth for release; a folder for hf)")
    p.add_argument("--config", help="config of the run (default: the run's config.yaml)")
    p.set_defaults(func=cmd_export)


def _add_import_parser(sub) -> None:
    p = sub.add_parser(
        "import",
        help="turn an official MAE weights file or a Hugging Face ViTMAE folder into a maescale run",
        description="Read {'model': state_dict} (encoder only or encoder + decoder, official key names) or a Hugging "
        "Face ViTMAEForPreTraining folder (config.json and model.safetensors or pytorch_model.bin, transformers 4.x or "
        "5.x names) and write OUT/config.yaml and OUT/checkpoints/step_00000000: pretrain resumes from it, the "
        "evaluation commands read it.",
    )
    p.add_argument("--weights", required=True,
                   help="official .pth file (or a .safetensors of the same keys), or a ViTMAEForPreTraining folder")
    p.add_argument("--model", help="named MAE configuration of a weights file, e.g. mae_vit_base_patch16 "
                   "(a folder's config.json gives it)")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--config", help="pretraining config the run continues with (default: the built-in defaults)")
    p.set_defaults(func=cmd_import)


EVALUATIONS = (
    ("linprobe", "linear probe of the frozen encoder (BatchNorm + linear head, LARS): top-1 / top-5"),
    ("knn", "weighted kNN classification on the encoder's normalised features: top-1 / top-5"),
    ("finetune", "fine-tune the encoder end to end (layer decay, drop path, mixup/cutmix, label smoothing)"),
)


def _add_evaluation_parsers(sub) -> None:
    from .evaluate.config import EvalConfig

    for name, summary in EVALUATIONS:
        description = (f"{summary[0].upper()}{summary[1:]}. Defaults <- --config YAML <- key=value overrides; "
                       "results go to output_dir/metrics.jsonl and are printed.")
        p = sub.add_parser(name, help=summary, description=description, epilog=_keys_epilog(EvalConfig),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_arguments(p, "configs/eval/")
        p.set_defaults(func=cmd_evaluate)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="steady-state training throughput of one model step",
        description="Time forward + backward + AdamW of one process holding the whole model (every strategy's "
        "step on one GPU; bf16 by autocast) on random images, excluding warm-up steps.",
    )
    p.add_argument("--model", default="mae_vit_base_patch16", help="named MAE configuration")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--attention", choices=["sdpa", "explicit"], default="sdpa",
                   help="fused scaled_dot_product_attention or explicit softmax")
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True,
                   help="fused AdamW kernel (default, as optim.fused)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--mask-tokens-in-encoder", action="store_true",
                   help="the paper's baseline: the encoder also sees mask tokens")
    p.set_defaults(func=cmd_bench)


def _add_write_beton_parser(sub) -> None:
    p = sub.add_parser(
        "write-beton",
        help="convert an ImageNet-layout folder to an FFCV .beton file (for data.kind=ffcv)",
        description="Store <src>/<class>/*.jpg as an FFCV file with 'image' and 'label' fields (labels: sorted "
        "class folders). Unreadable or truncated images are reported and skipped. The same folder and options "
        "always give the same file.",
    )
    p.add_argument("--src", required=True, help="folder of class folders (or of split folders, with --split)")
    p.add_argument("--out", required=True, help="file to write, e.g. data/train.beton")
    p.add_argument("--split", default=None, help="use <src>/<split> (e.g. train or val) when present")
    p.add_argument("--max-resolution", type=int, default=256,
                   help="shrink images so that --resize-side is at most this many pixels")
    p.add_argument("--resize-side", choices=["short", "long"], default="short",
                   help="short: ImageNet-style short side (default); long: FFCV's own max-side rule")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of stored images")
    p.add_argument("--write-mode", choices=["jpg", "raw", "proportion"], default="jpg",
                   help="jpg: JPEG (small, fast decode); raw: pixels (large, no decode); proportion: JPEG for a "
                   "fraction of images")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="fraction stored as JPEG with --write-mode proportion")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes decoding and resizing images")
    p.add_argument("--subset", type=int, default=None,
                   help="only this many images, evenly spread over the sorted files (quick tries)")
    p.set_defaults(func=cmd_write_beton)


def _add_write_shards_parser(sub) -> None:
    p = sub.add_parser(
        "write-shards",
        help="write an ImageNet-layout folder as webdataset tar shards (for data.kind=shards)",
        description="Store the pictures of <src>/<class>/ (JPEG, PNG, WebP as their original bytes; .bmp as PNG) in "
        "<out>/00000.tar, 00001.tar, ... and index them in <out>/shards.json: per sample <key>.jpg|png|webp, "
        "<key>.cls (label: sorted class folders) and <key>.json (source path, class). Samples are written in a "
        "random order drawn from --seed, so every shard mixes the classes. Unreadable or truncated images are "
        "reported and left out. The same folder and options always give the same shards.",
    )
    p.add_argument("--src", required=True, help="folder of class folders (or of split folders, with --split)")
    p.add_argument("--out", required=True, help="new or empty folder to write, e.g. data/shards/train")
    p.add_argument("--split", default="train", help="use <src>/<split> when present (default: train)")
    p.add_argument("--samples-per-shard", type=int, default=1000,
                   help="samples per .tar file (the last may hold fewer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the samples are written in")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes reading and checking files (0: in this process); the shards do not depend on it")
    p.set_defaults(func=cmd_write_shards)


def _add_index_shards_parser(sub) -> None:
    p = sub.add_parser(
        "index-shards",
        help="count the samples of tar shards once and write their shard index (for data.kind=shards)",
        description="Read the tar headers of local shards (named as data.path names them for data.kind=shards) and "
        "write a shard index .json: webdataset's wids index of shard urls and sample counts, plus num_classes from "
        "the .cls members. data.path=<the index> then starts without every process counting the shards again "
        "(shards beside the index are named relative to it, others by their full path).",
    )
    p.add_argument("--shards", required=True, help="a folder of .tar shards, a brace pattern or a .txt list")
    p.add_argument("--out", required=True, help="the index file to write, e.g. /data/shards/train.json")
    p.add_argument("--split", default="train", help="what '{split}' in --shards stands for (default: train)")
    p.set_defaults(func=cmd_index_shards)


def _add_stats_parser(sub) -> None:
    p = sub.add_parser(
        "stats",
        help="measure the per-channel mean and std of an image folder (for data.mean / data.std)",
        description="Stream over the images of a data.kind=folder dataset (pictures, .tif/.tiff, .npy), print the "
        "per-channel mean and std of their pixels (pictures / 255, unsigned integer files / their type's maximum, "
        "other files as is) and write them to <data.path>/maescale_stats.yaml, which runs on that folder read when "
        "data.mean is unset. Unreadable files are reported and skipped.",
    )
    p.add_argument("--data.path", dest="data_path", required=True, metavar="ROOT",
                   help="dataset root, as data.path: <root>/<class>/<file> or <root>/<split>/<class>/<file>")
    p.add_argument("--channels", type=int, default=3, help="channels of the images (model.in_chans)")
    p.add_argument("--split", default="train", help="use <root>/<split> when present")
    p.add_argument("--max-images", type=int, default=None,
                   help="only this many images, evenly spread over the sorted files (default: all)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes reading files (0: read in this process)")
    p.add_argument("--out", default=None, help="YAML file to write (default: <data.path>/maescale_stats.yaml)")
    p.set_defaults(func=cmd_stats)


# Flags of earlier versions of `maescale plan`, refused with the config key that replaced them.
RETIRED_PLAN_FLAGS = {
    "--model": "model.name", "--strategy": "parallel.strategy", "--batch-size": "data.batch_size",
    "--precision": "train.precision", "--activation-checkpointing": "parallel.activation_checkpointing",
    "--replicate-degree": "parallel.replicate_degree", "--cpu-offload": "parallel.cpu_offload",
    "--blocks-per-unit": "parallel.blocks_per_unit", "--reshard-after-forward": "parallel.reshard_after_forward",
}


def _retired_dest(flag: str) -> str:
    return "retired_" + flag.strip("-").replace("-", "_")


def _add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict per-GPU memory, step time and the batches that fit, before launching",
        description="Simulate one training step's memory per GPU (weights, gradients, AdamW state, activations, "
        "all-gather and bucket buffers; the peak and when it happens) and its compute time at a stated MFU, for "
        "what `maescale pretrain` runs with the same config and overrides on --world-size GPUs. "
        "Predictions of allocated memory; checked against measurements in docs/BENCHMARKS.md.",
    )
    _add_config_arguments(p)
    p.add_argument("--world-size", type=int, default=8, help="GPUs in the job")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node (hsdp replicates across the nodes unless parallel.replicate_degree is set)")
    p.add_argument("--sweep", action="store_true", help="one table row for every named model instead")
    p.add_argument("--gpu", default="H100", help="H200, H100, A100-80GB or A100-40GB")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="memory of the GPU instead")
    p.add_argument("--mfu", type=float, default=None,
                   help="share of the peak FLOP/s reached (default 0.35: compiled ViT-L/H on an H200 measured "
                   "0.36-0.40, eager 0.27-0.33)")
    p.add_argument("--headroom", type=float, default=None,
                   help="share of GPU memory kept free for the CUDA context, NCCL and fragmentation (default 0.1)")
    p.add_argument("--loader-rate", type=float, default=None, metavar="IMAGES_PER_SECOND_PER_CORE",
                   help="images/s one CPU loader core delivers, set against the images/s the step consumes (default: "
                   "data.kind=folder's JPEGs at 224 px per worker, docs/BENCHMARKS.md; the data line prints it). "
                   "Measure it on your own data with `python benchmarks/loader.py --config RECIPE data.path=...`, "
                   "which prints images/s per worker")
    p.add_argument("--cores-per-gpu", type=int, default=None,
                   help="CPU cores one GPU's loader workers can use; a step needing more is data-bound (default 12: "
                   "a 96-core node's share per GPU with 8 GPUs, before the training processes take theirs)")
    for flag in RETIRED_PLAN_FLAGS:
        p.add_argument(flag, dest=_retired_dest(flag), nargs="?", const="", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_plan)


SUBCOMMAND_PARSERS = (
    _add_pretrain_parser,
    _add_visualize_parser,
    _add_export_parser,
    _add_import_parser,
    _add_evaluation_parsers,
    _add_bench_parser,
    _add_write_beton_parser,
    _add_write_shards_parser,
    _add_index_shards_parser,
    _add_stats_parser,
    _add_plan_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maescale", description="Masked Autoencoder pretraining for Vision Transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add_parser in SUBCOMMAND_PARSERS:
        add_parser(sub)
    return parser


def user_error_line(command: str, error: BaseException) -> str:
    """`maescale <command>: error: <message>` on one line, whatever the message holds."""
    message = " ".join(str(error).split()) or type(error).__name__
    return f"maescale {command}: error: {message}"


def main(argv: list[str] | None = None) -> int:
    configure_console()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(user_error_line(args.command, error), file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
