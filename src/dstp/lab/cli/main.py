"""`dstp` command line: bench, generate, analyze, speed, fidelity, shiftbench (train, sample, export)."""
from __future__ import annotations

import sys

from dstp.lab.cli import analyze, bench, fidelity, generate, shiftbench, speed, train
from dstp.lab.cli.common import OneLineParser, quiet_transformers, run_command

SUBCOMMANDS = (bench, generate, analyze, speed, fidelity, shiftbench)  # each: add_parser(sub), its parsers' `run`


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="dstp", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["shiftbench", "train"]:  # every remaining argument is the trainer's (its own parser)
        return train.main(argv[2:])
    args = build_parser().parse_args(argv)
    quiet_transformers()
    return run_command(f"dstp {args.command}", args.run, args)


if __name__ == "__main__":
    sys.exit(main())
