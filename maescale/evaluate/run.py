"""What every evaluation command shares: processes, the run folder, metrics and printing."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from .. import parallel
from ..config import save_resolved
from ..layout import Layout
from ..metrics import MetricsLogger
from .config import EvalConfig


class EvalRun:
    """Process group (through the same seam as pretraining), output folder and metrics of one command."""

    def __init__(self, cfg: EvalConfig, protocol: str, layout: Layout | None = None):
        self.cfg = cfg
        self.protocol = protocol
        # Feature extraction runs data parallel in fp32 over the launched processes; fine-tuning
        # brings the layout of its `parallel` section.
        self.layout = layout or Layout("ddp", parallel.launched_processes())
        self.accelerator = parallel.build_accelerator(self.layout, cfg.parallel.backend)
        self.output_dir = Path(cfg.output_dir)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.metrics = MetricsLogger(self.output_dir, enabled=self.is_main)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def save_config(self, derived: dict) -> None:
        if self.is_main:
            save_resolved(self.cfg, self.output_dir / f"{self.protocol}_config.yaml", derived)

    def log(self, row: dict) -> None:
        self.metrics.log({"protocol": self.protocol, **row})

    def print(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def close(self) -> None:
        self.metrics.close()
