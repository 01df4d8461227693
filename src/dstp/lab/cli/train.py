"""`dstp shiftbench train` (also `python -m dstp.lab.cli.train`): train the ShiftBench model from a seed
(lab/shiftbench/train.py) into --out, with its training record, analysis and model card."""
from __future__ import annotations

import sys
from pathlib import Path

from dstp.lab.cli.common import OneLineParser, run_command
from dstp.lab.shiftbench.train import TrainConfig, train

PROG = "dstp shiftbench train"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Train the ShiftBench model from a seed.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/shiftbench-seed<S>)")
    parser.add_argument("--log", type=Path, default=None,
                        help="JSON-lines log (default: <out>.train.jsonl beside <out>)")
    parser.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--layers", type=int, default=TrainConfig.layers)
    parser.add_argument("--read-layer", type=int, default=TrainConfig.read_layer,
                        help="first layer initialised as the cell lookup")
    parser.add_argument("--locate-layers", type=lambda v: tuple(int(x) for x in v.split(",") if x),
                        default=TrainConfig.locate_layers,
                        help="comma list of layers below --read-layer whose q/k also start as the filter ('' for none)")
    parser.add_argument("--every-layer", action="store_true",
                        help="initialise every layer from --read-layer up as the lookup")
    parser.add_argument("--freeze-below-steps", type=int, default=TrainConfig.freeze_below_steps,
                        help="steps the layers below --read-layer stay frozen identities")
    parser.add_argument("--hide-rows", type=float, default=TrainConfig.hide_rows,
                        help="share of rows with unneeded visual tokens hidden (0 = off)")
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--eval-n", type=int, default=500, help="fresh samples per task / hop count at the end")
    return parser


def run(args) -> int:
    out = args.out or Path("runs") / f"shiftbench-seed{args.seed}"
    log = args.log or out.parent / f"{out.name}.train.jsonl"
    cfg = TrainConfig(seed=args.seed, steps=args.steps, layers=args.layers, read_layer=args.read_layer,
                      read_every_layer=args.every_layer, locate_layers=args.locate_layers,
                      freeze_below_steps=args.freeze_below_steps, hide_rows=args.hide_rows, threads=args.threads)
    train(cfg, out, log, args.minutes, args.eval_n)
    return 0


def main(argv=None) -> int:
    return run_command(PROG, run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
