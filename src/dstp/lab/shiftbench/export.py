"""What `dstp shiftbench export` writes (its command: lab/cli/shiftbench.py): ShiftBench samples as a local dataset
plus lmms-eval task YAMLs.

The samples are the very ones `dstp bench --seed S --n N` evaluates (`generate_samples(task, N, seed=S)`), the
generation length is the one it uses (the task's longest target + 2 tokens, greedy), and the tasks score with
dstp's own `check_answer`. The folder, for ``lmms-eval --include_path DIR``:

    DIR/lookup.jsonl, pair.jsonl, walk.jsonl   one sample per line (question, answer, target, hops, image path)
    DIR/images/<task>/<i>.png                  the rendered grids (lossless)
    DIR/shiftbench_<task>.yaml                 tasks shiftbench_lookup, shiftbench_pair, shiftbench_walk
    DIR/shiftbench.yaml                        group shiftbench (the three tasks)
    DIR/manifest.json                          seed, n, what was written

Paths inside the YAMLs and JSONL files are absolute: export again after moving the folder. lmms-eval reads the
JSONL files with `datasets`' json loader, so `HF_DATASETS_OFFLINE=1` works. Nothing here imports lmms-eval.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from dstp.errors import ConfigError
from dstp.lab.shiftbench.tasks import IMAGE_TOKEN, TASKS, Sample, check_answer, generate_samples

GROUP = "shiftbench"
HOOKS = "dstp.lab.shiftbench.export"  # lmms-eval's `!function` imports these by module path

TASK_YAML = """\
# Written by `dstp shiftbench export --seed {seed} --n {n}`: the samples `dstp bench --seed {seed} --n {n}` evaluates.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function {hooks}.doc_to_visual
doc_to_text: !function {hooks}.doc_to_text
doc_to_target: answer
process_results: !function {hooks}.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  until: []
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
  seed: {seed}
  n: {n}
"""

GROUP_YAML = """\
# Written by `dstp shiftbench export --seed {seed} --n {n}`.
group: {group}
task:
{tasks}
aggregate_metric_list:
  - metric: accuracy
    aggregation: mean
    weight_by_size: true
metadata:
  version: 1
"""


def task_name(task: str) -> str:
    return f"{GROUP}_{task}"


def max_new_tokens(samples: list[Sample]) -> int:
    """The generation length `dstp bench` gives a task: its longest target (in tokens) + 2."""
    return max(len(s.target.split()) for s in samples) + 2


def question(sample: Sample) -> str:
    """The prompt without its leading image placeholder: the text item of the chat message."""
    if not sample.prompt.startswith(IMAGE_TOKEN + " "):
        raise ValueError(f"a ShiftBench prompt starts with {IMAGE_TOKEN!r}, got {sample.prompt!r}")
    return sample.prompt[len(IMAGE_TOKEN) + 1:]


def export(out, seed: int = 1234, n: int = 500, tasks=TASKS) -> dict:
    """Write the dataset and task YAMLs into `out`; returns the manifest (also written as manifest.json)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {n!r}")
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ConfigError(f"unknown task {bad[0] if bad else None!r}; known: {', '.join(TASKS)}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"seed": seed, "n": n, "group": GROUP, "tasks": {}}
    for task in tasks:
        samples = generate_samples(task, n, seed=seed)
        images = out / "images" / task
        images.mkdir(parents=True, exist_ok=True)
        data = out / f"{task}.jsonl"
        with open(data, "w") as f:
            for i, s in enumerate(samples):
                path = images / f"{i:05d}.png"
                Image.fromarray(s.image).save(path)
                row = dict(id=i, task=task, question=question(s), prompt=s.prompt, target=s.target, answer=s.answer,
                           hops=s.hops, cells_needed=[int(c) for c in s.cells_needed], image=str(path))
                f.write(json.dumps(row) + "\n")
        new_tokens = max_new_tokens(samples)
        (out / f"{task_name(task)}.yaml").write_text(TASK_YAML.format(
            name=task_name(task), data=data, hooks=HOOKS, max_new_tokens=new_tokens, seed=seed, n=n))
        manifest["tasks"][task_name(task)] = {"data": str(data), "n": len(samples), "max_new_tokens": new_tokens}
    (out / f"{GROUP}.yaml").write_text(GROUP_YAML.format(
        group=GROUP, tasks="\n".join(f"  - {task_name(t)}" for t in tasks), seed=seed, n=n))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---- the hooks the task YAMLs name (lmms-eval calls them with one dataset row, `doc`) ----

def doc_to_visual(doc: dict) -> list:
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]


def sample_of(doc: dict) -> Sample:
    """The row as a ShiftBench `Sample` (without its image), for dstp's own scoring."""
    return Sample(task=doc["task"], image=None, prompt=doc["prompt"], target=doc["target"], answer=doc["answer"],
                  hops=doc["hops"], cells_needed=list(doc["cells_needed"]), token_dependencies=[])


def process_results(doc: dict, results: list) -> dict:
    """Exact-answer accuracy of one generated text, scored by `check_answer` as `dstp bench` scores it."""
    return {"accuracy": float(check_answer(sample_of(doc), results[0]))}
