"""Compatibility layer for FFCV 1.0.2: the one place that imports FFCV and patches it.

Every module that needs FFCV calls :func:`import_ffcv`, which imports it with a
clear message when it is missing and applies the fixes below once. Each fix
names the upstream defect it works around so it can be dropped when a release
contains the fix.

Fixes
-----
* ``Graph.group_operations`` (upstream issue 396, open in 1.0.2): the loop that
  splits a pipeline into alternating compiled / non-compiled stages aliases
  ``current_front`` and ``next_front`` after the first stage. A pipeline with a
  compiled operation after a non-compiled one then adds nodes to the set it is
  draining and ``Loader(...)`` spins forever at 100% CPU. The replacement starts
  each stage with a fresh ``next_front``.
* Thread count: importing FFCV sets torch's intra-op thread count to 1 (and each
  loader epoch sets it to the loader's thread count); the import keeps the
  caller's count here, and the loader restores it each epoch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import MissingExtraError, install_hint

INSTALL_HINT = (
    "FFCV is not installed: on Debian/Ubuntu run `make setup` (installs the apt packages "
    "pkg-config libturbojpeg0-dev libopencv-dev build-essential and the `ffcv` extra); "
    "elsewhere install libjpeg-turbo, OpenCV 4 (with its pkg-config file) and a C compiler, "
    f"then {install_hint('ffcv')}"
)

_patched = False


def ffcv_available() -> bool:
    """True when ``import ffcv`` works (used by tests to skip with a reason)."""
    try:
        importlib.import_module("ffcv")
    except ImportError:
        return False
    return True


def import_ffcv() -> Any:
    """Import FFCV, apply this module's fixes once, and return the ``ffcv`` module."""
    global _patched
    import torch

    torch_threads = torch.get_num_threads()
    try:
        ffcv = importlib.import_module("ffcv")
        graph = importlib.import_module("ffcv.pipeline.graph")
    except ImportError as error:
        raise MissingExtraError(f"{INSTALL_HINT} ({error})") from error
    finally:
        # ffcv.pipeline.compiler calls torch.set_num_threads(1) at import: keep the caller's.
        torch.set_num_threads(torch_threads)
    if not _patched:
        graph.Graph.group_operations = group_operations
        _patched = True
    return ffcv


def group_operations(self) -> list[list[int]]:
    """Replacement for ``ffcv.pipeline.graph.Graph.group_operations`` (upstream issue 396).

    Breadth-first over the pipeline graph: stage 0 takes every reachable compiled
    node (or node that works in both modes), stage 1 the non-compiled ones that
    stopped it, and so on, alternating. Identical to upstream except that each stage
    collects the nodes it cannot take into a new set instead of the one being drained.
    """
    current_front = set(self.root_nodes.keys())
    stages: list[list[int]] = []
    while current_front:
        next_front = set()
        current_stage = []
        jitted_stage = len(stages) % 2 == 0
        while current_front:
            node = current_front.pop()
            if node.is_jitted == jitted_stage or node.is_jitted is None:
                current_stage.append(self.node_to_id[node])
                current_front.update(self.adjacency_list[node])
            else:
                next_front.add(node)
        stages.append(current_stage)
        current_front = next_front
    return stages
