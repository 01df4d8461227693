"""``python -m dstp.lab.cli.card DIR [--eval-n N | --notes-only]``: rewrite a trained ShiftBench checkpoint's
MODEL_CARD.md (lab/shiftbench/card.py) from its training record, after re-running the final evaluation on N fresh
samples per task if asked; ``--notes-only`` re-renders it from the saved analysis.json and NOTES.md without running
the model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dstp.errors import ConfigError
from dstp.lab.cli.common import OneLineParser, run_command
from dstp.lab.shiftbench import load_shiftbench
from dstp.lab.shiftbench.card import render_files, write_card
from dstp.lab.shiftbench.train import FINAL_EVAL_SEED, final_metrics

PROG = "python -m dstp.lab.cli.card"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Rewrite a trained ShiftBench checkpoint's MODEL_CARD.md.")
    parser.add_argument("dir", type=Path, help="a trained ShiftBench checkpoint directory")
    parser.add_argument("--eval-n", type=int, default=None,
                        help="re-run the final evaluation with this many fresh samples per task / hop count first")
    parser.add_argument("--notes-only", action="store_true",
                        help="re-render the card from the saved analysis.json and NOTES.md (no model run)")
    return parser


def check_args(args) -> None:
    if not args.dir.is_dir():
        raise ConfigError(f"{args.dir} is not a directory")
    needed = ["training_record.json"] + (["analysis.json"] if args.notes_only else ["config.json"])
    missing = [f for f in needed if not (args.dir / f).is_file()]
    if missing:
        raise ConfigError(f"{args.dir} has no {', '.join(missing)}: is it a trained ShiftBench checkpoint?")
    if args.notes_only and args.eval_n is not None:
        raise ConfigError("--eval-n re-runs the model, which --notes-only does not: pass one of them")
    if args.eval_n is not None and args.eval_n < 1:
        raise ConfigError(f"--eval-n must be >= 1, got {args.eval_n}")


def run(args) -> int:
    check_args(args)
    if args.notes_only:
        render_files(args.dir, json.loads((args.dir / "analysis.json").read_text()))
        return 0
    return rewrite_card(args.dir, args.eval_n)


def rewrite_card(out_dir: Path, eval_n: int | None) -> int:
    torch.set_num_threads(2)
    model, processor = load_shiftbench(out_dir)
    if eval_n is not None:
        path = out_dir / "training_record.json"
        record = json.loads(path.read_text())
        with torch.no_grad():
            record.update(eval_n=eval_n, eval_seed=FINAL_EVAL_SEED, metrics=final_metrics(model, processor, eval_n))
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["metrics"]))
    print(json.dumps(write_card(out_dir, model, processor), indent=1))
    return 0


def main(argv=None) -> int:
    return run_command(PROG, run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
