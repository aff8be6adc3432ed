"""Exact bytes of the tensor storages a piece of code keeps alive: what the planner's activation
formulas are checked against (tests/test_plan.py). It uses torch's dispatch internals, so it
lives with the tests rather than in maescale."""

from __future__ import annotations

import torch


class LiveStorageTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Exact bytes of the tensor storages created inside it that are still alive: the measurement the
    activation formulas are checked against.

    Every op's outputs pass through `__torch_dispatch__` below autograd, including the ops that
    non-reentrant and selective checkpointing run under their own saved-tensor hooks and caching
    mode, and the outputs autograd saves only in C++ (LayerNorm statistics, attention's
    log-sum-exp). Each new storage is held by a weak reference to its StorageImpl, so after the
    forward pass the live ones are exactly what the graph (or a checkpoint's cache) keeps, plus
    what the caller still holds. Storages that existed before (parameters, the input batch) are
    excluded, so views of weights do not count. Sizes are read when counted, so a storage
    resized in place counts at its size then (FSDP2 frees its gathered and gradient buffers by
    resizing them to 0 and allocates them again the same way). With `track_peak`, `peak` is the
    largest live total seen after any op (a scan of every storage per op: for small models).
    """

    def __init__(self, existing: list[torch.Tensor] = (), track_peak: bool = False):
        super().__init__()
        self._existing = {t.untyped_storage()._cdata for t in existing}
        self._storages: dict[int, object] = {}  # StorageImpl address -> weak reference to it
        self.track_peak = track_peak
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
                storage = leaf.untyped_storage()
                key = storage._cdata
                known = self._storages.get(key)
                if key not in self._existing and (known is None or known.expired()):
                    self._storages[key] = StorageWeakRef(storage)  # new, or a freed one's address
        if self.track_peak:
            self.peak = max(self.peak, self.live_bytes())
        return out

    def live_bytes(self) -> int:
        dead = [key for key, ref in self._storages.items() if ref.expired()]
        for key in dead:
            del self._storages[key]
        return sum(torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes() for ref in self._storages.values())


