"""`dstp bench --ablation`: DSTP's variants and its tau / window sweeps on walk at 33.3% retention."""
from __future__ import annotations

from dataclasses import replace

from rich.console import Console

from dstp.config import DSTPConfig
from dstp.lab.bench.sweep import load_pipeline, run_bench

VARIANTS = ("dstp", "random", "hard", "every_step", "all_tokens")
TAUS = (0.5, 0.65, 0.75, 0.85, 0.95)
WINDOWS = (5, 10, 20, 40)


def ablation_config(cfg):
    return replace(cfg, tasks=("walk",), retentions=(0.333,), methods=("fastv", "divprune"))


def ablation_runs(dstp: DSTPConfig) -> list[tuple[str, DSTPConfig]]:
    """(label, DSTP configuration) of every variant and sweep point."""
    runs = [(f"variant={v}", replace(dstp, variant=v)) for v in VARIANTS]
    runs += [(f"tau={t}", replace(dstp, tau=t)) for t in TAUS if t != dstp.tau]
    return runs + [(f"window={w}", replace(dstp, window=w)) for w in WINDOWS if w != dstp.window]


def run_ablation(cfg, console: Console, pipe=None, on_record=None) -> list[dict]:
    """Unpruned and vanilla pruners, then every DSTP run; `on_record(records so far)` after each run."""
    pipe = pipe or load_pipeline(cfg.model)
    records: list[dict] = []

    def collect(new: list[dict], label: str | None = None) -> None:
        if label is not None:
            new[-1]["shift"] = label
        if on_record is not None:
            on_record(records + new)

    records += run_bench(replace(cfg, shifts=("none",)), console, pipe, collect)  # unpruned + vanilla pruners
    for label, dcfg in ablation_runs(cfg.dstp):
        run = replace(cfg, dstp=dcfg, shifts=("dstp",), include_unpruned=False)
        records += run_bench(run, console, pipe, lambda new, label=label: collect(new, label))
    return records


__all__ = ["ablation_config", "ablation_runs", "run_ablation"]
