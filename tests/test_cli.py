"""The CLI's bad-input contract: one line on stderr, exit code 2, no traceback; and a working generate."""
import json

import numpy as np
import pytest
from PIL import Image

from dstp.lab.cli.main import main
from dstp.lab.shiftbench import generate_samples
from dstp.lab.shiftbench.processor import ShiftBenchProcessor
from dstp.lab.shiftbench.train import TrainConfig, build_model


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
    (["bench", "--methods", "none", "--retentions", "0.5", "--model", "M"], "--retentions has no effect with --methods none"),
    (["bench", "--methods", "divprune", "--prune-layer", "2", "--model", "M"], "--prune-layer sets K of the pruners inside"),
    (["bench", "--ablation", "--methods", "none", "--model", "M"], "--ablation compares DSTP variants on pruners"),
    (["bench", "--batch-size", "0", "--model", "M"], "--batch-size must be >= 1"),
    (["bench", "--methods", "none,fastv", "--model", "M"], "the unpruned runs only, which every bench includes"),
    (["bench", "--out", "BAD", "--model", "M"], "is a file, not a folder"),
    (["analyze", "--layer", "40", "--model", "M"], "--layer 40 is outside the model's 16 layers (0..15)"),
    (["analyze", "--prompt", "P", "--model", "M"], "--prompt needs --image"),
    (["analyze", "--image", "IMG", "--model", "M"], "--image needs --prompt"),
    (["analyze", "--image", "IMG", "--prompt", "P", "--seed", "3", "--model", "M"], "--seed picks the ShiftBench sample"),
    (["analyze", "--steps", "70", "--model", "M"], "--steps 70 is outside 0..63"),
    (["analyze", "--steps", "1,x", "--model", "M"], "expected comma-separated integers"),
    (["analyze", "--max-new-tokens", "1000000000", "--model", "M"], "does not fit the model's context of 512 tokens"),
    (["analyze", "--image", "IMG", "--prompt", "<image> describe this picture", "--model", "M"],
     "unknown word 'describe' in prompt"),
    (["analyze", "--image", "IMG", "--prompt", "<image> walk h9 r1c1", "--model", "M"],
     "h9 in prompt '<image> walk h9 r1c1': this model was built for walks of 1..8 hops"),
    (["generate", "--image", "IMG", "--prompt", "<image> lookup r12c3", "--model", "M"], "cell r12c3 in prompt"),
    (["generate", "--image", "PHOTO", "--prompt", "P", "--model", "M"], "is not a ShiftBench render"),
    (["shiftbench", "sample", "--out", "OUT", "--hops", "7"], "built for walks of 1..6 hops"),
    (["shiftbench", "sample", "--out", "OUT", "--task", "lookup", "--hops", "2"], "--hops applies only to --task walk"),
    (["shiftbench", "sample", "--out", "OUT", "--n", "0"], "--n must be >= 1"),
    (["shiftbench", "train", "--read-layer", "16"], "read_layer must be in 0..15"),
    (["shiftbench", "train", "--locate-layers", "3"], "locate_layers must lie below read_layer 2"),
    (["shiftbench", "train", "--hide-rows", "1.5"], "hide_rows must be in [0, 1]"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, model_dir, image_file, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    photo = tmp_path / "photo.png"  # the right size, but not a render
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3)).astype(np.uint8)).save(photo)
    names = {"IMG": image_file[0], "M": model_dir, "BAD": str(bad), "P": image_file[1], "PHOTO": str(photo),
             "OUT": str(tmp_path / "out")}
    argv = [names.get(a, a) for a in argv]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


