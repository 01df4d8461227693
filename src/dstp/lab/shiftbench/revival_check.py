"""Does DSTP revive the cell the model needs next? ``python -m dstp.lab.shiftbench.revival_check --task pair``.

For every decoding step at which the cell the next answer token must read (``Sample.token_reads``) was pruned
at prefill, and the answer so far matches the reference, count: whether DSTP shifted, whether it revived the
needed cell, and whether it revived the cell named by the token just fed in (its probe's query). In a walk
those two cells are the same; in a pair they are not.
"""
from __future__ import annotations

import json
import sys

import torch
from PIL import Image

from dstp.config import DSTPConfig, GenerationConfig, PruneConfig
from dstp.errors import ConfigError, DSTPError
from dstp.lab.shiftbench.symbols import parse_cell_name

PROG = "python -m dstp.lab.shiftbench.revival_check"


def named_cell(word: str, grid_size: int) -> int | None:
    rc = parse_cell_name(word)
    return None if rc is None else rc[0] * grid_size + rc[1]


@torch.no_grad()
def revival_check(pipe, task: str, n: int = 200, seed: int = 1234, batch_size: int = 50) -> dict:
    from dstp.lab.shiftbench import generate_samples

    samples = generate_samples(task, n, seed=seed)
    grid = samples[0].pointers.shape[0]
    counts = dict(missing_reads=0, shifted=0, revived_needed=0, revived_fed_cell=0)
    for i in range(0, n, batch_size):
        part = samples[i:i + batch_size]
        prepared = pipe.prepare([Image.fromarray(s.image) for s in part], [s.prompt for s in part])
        longest = max(len(s.target.split()) for s in part)
        relevant = torch.zeros(len(part), prepared.visual_mask.sum(-1).max(), dtype=torch.bool)
        for b, s in enumerate(part):
            relevant[b, s.cells_needed] = True  # what the oracle pruner keeps; the other pruners ignore it
        res = pipe.generate_prepared(prepared, GenerationConfig(max_new_tokens=longest + 1), relevant=relevant)
        for b, s in enumerate(part):
            row, ref, said = res.trace.row(b), s.target.split(), res.texts[b].split()
            kept = set(row["kept"])
            for t, step in enumerate(row["steps"]):  # step t feeds answer token t and writes token t + 1
                if t + 1 >= len(ref) or said[: t + 1] != ref[: t + 1]:
                    break
                need = s.token_reads[t + 1]
                if not need or need <= kept:
                    continue
                revived = set(step["revived"])
                counts["missing_reads"] += 1
                counts["shifted"] += step["shift"]
                counts["revived_needed"] += bool(need & revived)
                counts["revived_fed_cell"] += named_cell(ref[t], grid) in revived
    return {"task": task, "n": n, "seed": seed, **counts}


def build_parser():
    from dstp.cli import OneLineParser
    from dstp.pruners import PRUNERS

    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pair", choices=("pair", "walk"),
                        help="pair or walk (a lookup reads its cell at prefill, before any decoding step)")
    parser.add_argument("--method", default="fastv", choices=sorted(PRUNERS), help="the pruner DSTP runs on")
    parser.add_argument("--retention", type=float, default=0.333)
    parser.add_argument("--n", type=int, default=200, help="samples")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", default=None, help="model dir (default: the shipped ShiftBench model)")
    return parser


def check_args(args) -> None:
    from dstp.config import check_retention

    check_retention(args.retention)
    if args.retention == 1.0:
        raise ConfigError("--retention 1 keeps every visual token: nothing is pruned, so there is nothing to revive")
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")


def main(argv=None) -> int:
    import dstp
    from dstp.lab.shiftbench import default_checkpoint_dir

    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        pipe = dstp.load(args.model or str(default_checkpoint_dir()), prune=PruneConfig(args.method, args.retention),
                         shift=DSTPConfig())
        if pipe.adapter.family != "shiftbench":
            raise ConfigError(f"revival_check needs a ShiftBench model; {args.model} is a {pipe.adapter.family} model")
        result = revival_check(pipe, args.task, args.n, args.seed)
    except DSTPError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"method": args.method, "retention": args.retention, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
