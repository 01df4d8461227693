"""`dstp bench`: the ShiftBench sweep (lab/bench/sweep.py) or, with --ablation, DSTP's variants and sweeps
(lab/bench/ablation.py); bench.json and bench.md after every run, plots at the end."""
from __future__ import annotations

import os
from dataclasses import replace

from rich.console import Console

from dstp.errors import ConfigError
from dstp.lab.bench.ablation import ablation_config, run_ablation
from dstp.lab.bench.plots import plot_all
from dstp.lab.bench.sweep import BenchConfig, check_config, check_model, load_pipeline, print_table, run_bench, save
from dstp.lab.cli.common import csv_list, float_list
from dstp.lab.shiftbench import TASKS
from dstp.pruners import PRUNERS

QUICK = dict(n=24, methods=("fastv", "divprune"), retentions=(0.333,))


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="ShiftBench sweep: methods x {vanilla, +DSTP} x retention x tasks")
    b.add_argument("--model", default=None, help="model dir or hub id (default: the shipped ShiftBench model)")
    b.add_argument("--methods", type=csv_list, default=None, help="comma list of pruners; 'none' = unpruned only")
    b.add_argument("--tasks", type=csv_list, default=None, help="comma list of lookup,pair,walk")
    b.add_argument("--retentions", type=float_list, default=None, help="e.g. 0.666,0.333,0.111")
    b.add_argument("--seed", type=int, default=1234, help="seed of the fresh evaluation samples")
    b.add_argument("--n", type=int, default=None, help="samples per task")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--out", default=None, help="output folder for bench.json and plots (default results/; "
                                                  "results/quick/ with --quick; + ablation/ with --ablation)")
    b.add_argument("--prune-layer", type=int, default=None,
                   help="K of FastV/SparseVLM (default: 2 of 32 layers' depth fraction, K=1 on ShiftBench); "
                        "an error when --methods has neither")
    b.add_argument("--quick", action="store_true",
                   help="a one-minute version: --n 24 --methods fastv,divprune --retentions 0.333 (flags given "
                        "override these), written to results/quick/")
    b.add_argument("--policies", type=csv_list, default=None,
                   help="decode-time policies compared (default dstp): dstp on top of each pruner, visionpulse on the "
                        "unpruned prefill at its authors' 10pct and 5pct settings")
    b.add_argument("--ablation", action="store_true", help="DSTP variants and tau/window sweeps on walk at 33.3%%")
    b.set_defaults(run=run)


def bench_config(args) -> BenchConfig:
    """The configuration the flags ask for, checked before anything runs."""
    check_flags(args)
    cfg = BenchConfig(model=args.model, seed=args.seed, batch_size=args.batch_size, prune_layer=args.prune_layer)
    if args.quick:
        cfg = replace(cfg, **QUICK)
    if args.ablation:
        cfg = ablation_config(cfg)
    if args.tasks is not None:
        bad = [t for t in args.tasks if t not in TASKS]
        if bad:
            raise ConfigError(f"unknown task {bad[0]!r}; known: {', '.join(TASKS)}")
    explicit = dict(methods=args.methods, tasks=args.tasks, retentions=args.retentions, n=args.n,
                    policies=args.policies)
    cfg = replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in explicit.items() if v is not None})
    check_config(cfg)
    check_flag_combinations(args, cfg)
    return cfg


def check_flags(args) -> None:
    if args.prune_layer is not None and args.prune_layer < 1:
        raise ConfigError(f"--prune-layer must be >= 1 (layer 0 is before the LLM), got {args.prune_layer}")
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out is not None and os.path.isfile(args.out):
        raise ConfigError(f"--out {args.out} is a file, not a folder")


def check_flag_combinations(args, cfg: BenchConfig) -> None:
    """A flag that would change nothing in this combination is an error, not silently ignored."""
    methods = [m for m in cfg.methods if m != "none"]
    if methods and "none" in cfg.methods:
        raise ConfigError(f"--methods none means the unpruned runs only, which every bench includes anyway: "
                          f"--methods {','.join(methods)}")
    if not methods and args.retentions is not None:
        raise ConfigError("--retentions has no effect with --methods none (unpruned runs keep every token)")
    if args.policies is not None and args.ablation:
        raise ConfigError("--ablation compares DSTP's own variants; --policies has no effect there")
    if args.policies is not None and "dstp" in cfg.policies and not methods:
        raise ConfigError("--policies dstp runs DSTP on top of pruners: --methods needs at least one pruner")
    if not methods and args.ablation:
        raise ConfigError("--ablation compares DSTP variants on pruners: --methods needs at least one pruner")
    inside = [m for m in methods if PRUNERS[m].default_layer > 0]
    if args.prune_layer is not None and not inside:
        within = sorted(m for m, p in PRUNERS.items() if p.default_layer > 0)
        raise ConfigError(f"--prune-layer sets K of the pruners inside the LLM ({', '.join(within)}); "
                          f"--methods {','.join(methods) or 'none'} has none of them")


def output_dir(args) -> str:
    """--out, else results/ (results/quick/ for --quick, never over a full run), + ablation/ for --ablation."""
    if args.out is not None:
        return args.out
    base = os.path.join("results", "quick") if args.quick else "results"
    return os.path.join(base, "ablation") if args.ablation else base


def run(args) -> int:
    cfg = bench_config(args)
    out = output_dir(args)
    console = Console(width=150)
    pipe = load_pipeline(cfg.model)
    check_model(pipe, cfg)
    console.print(f"writing to {out}/ (bench.json and bench.md after every run, plots at the end)")
    partial = lambda records: save(records, out)  # noqa: E731
    if args.ablation:
        records = run_ablation(cfg, console, pipe, partial)
    else:
        records = run_bench(cfg, console, pipe, partial)
    print_table(records, console)
    path = save(records, out)
    plots = plot_all(records, out)
    console.print(f"wrote {path}" + "".join(f", {p}" for p in plots))
    return 0
