"""Step checkpoints: atomic, keep-last-K, auto-resume. All file names live here.

A checkpoint is written into `checkpoints/.partial-step_XXXXXXXX/` and renamed
to `checkpoints/step_XXXXXXXX/` only once every process has finished writing,
so a crash during a save never leaves a complete-looking checkpoint behind;
`latest()` only ever sees renamed folders.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

CHECKPOINTS = "checkpoints"
STEP_PATTERN = re.compile(r"^step_(\d{8})$")
PARTIAL_PREFIX = ".partial-"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_PATTERN.match(p.name))]
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def remove_partials(root: Path) -> None:
    """Delete folders left by a save that was interrupted (main process only)."""
    if root.is_dir():
        for path in root.glob(PARTIAL_PREFIX + "*"):
            shutil.rmtree(path, ignore_errors=True)


def save(accelerator: Accelerator, root: Path, step: int, keep_last: int) -> Path:
    """Collectively write the accelerator state (model, optimizer, RNG, registered objects)."""
    final = root / step_name(step)
    partial = root / (PARTIAL_PREFIX + step_name(step))
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. interrupt right after a periodic save)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def prune(root: Path, keep_last: int) -> None:
    for _, path in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(setting: str, output_dir: str | Path) -> Path | None:
    """Which checkpoint to resume from: 'auto' (newest complete, if any), 'none', or a folder."""
    if setting == "none":
        return None
    if setting == "auto":
        return latest(checkpoint_root(output_dir))
    path = Path(setting)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint.resume={setting!r}: no such checkpoint folder")
    return path


def load(accelerator: Accelerator, path: Path) -> None:
    accelerator.load_state(str(path))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
