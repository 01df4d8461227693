"""Host synchronisations per decoding step (`dstp speed --sync-debug`): a dispatch mode that counts what makes the
host wait for the device, and a run that counts them inside `Engine.decode_step`, inside DSTP's step, and over the
decoding loop (it wraps `engine.decode_step` and `policy.step` for that run)."""
from __future__ import annotations

import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dstp.config import GenerationConfig


_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
             "aten::unique_dim", "aten::unique_consecutive", "aten::equal"}


class HostSyncs(TorchDispatchMode):
    """Counts what makes the host wait for the device, on any device: reading a value (`item`, `bool`, `int`,
    `tolist`), ops whose output size depends on the data (`nonzero`, `masked_select`, `unique`, `repeat_interleave`
    by a tensor), copies from a device to the host. On CUDA, `torch.cuda.set_sync_debug_mode` gives the
    driver's own count next to it (`cuda_syncs`); on CPU it cannot see a host-to-device copy."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.cuda_syncs = 0
        self._tolist = None
        self._in_tolist = False
        self._caught = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if not self._in_tolist:
            if name in _SYNC_OPS or name == "aten::repeat_interleave.Tensor" and "output_size" not in (kwargs or {}):
                self.count += 1
            elif name in ("aten::_to_copy", "aten::copy_"):
                src = args[1] if name == "aten::copy_" else args[0]
                dst = (kwargs or {}).get("device") if name == "aten::_to_copy" else args[0].device
                if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None \
                        and torch.device(dst).type == "cpu":
                    self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.count += 1
            counter._in_tolist = True
            try:
                return original(t)
            finally:
                counter._in_tolist = False

        torch.Tensor.tolist = tolist
        if torch.cuda.is_available():
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def snapshot(self) -> tuple[int, int]:
        cuda = sum("synchronizing" in str(w.message) for w in self._records) if self._caught is not None else 0
        return self.count, cuda

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        torch.Tensor.tolist = self._tolist
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.cuda_syncs = self.snapshot()[1]
            self._caught.__exit__(*exc)
        return out


def count_host_syncs(adapter, engine, batch, pruner, policy, retention, n: int) -> dict:
    """Host synchronisations per decoding step of one generation of n tokens: inside `Engine.decode_step` (DSTP
    included), inside DSTP's step alone, and over the whole decoding loop (from the first step to the last: the
    sampling and stop check between steps included; set-up and trace building before and after it are not)."""
    prepared = adapter.prepare(batch, vision_scores=False)
    counter = HostSyncs()
    inside = {"decode_step": [0, 0], "dstp": [0, 0]}
    loop = {}

    def counted(kind, fn):
        def wrapped(*args, **kwargs):
            before = counter.snapshot()
            loop.setdefault("first", before)
            try:
                return fn(*args, **kwargs)
            finally:
                after = loop["last"] = counter.snapshot()
                inside[kind][0] += after[0] - before[0]
                inside[kind][1] += after[1] - before[1]
        return wrapped

    engine.decode_step = counted("decode_step", engine.decode_step)
    if policy is not None:
        policy.step = counted("dstp", policy.step)
    try:
        with counter:
            out = engine.generate(prepared, GenerationConfig(max_new_tokens=n), pruner=pruner,
                                  shift=policy)
    finally:
        del engine.decode_step
        if policy is not None:
            del policy.step
    steps = max(1, len(out.trace.steps))
    per_step = lambda k, i: inside[k][i] / steps if k == "decode_step" or policy is not None else None  # noqa: E731
    row = {"decode_step_syncs_per_step": per_step("decode_step", 0), "dstp_syncs_per_step": per_step("dstp", 0),
           "loop_syncs_per_step": (loop["last"][0] - loop["first"][0]) / steps}
    if adapter.device.type == "cuda":
        row.update(cuda_decode_step_syncs_per_step=per_step("decode_step", 1),
                   cuda_dstp_syncs_per_step=per_step("dstp", 1),
                   cuda_loop_syncs_per_step=(loop["last"][1] - loop["first"][1]) / steps)
    return row
