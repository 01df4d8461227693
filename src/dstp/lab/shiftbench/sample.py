"""What `dstp shiftbench sample --out DIR` writes (its command: lab/cli/shiftbench.py): ShiftBench images (lossless
PNG) and their prompts, to try by hand with `dstp generate` or `dstp analyze`. `DIR/prompts.jsonl` holds one line
per image: file, prompt, reference target and answer."""
from __future__ import annotations

import json
import os

from PIL import Image

from dstp.lab.shiftbench import default_checkpoint_dir, generate_samples
from dstp.lab.shiftbench.processor import trained_max_hops
from dstp.lab.shiftbench.tasks import MAX_HOPS


def shipped_max_hops() -> int:
    """The longest walk the shipped model was trained on (what its processor accepts)."""
    return trained_max_hops(default_checkpoint_dir()) or MAX_HOPS


def write_samples(out: str, task: str, n: int, seed: int, hops: int | None = None) -> list[dict]:
    """n samples of `task` as out/<task>_<i>.png plus out/prompts.jsonl; the rows written."""
    samples = generate_samples(task, n, seed=seed, hops=hops)
    os.makedirs(out, exist_ok=True)
    rows = []
    for i, s in enumerate(samples):
        path = os.path.join(out, f"{task}_{i}.png")
        Image.fromarray(s.image).save(path)
        rows.append({"image": path, "prompt": s.prompt, "target": s.target, "answer": s.answer, "hops": s.hops})
    with open(os.path.join(out, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows
