"""Peak activation bytes on the CPU, by accounting (test_memory, test_vae_parallel).

A TorchDispatchMode sees every aten op's outputs, counts each new storage once, and subtracts it
when the storage is freed (weakref.finalize), so its peak is the most tensor bytes alive at once
inside the mode, as an allocator would see them (minus allocations hidden inside a kernel, and
nothing of what existed before: weights and inputs are passed as `preexisting`).
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created by ops inside the mode and still referenced."""

    def __init__(self, preexisting):
        super().__init__()
        self.skip = {t.untyped_storage()._cdata for t in preexisting}
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata  # views share it: counted once
            if key in self.skip or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._release, key)
        self.peak = max(self.peak, self.current)
        return out
