"""`dstp bench --ablation`: DSTP's variants and its tau / window sweeps on walk at 33.3% retention."""
from __future__ import annotations

from dataclasses import replace

from rich.console import Console

from dstp.config import DSTPConfig

VARIANTS = ("dstp", "random", "hard", "every_step", "all_tokens")
TAUS = (0.5, 0.65, 0.75, 0.85, 0.95)
WINDOWS = (5, 10, 20, 40)


def ablation_config(cfg):
    return replace(cfg, tasks=("walk",), retentions=(0.333,), methods=("fastv", "divprune"))


def run_ablation(cfg, console: Console) -> list[dict]:
    from dstp.bench.sweep import run_bench

    records = run_bench(replace(cfg, shifts=("none",)), console)  # unpruned + vanilla pruners
    runs = [(f"variant={v}", replace(cfg.dstp, variant=v)) for v in VARIANTS]
    runs += [(f"tau={t}", replace(cfg.dstp, tau=t)) for t in TAUS if t != cfg.dstp.tau]
    runs += [(f"window={w}", replace(cfg.dstp, window=w)) for w in WINDOWS if w != cfg.dstp.window]
    for label, dcfg in runs:
        recs = run_bench(replace(cfg, dstp=dcfg, shifts=("dstp",), include_unpruned=False), console)
        for r in recs:
            r["shift"] = label
        records += recs
    return records


__all__ = ["ablation_config", "run_ablation", "DSTPConfig"]
