"""The CLI's bad-input contract: one line on stderr, exit code 2, no traceback; and a working generate."""
import json

import numpy as np
import pytest
from PIL import Image

from dstp.cli import main
from dstp.shiftbench import generate_samples
from dstp.shiftbench.processor import ShiftBenchProcessor
from dstp.shiftbench.train import TrainConfig, build_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sb")
    processor = ShiftBenchProcessor.build()
    build_model(TrainConfig(seed=0), processor).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    sample = generate_samples("lookup", 1, seed=0)[0]
    path = tmp_path_factory.mktemp("img") / "grid.png"
    Image.fromarray(sample.image).save(path)
    return str(path), sample.prompt


def run_cli(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--image", "IMG", "--prompt", "P", "--prune", "fastv", "--retention", "1.5", "--model", "M"],
     "retention must be in (0, 1]"),
    (["generate", "--image", "IMG", "--prompt", "P", "--prune", "nope", "--retention", "0.5", "--model", "M"],
     "unknown pruning method 'nope'"),
    (["generate", "--image", "/no/such.png", "--prompt", "P", "--model", "M"], "image not found"),
    (["generate", "--image", "BAD", "--prompt", "P", "--model", "M"], "cannot read image"),
    (["generate", "--image", "IMG", "--prompt", "P", "--model", "/no/such/dir"], "checkpoint not found"),
    (["bench", "--methods", "nope", "--model", "M"], "unknown method 'nope'"),
    (["bench", "--retentions", "0.5,2", "--model", "M"], "retention must be in (0, 1]"),
    (["bench", "--tasks", "maze", "--model", "M"], "unknown task 'maze'"),
    (["bench", "--retentions", "abc"], "expected comma-separated numbers"),
    (["bench", "--prune-layer", "0", "--model", "M"], "--prune-layer must be >= 1"),
    (["bench", "--prune-layer", "16", "--model", "M", "--n", "1", "--tasks", "lookup", "--methods", "fastv"],
     "prune layer 16 is outside"),
    (["shiftbench", "train", "--read-layer", "16"], "read_layer must be in 0..15"),
    (["shiftbench", "train", "--locate-layers", "3"], "locate_layers must lie below read_layer 2"),
    (["shiftbench", "train", "--hide-rows", "1.5"], "hide_rows must be in [0, 1]"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, model_dir, image_file, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    argv = [{"IMG": image_file[0], "M": model_dir, "BAD": str(bad), "P": image_file[1]}.get(a, a) for a in argv]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


def test_generate_prints_answer_and_trace(model_dir, image_file, capsys):
    path, prompt = image_file
    code = run_cli(["generate", "--model", model_dir, "--image", path, "--prompt", prompt, "--prune", "divprune",
                    "--retention", "0.333", "--dstp", "--max-new-tokens", "4", "--trace"])
    assert code == 0
    out = capsys.readouterr().out
    trace = json.loads(out[out.index("{"):])
    assert trace["n_visual"] == 144 and len(trace["kept"]) == 48
    assert all("similarity" in s for s in trace["steps"])


def test_bench_writes_records_and_plots(model_dir, tmp_path):
    out = tmp_path / "res"
    code = run_cli(["bench", "--model", model_dir, "--n", "4", "--methods", "fastv,divprune", "--tasks", "walk",
                    "--retentions", "0.333", "--out", str(out), "--batch-size", "4"])
    assert code == 0
    records = json.loads((out / "bench.json").read_text())
    keys = {"task", "method", "shift", "retention", "n", "accuracy", "rvis_events_mean", "visual_tokens_per_step",
            "prefill_flops", "decode_flops", "kv_bytes_peak", "seconds", "model", "seed"}
    assert all(keys <= set(r) for r in records)
    combos = {(r["method"], r["shift"]) for r in records}
    assert combos == {("none", "none"), ("fastv", "none"), ("fastv", "dstp"), ("divprune", "none"),
                      ("divprune", "dstp")}
    by = {(r["method"], r["shift"]): r for r in records}
    assert by[("fastv", "none")]["prune_layer"] == 1  # K=1: 2 of 32 layers' fraction of this 16-layer model
    assert by[("divprune", "none")]["prune_layer"] == 0
    assert by[("fastv", "none")]["visual_tokens_per_step"] == 48  # ceil(0.333 * 144) really attended
    assert by[("fastv", "none")]["prefill_flops"] < by[("none", "none")]["prefill_flops"]
    for png in ("accuracy_vs_retention.png", "accuracy_vs_tflops.png", "success_by_rvis_events.png"):
        assert (out / png).stat().st_size > 1000
