"""Run metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Writes metric rows from the main process only (others get a no-op logger)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step`: a resumed run re-logs them, identically."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {"time": time.time(), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key not in ("step", "time", "epoch") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class Throughput:
    """Images per second over the window since the last `rate()` call."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._start = time.perf_counter()
        self._images = 0

    def add(self, images: int) -> None:
        self._images += images

    def rate(self) -> float:
        elapsed = time.perf_counter() - self._start
        value = self._images / elapsed if elapsed > 0 else 0.0
        self.reset()
        return value


# ---------------------------------------------------------------- FLOPs and MFU

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, no sparsity).
PEAK_BF16_FLOPS = {
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def _block_flops(tokens: int, dim: int, mlp_hidden: int) -> int:
    """Forward FLOPs of one pre-norm transformer block on `tokens` tokens.

    Matmuls only (2 FLOPs per multiply-add): qkv 3*D*D, proj D*D, MLP 2*D*H per token,
    plus attention scores and weighted sum 2 * T*T*D; norms and softmax are negligible.
    """
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * mlp_hidden)
    attention = 2 * 2 * tokens * tokens * dim
    return linear + attention


def mae_train_flops_per_image(model, mask_ratio: float | None = None) -> int:
    """Training FLOPs (forward + backward = 3x forward) per image of an MAE.

    Follows the accounting of Kaplan et al. 2020 / PaLM appendix B (6N per token for
    matmuls) applied per component: the patch embedding sees all L patches, the encoder
    sees the 1 + L*(1-r) visible tokens, the decoder all 1 + L tokens. For ViT-B/L/H at
    224 px and r = 0.75 this gives about 58.7, 124.5 and 291.4 GFLOP.
    """
    ratio = model.mask_ratio if mask_ratio is None else mask_ratio
    num_patches = model.num_patches
    visible = 1 + int(num_patches * (1 - ratio))
    everything = 1 + num_patches
    patch_dim = model.patch_size**2 * model.in_chans
    dim = model.cls_token.shape[-1]
    dec_dim = model.decoder_embed.out_features
    forward = 2 * num_patches * patch_dim * dim
    forward += sum(_block_flops(visible, dim, b.mlp.fc1.out_features) for b in model.blocks)
    forward += 2 * visible * dim * dec_dim
    forward += sum(_block_flops(everything, dec_dim, b.mlp.fc1.out_features) for b in model.decoder_blocks)
    forward += 2 * num_patches * dec_dim * patch_dim
    return 3 * forward


def accelerator_peak_flops(device, precision: str) -> float | None:
    """Peak FLOP/s that MFU is measured against: the bf16 peak of a known GPU for bf16 runs, else None."""
    if device.type != "cuda" or precision != "bf16":
        return None
    import torch

    return device_peak_flops(torch.cuda.get_device_name(device))


def peak_memory_gib(device) -> float:
    """Peak memory of this process so far: allocated CUDA memory on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def device_peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of a known accelerator, matched by name; None when unknown (e.g. CPU)."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return peak
    return None
