"""`dstp shiftbench sample --out DIR`: ShiftBench images (lossless PNG) and their prompts, to try by hand with
`dstp generate` or `dstp analyze`. `DIR/prompts.jsonl` holds one line per image: file, prompt, reference target
and answer."""
from __future__ import annotations

import json
import os
import shlex

from PIL import Image

from dstp.errors import ConfigError


def shipped_max_hops() -> int:
    """The longest walk the shipped model was trained on (what its processor accepts)."""
    from dstp.lab.shiftbench import default_checkpoint_dir
    from dstp.lab.shiftbench.processor import trained_max_hops
    from dstp.lab.shiftbench.tasks import MAX_HOPS

    return trained_max_hops(default_checkpoint_dir()) or MAX_HOPS


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


def write_samples(out: str, task: str, n: int, seed: int, hops: int | None = None) -> list[dict]:
    """n samples of `task` as out/<task>_<i>.png plus out/prompts.jsonl; the rows written."""
    from dstp.lab.shiftbench import generate_samples

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


def run_sample_cli(args) -> int:
    check_sample_args(args)
    rows = write_samples(args.out, args.task, args.n, args.seed, args.hops)
    for r in rows:
        print(f"dstp generate --image {shlex.quote(r['image'])} --prompt {shlex.quote(r['prompt'])}"
              f"    # reference: {r['target']}")
    print(f"wrote {len(rows)} PNG(s) and {os.path.join(args.out, 'prompts.jsonl')}")
    return 0
