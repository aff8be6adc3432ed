"""Step checkpoints: atomic, keep-last-K, auto-resume. All file names live here.

A checkpoint is written into `checkpoints/.partial-step_XXXXXXXX/` and renamed
to `checkpoints/step_XXXXXXXX/` only once every process has finished writing,
so a crash during a save never leaves a complete-looking checkpoint behind;
`latest()` only ever sees renamed folders.

Every checkpoint resumes on any number of processes:

- DDP and FSDP2 use torch.distributed.checkpoint, which stores every tensor under its fully
  qualified name with its global shape and reshards on load.
- DeepSpeed ZeRO (stages 1-3, fp32 or bf16) writes `zero/`: per trainable parameter one
  safetensors file with its whole fp32 master weight and AdamW moments, plus `zero/index.json`
  (shapes, AdamW step count and hyperparameters). DeepSpeed's `safe_get_full_*` API gathers one
  parameter at a time (so beyond its partitions no process holds more than one parameter's whole
  tensors, and a 7B model never needs its optimizer state in one place), the processes take
  turns writing, and on load every process cuts its own partition out of the whole tensors with
  `safe_set_full_*`, whatever the process count or ZeRO stage that wrote them. The frozen sin-cos
  position tables are not written: every build makes them exactly.
  DeepSpeed's universal checkpoint does the same only after an offline conversion
  (`ds_to_universal`) of its per-process files, which needs twice the disk, a conversion step in
  the resume path and `load_universal` decided before the engine is built; this layout is
  process-count free as written.
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
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .errors import CheckpointError
from .parallel import any_process, is_deepspeed
from .shards import full_shape

# What a failed read or write can raise; torch.distributed.checkpoint's error derives from
# BaseException, so `except Exception` alone would let it through.
LIBRARY_ERRORS = (Exception, CheckpointException)

CHECKPOINTS = "checkpoints"
STEP_PATTERN = re.compile(r"^step_(\d{8})$")
PARTIAL_PREFIX = ".partial-"
TRAIN_STATE = "train_state.json"
DCP_METADATA = ".metadata"  # written last by torch.distributed.checkpoint
ZERO_FOLDER = "zero"  # DeepSpeed runs: one file per trainable parameter
ZERO_INDEX = "index.json"  # in ZERO_FOLDER, written with the parameter files
ZERO_TENSORS = ".safetensors"  # ZERO_FOLDER/<parameter name>.safetensors: zero_tensor_file
MASTER_WEIGHT = "fp32"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's state names
RESUME_FLAG = "checkpoint.resume"  # how pretraining names the checkpoint it reads
# Restored from the checkpoint like torch's Optimizer.load_state_dict does (lr is set every step).
ADAM_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")


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
    accelerator: Accelerator, extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Collectively write model + optimizer, `extra` tensors (e.g. an EMA of the weights, sharded like
    them) and the train state (formats: the module docstring)."""
    is_main = _rank() == 0
    final = root / step_name(step)
    partial = root / (PARTIAL_PREFIX + step_name(step))
    try:
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        if is_deepspeed(accelerator):
            _save_zero(model, partial)
        else:
            dcp.save({**_state_dicts(model, optimizer), **_extra(extra)}, checkpoint_id=str(partial))
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


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, accelerator: Accelerator,
         extra: dict[str, torch.Tensor] | None = None) -> dict:
    """Load model + optimizer (and `extra`, in place) into the (possibly sharded) objects; return the
    train state."""
    _require_checkpoint(path)
    if is_deepspeed_checkpoint(path) != is_deepspeed(accelerator):
        raise CheckpointError(f"{path} was written {'with' if is_deepspeed_checkpoint(path) else 'without'} DeepSpeed; "
                         f"resume it with the same kind of parallel.strategy, or start a new output_dir")
    train_state = _read_train_state(path)
    with _damaged_checkpoint_error(path):
        if is_deepspeed(accelerator):
            _load_zero(model, path)
        else:
            state = {**_state_dicts(model, optimizer), **_extra(extra)}
            _require_same_shapes(path, _dcp_shapes(path), _shapes(state["model"]))
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


def _require_same_shapes(path: Path, saved: dict[str, tuple], model: dict[str, tuple]) -> None:
    """Name the first weight whose saved shape differs (a checkpoint of another model size)."""
    for key, shape in model.items():
        if key not in saved:
            raise CheckpointError(f"{path} has no weight {key!r}: it was written by another model")
        if tuple(saved[key]) != tuple(shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(saved[key])} there but {tuple(shape)} in this model: "
                f"the checkpoint was written by another model size or resolution"
            )


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


def _dcp_shapes(path: Path) -> dict[str, tuple]:
    """Shape of every model weight in a torch.distributed.checkpoint folder, by weight name."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {key.removeprefix("model."): tuple(entry.size) for key, entry in saved.items()
            if key.startswith("model.") and hasattr(entry, "size")}


@contextmanager
def _damaged_checkpoint_error(path: Path, flag: str = RESUME_FLAG):
    """Turn a library's failure to read a checkpoint into one clear error with the way out, in the
    words of `flag`, the command's key or option that named the checkpoint."""
    try:
        yield
    except CheckpointError:
        raise
    except LIBRARY_ERRORS as error:  # unpickling, truncated files, size mismatches deep in DeepSpeed
        raise CheckpointError(f"{path} cannot be loaded ({_error_summary(error)}); {_way_out(path, flag)}") from error


