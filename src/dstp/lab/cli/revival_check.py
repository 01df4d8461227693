"""``python -m dstp.lab.cli.revival_check --task pair``: does DSTP revive the cell the model needs next? Counts per
decoding step whose needed cell was pruned at prefill (lab/shiftbench/revival_check.py); one JSON line."""
from __future__ import annotations

import json
import sys

import dstp
from dstp.config import DSTPConfig, PruneConfig, check_retention
from dstp.errors import ConfigError
from dstp.lab.cli.common import OneLineParser, default_model, run_command
from dstp.lab.shiftbench.revival_check import revival_check
from dstp.pruners import PRUNERS

PROG = "python -m dstp.lab.cli.revival_check"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Does DSTP revive the cell the model needs next?")
    parser.add_argument("--task", default="pair", choices=("pair", "walk"),
                        help="pair or walk (a lookup reads its cell at prefill, before any decoding step)")
    parser.add_argument("--method", default="fastv", choices=sorted(PRUNERS), help="the pruner DSTP runs on")
    parser.add_argument("--retention", type=float, default=0.333)
    parser.add_argument("--n", type=int, default=200, help="samples")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", default=None, help="model dir (default: the shipped ShiftBench model)")
    return parser


def check_args(args) -> None:
    check_retention(args.retention)
    if args.retention == 1.0:
        raise ConfigError("--retention 1 keeps every visual token: nothing is pruned, so there is nothing to revive")
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")


def run(args) -> int:
    check_args(args)
    pipe = dstp.load(args.model or default_model(), prune=PruneConfig(args.method, args.retention), shift=DSTPConfig())
    if pipe.adapter.family != "shiftbench":
        raise ConfigError(f"revival_check needs a ShiftBench model; {args.model} is a {pipe.adapter.family} model")
    result = revival_check(pipe, args.task, args.n, args.seed)
    print(json.dumps({"method": args.method, "retention": args.retention, **result}))
    return 0


def main(argv=None) -> int:
    return run_command(PROG, run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
