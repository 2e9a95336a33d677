"""Bytes of tensor storage alive, counted op by op: a measurement that needs no allocator
statistics, so it works the same on CPU, on GPUs and on fake tensors (where nothing is
allocated at all, as in `loom train --dry-run`).

    with LiveTensorBytes() as mem:
        ...
    mem.peak      # the most bytes alive at once, of storages created inside the block
    mem.current   # those still alive

Storages created before the block are not counted (pass them to `count` to include them).
A DTensor counts its local shard.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_of(t: torch.Tensor):
    local = t._local_tensor if hasattr(t, "_local_tensor") else t
    try:
        return local.untyped_storage()
    except (NotImplementedError, RuntimeError):  # tensors without storage (some wrappers)
        return None


class LiveTensorBytes(TorchDispatchMode):
    """Peak and current bytes of the tensor storages created while the mode is active.

    Sizes are read again after every op, not only at creation: FSDP frees a gathered unit by
    resizing its storage to 0 and gathers it again by resizing it back."""

    def __init__(self):
        super().__init__()
        self.peak = 0
        self._storages: dict[int, weakref.ref] = {}

    @property
    def current(self) -> int:
        total = 0
        for ref in self._storages.values():
            storage = ref()
            if storage is not None:
                total += storage.nbytes()
        return total

    def count(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage from now on (once, until it is freed)."""
        storage = _storage_of(tensor)
        if storage is None:
            return
        key = id(storage)
        known = self._storages.get(key)
        if known is not None and known() is storage:
            return
        self._storages[key] = weakref.ref(storage, lambda _, k=key: self._storages.pop(k, None))

    def counts(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`'s storage is among those counted."""
        storage = _storage_of(tensor)
        known = self._storages.get(id(storage)) if storage is not None else None
        return known is not None and known() is storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not a new allocation.
        inputs = {id(s) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                  and (s := _storage_of(t)) is not None}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(_storage_of(t)) not in inputs:
                self.count(t)
        self.peak = max(self.peak, self.current)
        return out
