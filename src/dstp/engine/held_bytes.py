"""Counting the memory a generation holds: every buffer once, by the storage it lives in, under what it is for."""
from __future__ import annotations

import dataclasses

import torch

from dstp.engine.kv_store import KVStore


class HeldBytes:
    """`out`: bytes per kind. A storage is counted once, under the first kind that claims it."""

    def __init__(self):
        self.seen: set = set()
        self.out: dict[str, int] = {}

    def count(self, kind: str, n: int):
        self.out[kind] = self.out.get(kind, 0) + n

    def claim(self, tensors) -> bool:
        """Mark the storages of `tensors` as counted; True if none of them was counted before."""
        fresh = True
        for t in tensors:
            key = t.untyped_storage()._cdata
            fresh = fresh and key not in self.seen
            self.seen.add(key)
        return fresh

    def add(self, kind: str, obj):
        """Count every tensor reachable from `obj` (tensors, lists, tuples, dicts, dataclasses, KV stores)."""
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage._cdata not in self.seen:
                self.seen.add(storage._cdata)
                self.count(kind, storage.nbytes())
        elif isinstance(obj, KVStore):
            for t in obj.buffers():
                self.add(kind, t)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                self.add(kind, x)
        elif isinstance(obj, dict):
            for x in obj.values():
                self.add(kind, x)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                self.add(kind, getattr(obj, f.name))
