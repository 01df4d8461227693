"""`dstp shiftbench train | sample | export`: the ShiftBench model's tools. `train` hands every argument after it to
the trainer's own parser (lab/cli/train.py); `sample` writes images and prompts to try by hand; `export` writes the
samples `dstp bench` evaluates as lmms-eval tasks."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from dstp.errors import ConfigError
from dstp.lab.cli import train
from dstp.lab.cli.common import OneLineParser, csv_list
from dstp.lab.shiftbench import TASKS
from dstp.lab.shiftbench.export import GROUP, export
from dstp.lab.shiftbench.sample import shipped_max_hops, write_samples


def add_parser(sub) -> None:
    sb = sub.add_parser("shiftbench", help="ShiftBench model tools")
    sbs = sb.add_subparsers(dest="shiftbench_command", required=True, parser_class=OneLineParser)
    t = sbs.add_parser("train", help="train the ShiftBench model (all remaining args go to the trainer)",
                       add_help=False)
    t.set_defaults(run=lambda args: train.main([]))  # `dstp shiftbench train ...` reaches train.main before parsing
    ss = sbs.add_parser("sample", help="write ShiftBench images (PNG) and their prompts to try dstp generate on")
    ss.add_argument("--out", required=True, help="output folder")
    ss.add_argument("--task", default="walk", choices=("lookup", "pair", "walk"))
    ss.add_argument("--n", type=int, default=3, help="how many samples")
    ss.add_argument("--seed", type=int, default=0)
    ss.add_argument("--hops", type=int, default=None, help="walk length (--task walk only; default: 2..6 at random)")
    ss.set_defaults(run=run_sample)
    se = sbs.add_parser("export", help="write ShiftBench samples + lmms-eval task YAMLs (the samples dstp bench "
                                       "evaluates with the same --seed/--n)")
    se.add_argument("--out", required=True, help="output folder (lmms-eval --include_path)")
    se.add_argument("--seed", type=int, default=1234, help="seed of the samples, as dstp bench --seed")
    se.add_argument("--n", type=int, default=500, help="samples per task, as dstp bench --n")
    se.add_argument("--tasks", type=csv_list, default=None, help="comma list of lookup,pair,walk (default: all)")
    se.set_defaults(run=run_export)


def check_sample_args(args) -> None:
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.hops is not None and args.task != "walk":
        raise ConfigError(f"--hops applies only to --task walk, not {args.task}")
    most = shipped_max_hops()
    if args.hops is not None and not 1 <= args.hops <= most:
        raise ConfigError(f"--hops {args.hops}: the shipped model was built for walks of 1..{most} hops")
    if os.path.isfile(args.out):
        raise ConfigError(f"--out {args.out} is a file, not a folder")


def run_sample(args) -> int:
    check_sample_args(args)
    rows = write_samples(args.out, args.task, args.n, args.seed, args.hops)
    for r in rows:
        print(f"dstp generate --image {shlex.quote(r['image'])} --prompt {shlex.quote(r['prompt'])}"
              f"    # reference: {r['target']}")
    print(f"wrote {len(rows)} PNG(s) and {os.path.join(args.out, 'prompts.jsonl')}")
    return 0


def run_export(args) -> int:
    manifest = export(args.out, seed=args.seed, n=args.n, tasks=tuple(args.tasks) if args.tasks else TASKS)
    names = ", ".join(manifest["tasks"])
    print(f"wrote {args.out}: {names} (group {GROUP}), {args.n} samples each, seed {args.seed}; "
          f"run: lmms-eval --model dstp --tasks {GROUP} --include_path {Path(args.out).resolve()} ...")
    return 0
