"""Processes and their group: the backend the node allows, the Accelerator, and the Layout of a launch.

`build_accelerator` starts the process group with the backend the node allows
(`choose_backend`: NCCL when every local process has a GPU of its own, otherwise gloo with the
processes computing on the CPU, so the same code runs in tests without a GPU and on a one-GPU
machine). FSDP2 needs a process group even over one process (CPU offload); Accelerate starts
none there, so `process_group_for` gives the run one of its own.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs

from ..errors import StrategyError
from ..layout import Layout
from .zero import ZeroSettings, deepspeed_config, deepspeed_plugin

# A rank that dies leaves the others blocked in a collective; they give up after this.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def launched_processes() -> int:
    """Processes started by the launcher (accelerate launch, torchrun, srun + accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_processes() -> int:
    """Processes the launcher started on this node (torchrun and accelerate launch set it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", launched_processes()))


def launch_layout(parallel, precision: str) -> Layout:
    """The Layout of `parallel` (the config section) over the processes this launch started."""
    world = launched_processes()
    return Layout.from_config(parallel, precision, world, nodes=max(1, world // local_processes()))


def choose_backend(requested: str, gpus: int, processes_on_node: int) -> str:
    """The process-group backend for `processes_on_node` processes on a node with `gpus` GPUs.

    NCCL refuses two ranks on one GPU, and Accelerate puts local rank r on GPU r % gpus; so
    "auto" takes NCCL only when every local process has a GPU of its own, and otherwise the
    gloo fallback, where the processes compute on the CPU (e.g. 2-process tests on one GPU).
    """
    enough_gpus = gpus >= processes_on_node and gpus > 0
    if requested == "auto":
        return "nccl" if enough_gpus else "gloo"
    if requested == "nccl" and not enough_gpus:
        raise StrategyError(
            f"parallel.backend=nccl needs a GPU per process: {processes_on_node} process(es) on this node, "
            f"{gpus} GPU(s); use parallel.backend=auto or gloo, or launch at most {gpus} process(es) per node"
        )
    if requested not in ("nccl", "gloo"):
        raise StrategyError(f"parallel.backend={requested!r}: expected auto, nccl or gloo")
    return requested


def build_accelerator(layout: Layout, backend: str = "auto", zero: ZeroSettings | None = None) -> Accelerator:
    """The Accelerator of `layout` over a `backend` (parallel.backend) group; `zero`: what a zero1-3
    layout's DeepSpeed JSON needs beyond the layout."""
    # Accelerate keeps its settings in a process-wide singleton that refuses a second
    # Accelerator with another precision; each run (tests, notebooks) starts from its own
    # settings. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    backend = choose_backend(backend, torch.cuda.device_count(), local_processes())
    on_cpu = backend == "gloo"
    handlers = []
    if launched_processes() > 1:  # naming a backend makes Accelerate start a process group
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=COLLECTIVE_TIMEOUT))
    if layout.deepspeed:
        if on_cpu and torch.cuda.is_available():  # Accelerate drops the DeepSpeed plugin when told cpu=True
            raise StrategyError(
                f"parallel.strategy={layout.strategy} cannot take the gloo fallback on a node with GPUs "
                f"({local_processes()} processes, {torch.cuda.device_count()} GPU(s)): launch one process per GPU, "
                "or use ddp or fsdp2"
            )
        _single_process_rendezvous()
        # bf16 is in the DeepSpeed config; Accelerate reads the precision from the plugin.
        plugin = deepspeed_plugin(deepspeed_config(layout, zero or ZeroSettings()), on_cpu)
        return Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers)
    # On the CPU, Accelerate only treats a launch as distributed (MULTI_CPU) when told cpu=True.
    return Accelerator(cpu=on_cpu, mixed_precision="bf16" if layout.autocast else "no", kwargs_handlers=handlers)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_rendezvous() -> None:
    """Without a launcher, DeepSpeed looks for MPI to find its peers; describe a group of one."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def start_process_group_of_one(device: torch.device) -> None:
    """A process group of this process alone (FSDP2 needs one even then), unless one exists.
    Its store lives in this process: no port, no environment variables that a later
    Accelerator would read as a launch."""
    if dist.is_initialized():
        return
    on_gpu = device.type == "cuda"
    dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if on_gpu else None)


@contextmanager
def process_group_for(layout: Layout, backend: str = "auto"):
    """FSDP2 shards over a process group, also of one process (CPU offload); Accelerate starts none
    for a single process, so the run gets one of its own, ended with it."""
    if not layout.fsdp2_units or launched_processes() > 1 or dist.is_initialized():
        yield
        return
    on_gpu = choose_backend(backend, torch.cuda.device_count(), 1) == "nccl"
    start_process_group_of_one(torch.device("cuda", 0) if on_gpu else torch.device("cpu"))
    try:
        yield
    finally:
        dist.destroy_process_group()


def backend_name() -> str:
    return dist.get_backend() if dist.is_initialized() else "no process group"


def placement(device_type: str, backend: str, gpus: int, processes: int) -> str:
    """Device and backend for the strategy line, saying why when the node's GPUs are left unused."""
    line = f"{device_type}, {backend}"
    if device_type == "cpu" and gpus:
        plural = "GPU" if gpus == 1 else "GPUs"
        shared = f"{processes} processes, {gpus} {plural} on this node"
        reason = "parallel.backend=gloo" if gpus >= processes else shared
        line += f" fallback: {reason}"
    return line


def accelerator_placement(accelerator: Accelerator) -> str:
    return placement(accelerator.device.type, backend_name(), torch.cuda.device_count(), local_processes())
