"""Per-process bytes of parameters, gradients and optimizer state for each strategy.

    torchrun --nproc_per_node 2 benchmarks/memory.py --model mae_vit_base_patch16 --strategies ddp fsdp2

Builds the model exactly as the trainer does (maescale.parallel), runs one AdamW step on
one image per process, then counts the bytes each process stores (DTensor shards count
their local part). Rank 0 prints a Markdown table with the per-rank maximum.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maescale import parallel  # noqa: E402
from maescale.config import load_config  # noqa: E402
from maescale.models import build_model  # noqa: E402
from maescale.optim import build_optimizer  # noqa: E402


def local_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def measure(model_name: str, strategy: str) -> dict[str, int]:
    cfg = load_config(None, [f"model.name={model_name}", f"parallel.strategy={strategy}"])
    accelerator = parallel.build_accelerator(cfg)
    torch.manual_seed(0)
    model = parallel.parallelize(build_model(model_name), cfg, accelerator)
    optimizer = build_optimizer(model, cfg, lr=1e-4)
    model, optimizer = parallel.prepare(model, optimizer, cfg, accelerator)
    size = cfg_img_size(model_name)
    images = torch.randn(1, 3, size, size)
    loss, _, _ = model(images)
    loss.backward()
    optimizer.step()
    params = list(model.parameters())
    counts = {
        "parameters": sum(local_bytes(p) for p in params),
        "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    counts["total"] = sum(counts.values())
    return {k: max_over_ranks(v) for k, v in counts.items()}


def cfg_img_size(model_name: str) -> int:
    with torch.device("meta"):
        return build_model(model_name).img_size


def max_over_ranks(value: int) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16")
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp2"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [(strategy, measure(args.model, strategy)) for strategy in args.strategies]
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(f"{args.model}, {world} processes, fp32 AdamW; MiB per process (max over ranks)\n")
        print("| strategy | parameters | gradients | optimizer state | total | vs ddp |")
        print("|---|---|---|---|---|---|")
        base = rows[0][1]["total"]
        for strategy, c in rows:
            mib = {k: v / 2**20 for k, v in c.items()}
            print(f"| {strategy} | {mib['parameters']:.1f} | {mib['gradients']:.1f} | {mib['optimizer']:.1f} | "
                  f"{mib['total']:.1f} | {c['total'] / base:.2f} |")


if __name__ == "__main__":
    main()
