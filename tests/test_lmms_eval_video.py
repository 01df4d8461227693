"""lmms-eval's video requests through the `dstp` model, offline: a small "which frame shows the red square" task
written here (MPEG-4 clips generated and written with PyAV; lmms-eval passes each clip's path in the visuals list,
dstp decodes it with transformers' PyAV reader), run through the real `lmms-eval` command line on the Qwen2.5-VL
hub fixture with EVS + DSTP; every logged answer must equal `pipe.chat` on the same clip file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("CI"):  # `make test` installs the eval extra: CI must run these tests, not skip them
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval")

import dstp
from video_clips import moving_square, write_clip

LMMS_EVAL = str(Path(sys.executable).with_name("lmms-eval"))
N_FRAMES, RED = 8, (1, 3, 6)  # one clip per red-square frame
QUESTION = f"The clip has {N_FRAMES} frames. Which frame (1-{N_FRAMES}) shows the red square? Answer with a number."

TASK_YAML = """\
task: red_frame
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function red_frame_utils.doc_to_visual
doc_to_text: !function red_frame_utils.doc_to_text
doc_to_target: answer
process_results: !function red_frame_utils.process_results
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  until: []
metric_list:
  - metric: frame_accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""

TASK_UTILS = f'''\
def doc_to_visual(doc):
    return [doc["video"]]  # a file path: lmms-eval makes it a video item by its extension


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return {QUESTION!r}


def process_results(doc, results):
    return {{"frame_accuracy": float(results[0].strip().split(" ")[0] == doc["answer"])}}
'''


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("red_frame")
    rows = []
    for i, red in enumerate(RED):
        path = write_clip(moving_square(N_FRAMES, seed=i, red_frame=red), folder / f"clip{i}.mp4", fps=4)
        rows.append({"video": path, "answer": str(red + 1)})
    data = folder / "red_frame.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "red_frame.yaml").write_text(TASK_YAML.format(data=data))
    (folder / "red_frame_utils.py").write_text(TASK_UTILS)
    return folder


def test_lmms_eval_video_task_equals_pipe_chat(task_folder, hub_models, tmp_path):
    model_args = f"pretrained={hub_models['qwen2_5_vl']},prune=evs,retention=0.5,dstp=true,batch_size=2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([LMMS_EVAL, "--model", "dstp", "--model_args", model_args, "--tasks", "red_frame",
                           "--include_path", str(task_folder), "--output_path", str(tmp_path), "--log_samples"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and "Error during evaluation" not in proc.stdout + proc.stderr, log
    [samples] = list(tmp_path.rglob("*_samples_red_frame.jsonl"))
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    assert len(rows) == len(RED)
    records = [json.loads(line) for p in tmp_path.rglob("*_dstp_efficiency*.jsonl") for line in p.read_text().splitlines()]
    assert len(records) == len(RED) and all(r["kept"] < r["n_visual"] for r in records)  # EVS pruned each clip

    pipe = dstp.load(hub_models["qwen2_5_vl"], prune=dstp.PruneConfig("evs", 0.5), shift=dstp.DSTPConfig())
    clips = sorted(task_folder.glob("clip*.mp4"))
    for start in (0, 2):  # the harness's batches of 2, in doc order
        convs = [[{"role": "user", "content": [{"type": "video", "video": str(c)},
                                               {"type": "text", "text": QUESTION}]}] for c in clips[start:start + 2]]
        texts = pipe.chat(convs, max_new_tokens=4, do_sample=False).texts
        for row, text in zip(rows[start:start + 2], texts):
            # lmms-eval 0.7.3 logs the raw text as `resps` only where it differs from the stripped `filtered_resps`
            assert row.get("resps", row["filtered_resps"]) == text
