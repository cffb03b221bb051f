"""Peak bytes of tensors alive at once while some code runs, counted where tensors are made.

    with LiveTensorBytes() as live:
        run_something()
    live.peak["cpu"], live.now["cpu"]          # bytes

Resident set size depends on the allocator (freed blocks are often kept) and counts pages of
memory-mapped files, so it cannot say "this load held one block at a time". This counts
instead every storage an operator creates inside the block (a view of an existing tensor is
not new memory; a memory-mapped file's pages are not allocations), from creation until the
storage is freed, per device type. Tensors that existed before the block are not counted.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """A dispatch mode that tracks the bytes of storages created under it (see module docstring).

    now / peak: {device type: bytes}. Only for measuring: every operator pays a little Python.
    """

    def __init__(self):
        super().__init__()
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._live: dict[tuple[str, int], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set) -> None:
        storage = t.untyped_storage()
        key, nbytes = _key(t), storage.nbytes()
        if key in inputs or key in self._live or nbytes == 0 or getattr(storage, "filename", None):
            return
        dev = t.device.type
        self._live[key] = nbytes
        self.now[dev] = self.now.get(dev, 0) + nbytes
        self.peak[dev] = max(self.peak.get(dev, 0), self.now[dev])
        weakref.finalize(storage, self._free, key, dev)

    def _free(self, key, dev) -> None:
        self.now[dev] -= self._live.pop(key, 0)


def _key(t: torch.Tensor) -> tuple[str, int]:
    return t.device.type, t.untyped_storage().data_ptr()