def _error_summary(error: Exception) -> str:
    """The innermost message of a library error (torch.distributed.checkpoint wraps each rank's
    exception with its traceback into one text: its last line is the cause)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _way_out(path: Path, flag: str = RESUME_FLAG) -> str:
    earlier = [p for _, p in complete_checkpoints(path.parent) if p.name < path.name]
    if flag != RESUME_FLAG:  # a command that only reads the weights: another checkpoint is the way out
        if earlier:
            separator = " " if flag.startswith("--") else "="  # an option (--ckpt) or a config key (encoder.ckpt)
            return f"read the previous one with {flag}{separator}{earlier[-1]}"
        return f"there is no earlier one in {path.parent}: point {flag} at another checkpoint"
    if earlier:
        return f"resume from the previous one with checkpoint.resume={earlier[-1]}, or delete {path}"
    return f"there is no earlier one: delete {path} or set checkpoint.resume=none to start over"


def load_model_weights(model: nn.Module, path: Path, flag: str = RESUME_FLAG) -> nn.Module:
    """Load only the weights of a checkpoint into a plain, unsharded model (one process); `flag` is
    the command's key or option that named `path` (knn: encoder.ckpt, export: --ckpt), for the way
    out of a damaged checkpoint."""
    _require_checkpoint(path)
    if is_deepspeed_checkpoint(path):
        with _damaged_checkpoint_error(path, flag):
            return _load_zero_weights(model, path, flag)
    state = {"model": model.state_dict()}
    with _damaged_checkpoint_error(path, flag):
        _require_same_shapes(path, _dcp_shapes(path), _shapes(state["model"]))
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"], strict=True)
    return model


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (path / ZERO_FOLDER).is_dir()


# ------------------------------------------------------------ DeepSpeed ZeRO, any process count


def _save_zero(engine, path: Path) -> None:
    """Write each trainable parameter's whole fp32 master weight and AdamW moments, one parameter
    at a time: all processes gather it (a collective), one writes it, taking turns.

    A failed write is reported to every process after the loop rather than raised at once,
    which would leave the others waiting in the next gather until the collective timeout.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    rank, world = _rank(), _world_size()
    zero_optimizer = engine.optimizer
    adam_step = _adam_step(zero_optimizer)
    if adam_step:
        _link_adam_state(zero_optimizer)
    failure = None
    try:
        (path / ZERO_FOLDER).mkdir(exist_ok=True)
        if rank == 0:
            _write_zero_index(path, engine.module, zero_optimizer, adam_step)
    except LIBRARY_ERRORS as error:
        failure = error
    for index, (name, param) in enumerate(_trainable_parameters(engine.module)):
        tensors = {MASTER_WEIGHT: safe_get_full_fp32_param(param)}
        if adam_step:  # no moments before the first update
            tensors.update({key: safe_get_full_optimizer_state(param, key) for key in ADAM_MOMENTS})
        if index % world == rank and failure is None:
            try:
                save_file({key: value.detach().cpu() for key, value in tensors.items()}, zero_tensor_file(path, name))
            except LIBRARY_ERRORS as error:
                failure = error
        del tensors  # before the next gather: one parameter at a time
    if any_process(failure is not None):
        raise failure or OSError("another process could not write its part of the checkpoint")


def _write_zero_index(path: Path, module: nn.Module, zero_optimizer, adam_step: int) -> None:
    groups = [{key: group[key] for key in ADAM_HYPERPARAMETERS} for group in zero_optimizer.optimizer.param_groups]
    shapes = {name: list(full_shape(param)) for name, param in _trainable_parameters(module)}
    index = {"parameters": shapes, "adam_step": adam_step, "param_groups": groups}
    zero_index_file(path).write_text(json.dumps(index))


