"""Step checkpoints: atomic, keep-last-K, auto-resume. All file names live here.

A checkpoint is written into `checkpoints/.partial-step_XXXXXXXX/` and renamed
to `checkpoints/step_XXXXXXXX/` only once every process has finished writing,
so a crash during a save never leaves a complete-looking checkpoint behind;
`latest()` only ever sees renamed folders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .errors import CheckpointError
from .parallel import is_deepspeed

# What a failed read or write can raise; torch.distributed.checkpoint's error derives from
# BaseException, so `except Exception` alone would let it through.
LIBRARY_ERRORS = (Exception, CheckpointException)

CHECKPOINTS = "checkpoints"
STEP_PATTERN = re.compile(r"^step_(\d{8})$")
PARTIAL_PREFIX = ".partial-"
TRAIN_STATE = "train_state.json"
DCP_METADATA = ".metadata"  # written last by torch.distributed.checkpoint
DEEPSPEED_FOLDER = "pytorch_model"  # where Accelerate puts DeepSpeed's ZeRO checkpoint


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


def save(
    model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict, root: Path, step: int, keep_last: int,
    accelerator: Accelerator,
) -> Path:
    """Collectively write model + optimizer and the train state.

    DDP and FSDP2 use torch.distributed.checkpoint, which stores every tensor under its fully
    qualified name with its global shape: the checkpoint resumes under DDP, FSDP2 or one
    process, on any number of processes. DeepSpeed writes its own ZeRO format (through
    Accelerate), which resumes on the same number of processes.
    """
    is_main = _rank() == 0
    final = root / step_name(step)
    partial = root / (PARTIAL_PREFIX + step_name(step))
    try:
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        if is_deepspeed(accelerator):
            accelerator.save_state(str(partial))
        else:
            dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(partial))
        if is_main:
            written_by = {"world_size": accelerator.num_processes, "deepspeed": is_deepspeed(accelerator)}
            (partial / TRAIN_STATE).write_text(json.dumps({**train_state, "written_by": written_by}))
    except LIBRARY_ERRORS as error:  # disk full, quota, permissions: the earlier checkpoints stay as they are
        shutil.rmtree(partial, ignore_errors=True)
        free_mib = shutil.disk_usage(root).free / 2**20
        raise CheckpointError(
            f"could not write checkpoint {final} ({free_mib:.1f} MiB free on its file system): "
            f"{_error_summary(error)}; last complete checkpoint: {latest(root) or 'none'}"
        ) from error
    _barrier()
    if is_main:
        if final.exists():  # the same step saved again (e.g. interrupt right after a periodic save)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        prune(root, keep_last)
    _barrier()
    return final


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, accelerator: Accelerator) -> dict:
    """Load model + optimizer into the (possibly sharded) objects; return the train state."""
    _require_checkpoint(path)
    if is_deepspeed_checkpoint(path) != is_deepspeed(accelerator):
        raise CheckpointError(f"{path} was written {'with' if is_deepspeed_checkpoint(path) else 'without'} DeepSpeed; "
                         f"resume it with the same kind of parallel.strategy, or start a new output_dir")
    train_state = _read_train_state(path)
    with _damaged_checkpoint_error(path):
        if is_deepspeed(accelerator):
            _require_same_process_count(path, train_state, accelerator.num_processes)
            accelerator.load_state(str(path))
        else:
            state = _state_dicts(model, optimizer)
            _require_same_shapes(path, state["model"])
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_state.pop("written_by", None)
    return train_state


def _read_train_state(path: Path) -> dict:
    try:
        state = json.loads((path / TRAIN_STATE).read_text())
        int(state["step"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path / TRAIN_STATE} is missing or damaged ({error}); {_way_out(path)}") from error


def _require_same_shapes(path: Path, model_state: dict) -> None:
    """Name the first weight whose saved shape differs (a checkpoint of another model size)."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for key, tensor in model_state.items():
        entry = saved.get(f"model.{key}")
        if entry is None:
            raise CheckpointError(f"{path} has no weight {key!r}: it was written by another model")
        if tuple(entry.size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(entry.size)} there but {tuple(tensor.shape)} in this model: "
                f"the checkpoint was written by another model size or resolution"
            )


@contextmanager
def _damaged_checkpoint_error(path: Path):
    """Turn a library's failure to read a checkpoint into one clear error with the way out."""
    try:
        yield
    except CheckpointError:
        raise
    except LIBRARY_ERRORS as error:  # unpickling, truncated files, size mismatches deep in DeepSpeed
        raise CheckpointError(f"{path} cannot be loaded ({_error_summary(error)}); {_way_out(path)}") from error


def _error_summary(error: Exception) -> str:
    """The innermost message of a library error (torch.distributed.checkpoint wraps each rank's
    exception with its traceback into one text: its last line is the cause)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _way_out(path: Path) -> str:
    earlier = [p for _, p in complete_checkpoints(path.parent) if p.name < path.name]
    if earlier:
        return f"resume from the previous one with checkpoint.resume={earlier[-1]}, or delete {path}"
    return f"there is no earlier one: delete {path} or set checkpoint.resume=none to start over"


def _require_same_process_count(path: Path, train_state: dict, world_size: int) -> None:
    """DeepSpeed 0.19 cannot re-partition ZeRO optimizer state for another process count."""
    saved = train_state.get("written_by", {}).get("world_size", world_size)
    if saved != world_size:
        raise CheckpointError(
            f"{path} is a ZeRO checkpoint of {saved} processes and this run has {world_size}: DeepSpeed resumes "
            f"its partitioned optimizer state only on the same number. Relaunch with {saved} processes "
            f"(parallel.strategy=fsdp2 checkpoints resume on any number)"
        )


def load_model_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load only the weights of a checkpoint into a plain, unsharded model (one process)."""
    _require_checkpoint(path)
    if is_deepspeed_checkpoint(path):
        with _damaged_checkpoint_error(path):
            return _load_zero_weights(model, path)
    state = {"model": model.state_dict()}
    with _damaged_checkpoint_error(path):
        _require_same_shapes(path, state["model"])
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"], strict=True)
    return model


def _load_zero_weights(model: nn.Module, path: Path) -> nn.Module:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(path))  # reads the tag from path/latest
    result = model.load_state_dict(state, strict=False)
    # ZeRO-1 checkpoints leave out frozen parameters; the fixed sin-cos tables are rebuilt exactly.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    if result.unexpected_keys or set(result.missing_keys) - frozen:
        raise CheckpointError(
            f"{path}: weights do not match the model: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (path / DEEPSPEED_FOLDER).is_dir()


def _require_checkpoint(path: Path) -> None:
    if not (path / DCP_METADATA).is_file() and not is_deepspeed_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a maescale checkpoint; expected output_dir/checkpoints/step_XXXXXXXX")


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
