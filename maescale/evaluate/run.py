"""What every evaluation command shares: processes, the run folder, metrics and printing."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from .. import checkpoint, parallel
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

    def resume(self, model, optimizer, root: Path, extra: dict | None = None) -> int:
        """The step to start from: 0, or that of the checkpoint `checkpoint.resume` names (for 'auto' the
        newest in `root`), loaded into `model`, `optimizer` and `extra`; this protocol's metric rows
        after it are dropped (a resumed run logs them again)."""
        if self.is_main:
            checkpoint.remove_partials(root)
        self.accelerator.wait_for_everyone()
        path = checkpoint.resolve_resume(self.cfg.checkpoint.resume, self.output_dir, root)
        step = 0 if path is None else int(checkpoint.load(model, optimizer, path, self.accelerator, extra)["step"])
        self.metrics.truncate_after(step, protocol=self.protocol)
        if path is not None:
            self.print(f"resumed from {path} at step {step}")
        return step

    def save_checkpoint(self, model, optimizer, step: int, root: Path, extra: dict | None = None) -> Path:
        return checkpoint.save(model, optimizer, {"step": step}, root, step, self.cfg.checkpoint.keep_last,
                               self.accelerator, extra=extra)

    def log(self, row: dict) -> None:
        self.metrics.log({"protocol": self.protocol, **row})

    def print(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def close(self) -> None:
        self.metrics.close()
