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
