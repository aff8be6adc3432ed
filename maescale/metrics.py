"""Run metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TypeVar

T = TypeVar("T")

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

    def truncate_after(self, step: int, protocol: str | None = None) -> None:
        """Drop rows logged after `step` (of `protocol` only, when given): a resumed run re-logs them,
        identically."""
        if not self.enabled or not self.path.exists():
            return

        def kept_row(row: dict) -> bool:
            return row["step"] <= step or (protocol is not None and row.get("protocol") != protocol)

        kept = [line for line in self.path.read_text().splitlines() if line and kept_row(json.loads(line))]
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

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count: it is not training (e.g. a kNN check)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - start

    def rate(self) -> float:
        elapsed = time.perf_counter() - self._start
        value = self._images / elapsed if elapsed > 0 else 0.0
        self.reset()
        return value


class DataWait:
    """Host seconds per step spent blocked on the data, averaged over the window since the last `mean()` call.

    Only the `next()` of the iterator handed to `timed` is on the clock, so what the training loop
    does between two `next()` calls (the step, kNN checks, checkpoints, figures) never counts as
    waiting for data. On a GPU the step returns before its kernels finish, so part of a wait may
    overlap work still queued on the device: it bounds the device's idle time for data from above.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._seconds = 0.0
        self._steps = 0

    def timed(self, items: Iterator[T]) -> Iterator[T]:
        """`items`, unchanged, each `next()` timed."""
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            self._seconds += time.perf_counter() - start
            self._steps += 1
            yield item

    def mean(self) -> float:
        value = self._seconds / self._steps if self._steps else 0.0
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


def mae_train_flops_per_image(
    model,
    mask_ratio: float | None = None,
    *,
    mask_tokens_in_encoder: bool | None = None,
    include_recompute: bool = False,
) -> int:
    """Training FLOPs (forward + backward = 3x forward) per image of an MAE.

    Follows the accounting of Kaplan et al. 2020 / PaLM appendix B (6N per token for
    matmuls) applied per component: the patch embedding sees all L patches, the encoder
    sees the 1 + L*(1-r) visible tokens, the decoder all 1 + L tokens. For ViT-B/L/H at
    224 px and r = 0.75 this gives about 58.7, 124.5 and 291.4 GFLOP.

    `mask_tokens_in_encoder` (default: the model's setting) counts the encoder on all
    1 + L tokens, the paper's "w/ [M] in encoder" baseline. `include_recompute` adds the
    second forward pass of every block that activation checkpointing runs in the backward
    pass: hardware FLOPs rather than model FLOPs (PaLM appendix B), so MFU stays without it.
    """
    ratio = model.mask_ratio if mask_ratio is None else mask_ratio
    if mask_tokens_in_encoder is None:
        mask_tokens_in_encoder = getattr(model, "mask_tokens_in_encoder", False)
    num_patches = model.num_patches
    everything = 1 + num_patches
    encoded = everything if mask_tokens_in_encoder else 1 + int(num_patches * (1 - ratio))
    patch_dim = model.patch_size**2 * model.in_chans
    dim = model.cls_token.shape[-1]
    dec_dim = model.decoder_embed.out_features
    blocks = sum(_block_flops(encoded, dim, b.mlp.fc1.out_features) for b in model.blocks)
    blocks += sum(_block_flops(everything, dec_dim, b.mlp.fc1.out_features) for b in model.decoder_blocks)
    embed_and_predict = 2 * num_patches * patch_dim * dim + 2 * encoded * dim * dec_dim
    embed_and_predict += 2 * num_patches * dec_dim * patch_dim
    recompute = blocks if include_recompute else 0
    return 3 * (blocks + embed_and_predict) + recompute


# Dense fp32 peaks (no TF32; torch's default for fp32 matmuls) from the same datasheets.
PEAK_FP32_FLOPS = {
    "A100": 19.5e12,
    "H100": 67e12,
    "H200": 67e12,
}


def dense_peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of a known accelerator for `precision` ("bf16" or "fp32"); None when unknown."""
    if precision == "bf16":
        return device_peak_flops(device_name)
    return next((peak for key, peak in PEAK_FP32_FLOPS.items() if key in device_name), None)


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