def _load_zero(engine, path: Path) -> None:
    """Every process reads each parameter's whole tensors and keeps its own partition of them."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    index = _read_zero_index(path)
    trainable = _trainable_parameters(engine.module)
    _require_same_shapes(path, index["parameters"], {name: tuple(full_shape(param)) for name, param in trainable})
    zero_optimizer = engine.optimizer
    _restore_adam_hyperparameters(path, zero_optimizer.optimizer, index["param_groups"])
    if index["adam_step"]:
        _create_adam_state(zero_optimizer, index["adam_step"])
    for name, param in trainable:
        with safe_open(str(zero_tensor_file(path, name)), framework="pt") as tensors:
            master = tensors.get_tensor(MASTER_WEIGHT)
            safe_set_full_fp32_param(param, master)
            _copy_to_model_weight(param, master)
            del master
            if index["adam_step"]:
                for key in ADAM_MOMENTS:
                    safe_set_full_optimizer_state(param, tensors.get_tensor(key), key)


def _load_zero_weights(model: nn.Module, path: Path, flag: str) -> nn.Module:
    trainable = _trainable_parameters(model)
    _require_same_shapes(path, _read_zero_index(path, flag)["parameters"], _shapes(dict(trainable)))
    with torch.no_grad():
        for name, param in trainable:
            with safe_open(str(zero_tensor_file(path, name)), framework="pt") as tensors:
                param.copy_(tensors.get_tensor(MASTER_WEIGHT))
    return model


def _read_zero_index(path: Path, flag: str = RESUME_FLAG) -> dict:
    try:
        index = json.loads(zero_index_file(path).read_text())
        int(index["adam_step"]), dict(index["parameters"]), list(index["param_groups"])
        return index
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{zero_index_file(path)} is missing or damaged ({error}); "
                              f"{_way_out(path, flag)}") from error


def zero_tensor_file(path: Path, name: str) -> Path:
    """The file of parameter `name` in the DeepSpeed checkpoint `path`."""
    return path / ZERO_FOLDER / (name + ZERO_TENSORS)


def zero_index_file(path: Path) -> Path:
    return path / ZERO_FOLDER / ZERO_INDEX


def _trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]


def _master_partitions(zero_optimizer) -> list[torch.Tensor]:
    """The flat fp32 partitions that torch's AdamW steps inside DeepSpeed; its state is keyed by them."""
    if _is_zero3(zero_optimizer):
        return zero_optimizer.fp32_partitioned_groups_flat
    return zero_optimizer.single_partition_of_fp32_groups


def _is_zero3(zero_optimizer) -> bool:
    return hasattr(zero_optimizer, "fp32_partitioned_groups_flat")


def _adam_step(zero_optimizer) -> int:
    """AdamW's update count (every partition is updated together); 0 before the first update."""
    state = zero_optimizer.optimizer.state
    steps = [int(state[flat]["step"]) for flat in _master_partitions(zero_optimizer) if "step" in state.get(flat, {})]
    return max(steps, default=0)


def _restore_adam_hyperparameters(path: Path, adam: torch.optim.Optimizer, saved: list[dict]) -> None:
    if len(saved) != len(adam.param_groups):
        raise CheckpointError(f"{path} has {len(saved)} optimizer parameter groups and this run "
                              f"{len(adam.param_groups)}: it was written by another optimizer setup")
    for group, saved_group in zip(adam.param_groups, saved):
        group.update({key: tuple(value) if isinstance(value, list) else value for key, value in saved_group.items()})


def _create_adam_state(zero_optimizer, adam_step: int) -> None:
    """Give AdamW the state its first update would create, so that the saved moments can be copied
    into it (DeepSpeed creates it lazily, and `safe_set_full_optimizer_state` needs it)."""
    adam = zero_optimizer.optimizer
    # torch keeps the step count on the host unless the kernel reads it on the device.
    on_device = adam.defaults.get("fused") or adam.defaults.get("capturable")
    for flat in _master_partitions(zero_optimizer):
        state = adam.state[flat]
        for key in ADAM_MOMENTS:
            state.setdefault(key, torch.zeros_like(flat))
        state["step"] = torch.tensor(float(adam_step), device=flat.device if on_device else "cpu")
    _link_adam_state(zero_optimizer)


def _link_adam_state(zero_optimizer) -> None:
    """ZeRO-1/2: point every parameter at its slice of AdamW's moments, which the
    `safe_*_full_optimizer_state` functions read and write.

    DeepSpeed 0.19.8 links them once, right after the first parameter group's first update,
    when the other groups' moments do not exist yet: their parameters stay unlinked. Linking
    again once all moments exist fixes that (ZeRO-3 looks the moments up on every call).
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    if _is_zero3(zero_optimizer):
        return
    for params, flat in zip(zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(params, flat, zero_optimizer.optimizer.state)


def _copy_to_model_weight(param: nn.Parameter, master: torch.Tensor) -> None:
    """Make the weight the model computes with (bf16 or fp32) the master weight, as DeepSpeed's
    update does: ZeRO-3 keeps only this process's partition, cut like the master's partition."""
    from deepspeed.utils import safe_get_local_fp32_param

    with torch.no_grad():
        if hasattr(param, "ds_tensor"):
            param.ds_tensor.copy_(safe_get_local_fp32_param(param))
        else:
            param.copy_(master)


def _require_checkpoint(path: Path) -> None:
    if not (path / DCP_METADATA).is_file() and not is_deepspeed_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a maescale checkpoint; expected output_dir/checkpoints/step_XXXXXXXX")


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _extra(extra: dict[str, torch.Tensor] | None) -> dict:
    return {"extra": extra} if extra else {}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prune(root: Path, keep_last: int) -> None:
    for _, path in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(setting: str, output_dir: str | Path, root: Path | None = None) -> Path | None:
    """Which checkpoint to resume from: 'auto' (newest complete in `root`, default output_dir's
    checkpoints/, if any), 'none', or a folder."""
    if setting == "none":
        return None
    if setting == "auto":
        return latest(root or checkpoint_root(output_dir))
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
