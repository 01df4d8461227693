"""Where the engine's unpruned decoding step spends its time next to transformers' generate() (dynamic cache), on
`dstp speed`'s weight-bound shape with 128 new tokens: ms/token of two runs each, then a torch.profiler table of one
run of each (operators by self CPU time). A diagnostic for the README's Speed section, not a benchmark.

    .venv/bin/python scripts/profile_engine_vs_hf.py
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from dstp.config import GenerationConfig
from dstp.engine.engine import Engine
from dstp.lab.bench.speed.baselines import hf_run
from dstp.lab.bench.speed.config import SCENARIOS
from dstp.lab.bench.speed.models import build_batch, build_model
from dstp.lab.bench.speed.runner import engine_run
from dstp.models.registry import adapter_for_model


@torch.no_grad()
def main(new_tokens: int = 128) -> None:
    cfg = replace(SCENARIOS["weight-bound"], new_tokens=new_tokens)
    device = torch.device("cpu")
    model = build_model(cfg, device, torch.float32)
    batch = build_batch(cfg, device, torch.float32)
    adapter = adapter_for_model(model)
    engine = Engine(adapter)
    gen = GenerationConfig(max_new_tokens=cfg.new_tokens)
    runs = {"engine": lambda: engine_run(adapter, engine, batch, gen, None, None, cfg.retention, device),
            "hf_generate": lambda: hf_run(model, batch, cfg.new_tokens, False, device)}
    for _ in range(2):
        print(", ".join(f"{name} {1000 * r[1] / r[2]:.1f} ms/token" for name, r in
                        ((name, fn()) for name, fn in runs.items())))
    for name, fn in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"===== {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
