"""Does DSTP revive the cell the model needs next? ``python -m dstp.lab.cli.revival_check --task pair``.

For every decoding step at which the cell the next answer token must read (``Sample.token_reads``) was pruned
at prefill, and the answer so far matches the reference, count: whether DSTP shifted, whether it revived the
needed cell, and whether it revived the cell named by the token just fed in (its probe's query). In a walk
those two cells are the same; in a pair they are not.
"""
from __future__ import annotations

import torch
from PIL import Image

from dstp.config import GenerationConfig
from dstp.lab.shiftbench.symbols import parse_cell_name
from dstp.lab.shiftbench.tasks import generate_samples


def named_cell(word: str, grid_size: int) -> int | None:
    rc = parse_cell_name(word)
    return None if rc is None else rc[0] * grid_size + rc[1]


@torch.no_grad()
def revival_check(pipe, task: str, n: int = 200, seed: int = 1234, batch_size: int = 50) -> dict:
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
