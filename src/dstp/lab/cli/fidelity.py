"""`dstp fidelity`: the engine against transformers' generate() on a tiny model of every family
(lab/bench/fidelity.py); exit status 1 when a row differs."""
from __future__ import annotations

from dstp.lab.bench.fidelity import run_fidelity
from dstp.lab.cli.common import csv_list


def add_parser(sub) -> None:
    f = sub.add_parser("fidelity", help="engine vs transformers generate() on tiny models of every family")
    f.add_argument("--new-tokens", type=int, default=32)
    f.add_argument("--out", default=None, help="write the rows as JSON here")
    f.add_argument("--device", default="cpu")
    f.add_argument("--dtypes", type=csv_list, default=["float32", "bfloat16"], help="comma list of float32,bfloat16")
    f.set_defaults(run=run)


def run(args) -> int:
    rows = run_fidelity(new_tokens=args.new_tokens, out_path=args.out, device=args.device, dtypes=tuple(args.dtypes))
    return 0 if all(r["tokens_identical"] and r["max_abs_logit_diff"] < 1e-5 for r in rows) else 1
