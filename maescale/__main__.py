"""`maescale` / `python -m maescale`: the command-line entry point.

Each subcommand parses its arguments, builds what it needs and runs; the work
itself lives in the modules (train.py, viz.py, bench.py).
"""

from __future__ import annotations

import argparse
import signal
import sys

from .config import ConfigError, describe_keys, load_config


def _keys_epilog() -> str:
    lines = ["config keys (set in the YAML file or as key=value overrides):"]
    for key, default, help_text in describe_keys():
        lines.append(f"  {key} = {default!r}\n      {help_text}")
    return "\n".join(lines)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/pretrain/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. optim.blr=1e-4 train.max_steps=50")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train import pretrain

    cfg = load_config(args.config, args.overrides)
    summary = pretrain(cfg)
    print(f"finished at step {summary['step']}; checkpoint: {summary['checkpoint']}; figure: {summary['figure']}")
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']}: run the same command again to resume")
        return 128 + signal.Signals[summary["stopped_by"]].value  # 130 SIGINT, 143 SIGTERM, 138 SIGUSR1
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from .visualize import visualize

    path = visualize(args.config, args.overrides, ckpt=args.ckpt, out=args.out, images=args.images, num_images=args.num_images, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_consolidated

    path = export_consolidated(args.ckpt, args.out, config=args.config)
    print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import TABLE_HEADER, TABLE_RULE, bench_train_step, table_row

    result = bench_train_step(
        args.model,
        batch_size=args.batch_size,
        precision=args.precision,
        compile=args.compile,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
    )
    print(TABLE_HEADER, TABLE_RULE, table_row(result), sep="\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maescale", description="Masked Autoencoder pretraining for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser(
        "pretrain",
        help="pretrain an MAE (resumes automatically from output_dir)",
        description="Pretrain an MAE. Defaults <- --config YAML <- key=value overrides.",
        epilog=_keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "visualize",
        help="reconstruction figure from a checkpoint",
        description="Draw original | masked | reconstruction | reconstruction + visible for a few images.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint folder (output_dir/checkpoints/step_XXXXXXXX)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--images", help="folder of images (default: the config's dataset)")
    p.add_argument("--num-images", type=int, default=8, help="rows in the figure")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as one ordinary file",
        description="Gather a (possibly sharded) checkpoint into one safetensors file of the full MAE "
        "(official key names), loadable with load_state_dict(strict=True) into build_model(name).",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint folder (output_dir/checkpoints/step_XXXXXXXX)")
    p.add_argument("--format", choices=["consolidated"], default="consolidated", help="output format")
    p.add_argument("--out", required=True, help="file to write (.safetensors)")
    p.add_argument("--config", help="config of the run (default: the run's config.yaml)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "bench",
        help="steady-state training throughput of one model step",
        description="Time forward + backward + AdamW on random images, excluding warm-up steps.",
    )
    p.add_argument("--model", default="mae_vit_base_patch16", help="named MAE configuration")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"maescale {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
