"""Peak memory measured from allocations, not computed (DESIGN §5 "Memory", §8).

`PeakMemory(device)` is a context manager; inside it, `live_bytes` is what was allocated since it began and is
still alive, `peak_bytes` the most that ever was.

- CUDA: the caching allocator's own counters: `torch.cuda.max_memory_allocated` after
  `torch.cuda.reset_peak_memory_stats`, minus what was allocated when tracking began. Exact for every tensor
  and every kernel workspace that goes through the allocator (in its 512-byte blocks).
- CPU: `LiveTensorBytes`, a `TorchDispatchMode` that sees every tensor an operator returns. A storage is counted
  once, by its allocated size (`untyped_storage().nbytes()`), from the operator that created it until it is
  freed (a weakref finalizer on the storage; torch keeps a storage's Python object for as long as the storage
  lives). Views, in-place results and `out=` tensors alias a storage that is already counted, or that existed
  before tracking began (weights, inputs), so they never add bytes; a storage that an in-place op resizes is
  re-measured. What it cannot see: memory an operator allocates and frees inside its kernel (BLAS packing
  buffers, the scratch of SDPA's fused CPU kernel), and the allocator's own rounding.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ops whose result aliases an input that was made outside the dispatcher (torch.tensor(...)): a fresh buffer
_FRESH_ALIASES = {torch.ops.aten.lift_fresh.default}


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside this mode and still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}  # storage identity -> bytes counted
        self._finalizers: dict[int, weakref.finalize] = {}
        self._aliases: dict = {}  # op -> which of its results alias an input

    def reset_peak(self):
        self.peak_bytes = self.live_bytes

    def _count(self, storage):
        key = storage._cdata  # the StorageImpl: the same for every view, stable across resizes
        size = storage.nbytes()
        old = self._sizes.get(key)
        if old is None:
            self._sizes[key] = size
            self._finalizers[key] = weakref.finalize(storage, self._free, key)
            self.live_bytes += size
        elif old != size:  # resized in place
            self._sizes[key] = size
            self.live_bytes += size - old
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _free(self, key):
        self.live_bytes -= self._sizes.pop(key, 0)
        self._finalizers.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = self._aliases.get(func)
        if aliases is None:
            aliases = self._aliases[func] = [] if func in _FRESH_ALIASES else \
                [r.alias_info is not None for r in func._schema.returns]
        for i, t in enumerate(tree_leaves(out)):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if i < len(aliases) and aliases[i] and storage._cdata not in self._sizes:
                continue  # a view or in-place result of a buffer made before tracking began
            self._count(storage)
        return out

    def __exit__(self, *exc):
        for f in self._finalizers.values():
            f.detach()  # stop counting: tensors that outlive the mode no longer report to it
        self._finalizers.clear()
        return super().__exit__(*exc)


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_bytes` (and, inside, `m.live_bytes`): bytes allocated
    since the block began, on the allocator's counters (CUDA) or by `LiveTensorBytes` (CPU)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._mode: LiveTensorBytes | None = None
        self._inside = False
        self._base = 0
        self._peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = LiveTensorBytes().__enter__()
        self._inside = True
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._peak = self.peak_bytes
        self._inside = False
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        return False

    @property
    def live_bytes(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) - self._base
        return self._mode.live_bytes

    @property
    def peak_bytes(self) -> int:
        if not self._inside:
            return self._peak
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) - self._base
        return self._mode.peak_bytes

    def reset_peak(self):
        """From now on, the peak counts from what is alive now."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode.reset_peak()


def measure_peak(fn, device):
    """(fn(), peak bytes allocated while it ran above what was allocated before)."""
    with PeakMemory(device) as m:
        out = fn()
    return out, m.peak_bytes


def storage_bytes(tensors) -> int:
    """Allocated bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s._cdata not in seen:
            seen.add(s._cdata)
            total += s.nbytes()
    return total


__all__ = ["LiveTensorBytes", "PeakMemory", "measure_peak", "storage_bytes"]
