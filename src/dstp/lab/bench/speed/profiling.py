"""`dstp speed --profile`: a torch.profiler table of one run, the engine's and DSTP's phases labelled (it wraps
`engine.prefill`, `engine.decode_step`, `policy.step` and `policy._recompute` for that run)."""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def profile_run(fn, path: str, engine, policy):
    """A torch.profiler table of one run: the engine's phases and DSTP's are labelled (`dstp.step`: detection, CPTS,
    the windows and the stores told what to read; `dstp.recompute`: producing revived K/V, inside it), then the
    operators by self time."""
    def label(obj, attr, name):
        fn_ = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            with record_function(name):
                return fn_(*args, **kwargs)
        setattr(obj, attr, wrapped)

    labels = [(engine, "prefill", "engine.prefill"), (engine, "decode_step", "engine.decode_step"),
              (policy, "step", "dstp.step"), (policy, "_recompute", "dstp.recompute")]
    labels = [(obj, attr, name) for obj, attr, name in labels if hasattr(obj, attr)]  # VisionPulse: no recompute
    for obj, attr, name in labels:
        label(obj, attr, name)
    cuda = torch.cuda.is_available()
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            fn()
    finally:
        for obj, attr, _ in labels:
            delattr(obj, attr)
    events = prof.key_averages()
    phases = [e for e in events if e.key in {name for _, _, name in labels}]
    with open(path, "w") as f:
        f.write("phases (CPU total, calls):\n")
        for e in sorted(phases, key=lambda e: -e.cpu_time_total):
            f.write(f"  {e.key:<20} {e.cpu_time_total / 1e6:9.3f} s  {e.count:6d}\n")
        f.write(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25))
