"""The path a user takes: `pip install "dstp[eval]"` into a fresh venv (no lock file), then the real path offline.

`make test-install` builds the wheel (`pip wheel . --no-deps`), installs it with its extras into a fresh venv and
runs this file there, against the installed package (not the source tree); `make test` runs it too, in the locked
venv, where the two tests of the wheel itself are skipped (an editable install has no wheel). Each test is one
thing a new user does first: import dstp on the versions pip resolved, load a hub-shaped checkpoint by id offline
and chat with an image, run `lmms-eval --model dstp` on a few ShiftBench samples, and run `dstp bench --quick`.
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dstp
from dstp.models import hf_compat
from hub_fixtures import conversation, sample_images

PACKAGE = Path(dstp.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[1]
from_wheel = pytest.mark.skipif(PACKAGE.is_relative_to(REPO / "src"),
                                reason="dstp is installed editable from this tree: make test-install checks the wheel")
# what the wheel ships of the ShiftBench checkpoint (pyproject.toml's package data): the checkpoint and its model card
CHECKPOINT = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "shiftbench_processor.json", "training_record.json", "MODEL_CARD.md"}


def test_installed_versions_are_in_the_tested_range():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf_compat.check_versions() == []


def test_load_by_id_offline_and_chat_equals_generate(hub_models):
    pipe = dstp.load(hub_models["qwen2_5_vl"])
    conv = conversation(sample_images(1, seed=5, sizes=[(64, 48)]), "What is in the picture?")
    out = pipe.chat([conv], max_new_tokens=8, do_sample=False)
    inputs = pipe.processor.apply_chat_template([copy.deepcopy(conv)], add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
    ref = pipe.adapter.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(out.tokens[0], ref[0, inputs["input_ids"].shape[1]:])


def test_lmms_eval_command_line_on_shiftbench(tmp_path):
    from dstp.lab.cli.main import main
    from dstp.lab.shiftbench import default_checkpoint_dir

    tasks = tmp_path / "tasks"
    assert main(["shiftbench", "export", "--out", str(tasks), "--seed", "3", "--n", "2"]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("lmms-eval")), "--model", "dstp", "--model_args",
         f"pretrained={default_checkpoint_dir()},prune=fastv,retention=0.333,dstp=true", "--tasks", "shiftbench",
         "--include_path", str(tasks), "--output_path", str(out)],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # lmms-eval reports a failed evaluation in its log and still exits 0
    assert "Error during evaluation" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    [results] = list(out.rglob("*_results.json"))
    scores = json.loads(results.read_text())["results"]
    assert {"shiftbench_lookup", "shiftbench_pair", "shiftbench_walk"} <= set(scores) or "shiftbench" in scores


@from_wheel
def test_the_wheel_holds_the_checkpoint_and_its_model_card_only():
    checkpoint = PACKAGE / "lab" / "shiftbench" / "checkpoint"
    assert {f.name for f in checkpoint.iterdir()} == CHECKPOINT
    installed = importlib.metadata.files("dstp")
    data = [str(f) for f in installed if f.parts[0] == "dstp" and f.suffix not in (".py", ".pyc")]
    assert sorted(data) == sorted(f"dstp/lab/shiftbench/checkpoint/{name}" for name in CHECKPOINT)


@from_wheel
def test_dstp_bench_quick_from_the_installed_package(tmp_path):
    """`dstp bench --quick` through the installed console script, on the shipped checkpoint (its preset, with 4
    samples per task instead of 24 to keep make test-install short)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(Path(sys.executable).with_name("dstp")), "bench", "--quick", "--n", "4", "--out",
                           str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "bench.json").read_text())
    runs = {(r["task"], r["method"], r["shift"]) for r in records}
    assert runs == {(t, m, s) for t in ("lookup", "pair", "walk") for m, s in
                    [("none", "none"), *((m, s) for m in ("fastv", "divprune") for s in ("none", "dstp"))]}
    assert all(r["n"] == 4 and r["model"] == "shiftbench (shipped)" for r in records)
    assert all((tmp_path / png).stat().st_size > 1000 for png in
               ("accuracy_vs_retention.png", "accuracy_vs_gflops.png", "success_by_rvis_events.png"))