def test_generate_prints_answer_and_trace(model_dir, image_file, capsys, tmp_path):
    path, prompt = image_file
    trace_file = tmp_path / "trace.json"
    code = run_cli(["generate", "--model", model_dir, "--image", path, "--prompt", prompt, "--prune", "divprune",
                    "--retention", "0.333", "--dstp", "--max-new-tokens", "4", "--trace", "--trace-json",
                    str(trace_file)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    trace = json.loads(trace_file.read_text())
    assert trace["n_visual"] == 144 and len(trace["kept"]) == 48
    assert all("similarity" in s for s in trace["steps"])
    assert lines[1] == "visual tokens 144, kept 48 from layer 0"
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == len(trace["steps"]) and all(" sim " in line and " active " in line for line in steps)


def test_generate_oracle_on_shiftbench(model_dir, image_file, tmp_path):
    from dstp.lab.shiftbench.inputs import relevant_cells

    path, prompt = image_file
    code = run_cli(["generate", "--model", model_dir, "--image", path, "--prompt", prompt, "--prune", "oracle",
                    "--retention", "0.111", "--trace-json", str(tmp_path / "t.json")])
    assert code == 0
    trace = json.loads((tmp_path / "t.json").read_text())
    from PIL import Image
    needed = relevant_cells(prompt, Image.open(path).convert("RGB"))
    assert set(needed) <= set(trace["kept"]) and len(trace["kept"]) == 16


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
    for png in ("accuracy_vs_retention.png", "accuracy_vs_gflops.png", "success_by_rvis_events.png"):
        assert (out / png).stat().st_size > 1000


def test_bench_writes_partial_results_after_every_run(model_dir, monkeypatch):
    from dstp.lab.bench import sweep

    saved = []
    monkeypatch.setattr(sweep, "save", lambda records, out: saved.append(len(records)))
    cfg = sweep.BenchConfig(model=model_dir, methods=("fastv",), tasks=("lookup",), retentions=(0.333,), n=2,
                            batch_size=2)
    records = sweep.run_bench(cfg, on_record=lambda rs: sweep.save(rs, "unused"))
    assert saved == [1, 2, 3] and len(records) == 3  # unpruned, fastv, fastv + DSTP


@pytest.mark.parametrize("flags,folder", [
    ([], "results"), (["--quick"], "results/quick"), (["--ablation"], "results/ablation"),
    (["--quick", "--ablation"], "results/quick/ablation"), (["--quick", "--out", "x"], "x"),
])
def test_quick_and_ablation_never_write_over_a_full_run(flags, folder):
    from dstp.lab.cli.bench import output_dir
    from dstp.lab.cli.main import build_parser

    assert output_dir(build_parser().parse_args(["bench", *flags])) == folder


def test_analyze_writes_plots_and_the_event_rule(model_dir, tmp_path, capsys):
    out = tmp_path / "an"
    assert run_cli(["analyze", "--model", model_dir, "--max-new-tokens", "4", "--out", str(out)]) == 0
    result = json.loads((out / "rvis.json").read_text())
    assert result["event_rule"] == {"threshold": 0.7, "prominence": 0.1}
    assert len(result["reports"]) == 16 and 0 <= result["layer"] < 16
    for png in ("shift_curve.png", "heatmaps.png"):
        assert (out / png).stat().st_size > 1000


def test_analyze_warns_about_steps_beyond_the_answer(tmp_path, capsys):
    # the answer's length is known only after generating: a --steps beyond it is named, the rest drawn.
    # The shipped model answers the default 4-hop walk in 7 steps (and its one RVIS event is the drop at step 1)
    assert run_cli(["analyze", "--steps", "0,2,40", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "the answer has 7 steps (0..6); no heatmap for --steps 40" in captured.err
    assert "1 RVIS event at steps [1]" in captured.out


def test_shiftbench_sample_writes_renders_and_prompts_that_generate_accepts(tmp_path, capsys):
    from dstp.lab.shiftbench.processor import ShiftBenchProcessor

    out = tmp_path / "s"
    assert run_cli(["shiftbench", "sample", "--out", str(out), "--n", "2", "--hops", "3"]) == 0
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["hops"] for r in rows] == [3, 3]
    printed = capsys.readouterr().out
    proc = ShiftBenchProcessor.build()
    for r in rows:
        assert f"--prompt '{r['prompt']}'" in printed
        image = np.asarray(Image.open(r["image"]))
        assert proc([image], [r["prompt"]])["pixel_values"].shape == (1, 3, 96, 96)


@pytest.mark.parametrize("argv,needle", [
    (["--method", "foo"], "argument --method: invalid choice: 'foo'"),
    (["--task", "lookup"], "argument --task: invalid choice: 'lookup'"),
    (["--retention", "1.5"], "retention must be in (0, 1]"),
    (["--retention", "1"], "nothing is pruned"),
    (["--n", "0"], "--n must be >= 1"),
    (["--model", "/no/such/dir"], "checkpoint not found"),
])
def test_revival_check_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    from dstp.lab.cli.revival_check import main as revival_main

    assert run_main(revival_main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err


def run_main(fn, argv):
    try:
        return fn(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv,needle", [
    (["/no/such/dir"], "/no/such/dir is not a directory"),
    (["EMPTY"], "has no training_record.json, config.json"),
    (["SHIPPED", "--notes-only", "--eval-n", "5"], "--eval-n re-runs the model, which --notes-only does not"),
    (["SHIPPED", "--eval-n", "0"], "--eval-n must be >= 1"),
])
def test_model_card_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    from dstp.lab.shiftbench import default_checkpoint_dir
    from dstp.lab.cli.card import main as card_main

    names = {"EMPTY": str(tmp_path), "SHIPPED": str(default_checkpoint_dir())}
    assert run_main(card_main, [names.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
