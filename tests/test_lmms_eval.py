"""The lmms-eval integration (`dstp.integrations.lmms_eval`, model `dstp`), offline on ShiftBench.

`dstp shiftbench export` writes N samples per task; the real `lmms-eval` command line evaluates them with the
shipped model (FastV 33.3% + DSTP); accuracy per task, and each sample's outcome, must equal `dstp bench` on the
same samples (`run_bench`, the code `dstp bench` runs). The same run carries a multi-round task written here (a
walk asked as one lookup per round); data-parallel runs through `accelerate launch` with 2 CPU processes."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if os.environ.get("CI"):  # `make test` installs the eval extra: CI must run these tests, not skip them
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval")

import dstp
from dstp.errors import ConfigError, InputError
from dstp.lab.shiftbench import TASKS, default_checkpoint_dir, generate_samples
from dstp.lab.shiftbench.tasks import parse_answer

SEED, N = 11, 3  # pair and walk get 2 of 3 here; N odd: the 2-process run pads a rank (copies neither run nor recorded)
CKPT = str(default_checkpoint_dir())
MODEL_ARGS = f"pretrained={CKPT},prune=fastv,retention=0.333,dstp=true,batch_size=2"
LMMS_EVAL = str(Path(sys.executable).with_name("lmms-eval"))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

CHAIN_YAML = """\
task: shiftbench_chain
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until_multi_round
doc_to_visual: !function dstp.lab.shiftbench.export.doc_to_visual
doc_to_text: !function chain_utils.doc_to_text
doc_to_target: answer
process_results: !function chain_utils.process_results
generation_kwargs:
  max_new_tokens: 5
  temperature: 0
  until: []
metric_list:
  - metric: chain_accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""

CHAIN_UTILS = '''\
"""A walk asked as one lookup per round: round r looks up the cell round r - 1 answered."""
from dstp.lab.shiftbench.export import doc_to_visual
from dstp.lab.shiftbench.tasks import parse_answer


def doc_to_text(doc, lmms_eval_specific_kwargs=None, round_idx=None, previous_output=None, previous_round_info=None):
    if not round_idx:
        return "lookup " + doc["question"].split()[-1]
    if round_idx >= doc["hops"] or not previous_output[-1].split():
        return None, None, True, previous_output, previous_round_info
    return doc_to_visual(doc), "lookup " + previous_output[-1].split()[0], False, previous_output, round_idx


def process_results(doc, results):
    rounds = results[0]
    return {"chain_accuracy": float(parse_answer(rounds[-1]) == doc["answer"])}
'''


def _env() -> dict:
    # conftest.py has made Hugging Face offline, with caches inside .pytest_cache; children inherit that
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def _run(argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def _lmms_args(tasks: str, folder: Path, out: Path) -> list[str]:
    return ["--model", "dstp", "--model_args", MODEL_ARGS, "--tasks", tasks, "--include_path", str(folder),
            "--output_path", str(out), "--log_samples"]


def _outputs(out: Path) -> tuple[dict, dict, list[dict]]:
    """(results.json, {task: samples rows}, efficiency records) of one lmms-eval run."""
    [results] = list(out.rglob("*_results.json"))
    samples = {}
    for path in out.rglob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_")[1]
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["doc_id"])
    records = [json.loads(line) for p in sorted(out.rglob("*_dstp_efficiency*.jsonl"))
               for line in p.read_text().splitlines()]
    return json.loads(results.read_text()), samples, records


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """`dstp shiftbench export` (through dstp's own CLI) plus the multi-round task in a subfolder."""
    from dstp.lab.cli.main import main

    folder = tmp_path_factory.mktemp("shiftbench_tasks")
    assert main(["shiftbench", "export", "--out", str(folder), "--seed", str(SEED), "--n", str(N)]) == 0
    chain = folder / "chain"
    chain.mkdir()
    (chain / "shiftbench_chain.yaml").write_text(CHAIN_YAML.format(data=folder / "walk.jsonl"))
    (chain / "chain_utils.py").write_text(CHAIN_UTILS)
    return folder


@pytest.fixture(scope="module")
def single_run(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms_out")
    proc = _run([LMMS_EVAL, *_lmms_args("shiftbench,shiftbench_chain", exported, out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Error during evaluation" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


@pytest.fixture(scope="module")
def bench_records():
    from rich.console import Console

    from dstp.lab.bench.sweep import BenchConfig, run_bench

    cfg = BenchConfig(methods=("fastv",), retentions=(0.333,), n=N, seed=SEED, shifts=("dstp",),
                      include_unpruned=False)
    return {r["task"]: r for r in run_bench(cfg, Console(file=io.StringIO()))}


@pytest.fixture(scope="module")
def pipe():
    return dstp.load(CKPT, prune=dstp.PruneConfig("fastv", 0.333), shift=dstp.DSTPConfig())


# ---- the export --------------------------------------------------------------------------------------------
def test_export_writes_the_samples_dstp_bench_evaluates(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {f"shiftbench_{t}" for t in TASKS}
    for task in TASKS:
        rows = [json.loads(line) for line in (exported / f"{task}.jsonl").read_text().splitlines()]
        samples = generate_samples(task, N, seed=SEED)
        assert [r["prompt"] for r in rows] == [s.prompt for s in samples]
        assert [r["answer"] for r in rows] == [s.answer for s in samples]
        for r, s in zip(rows, samples):
            assert np.array_equal(np.asarray(Image.open(r["image"]).convert("RGB")), s.image)  # PNG is lossless
        yaml = (exported / f"shiftbench_{task}.yaml").read_text()
        assert f"max_new_tokens: {max(len(s.target.split()) for s in samples) + 2}\n" in yaml
    assert "group: shiftbench" in (exported / "shiftbench.yaml").read_text()


def test_export_bad_input_is_one_line(tmp_path, capsys):
    from dstp.lab.cli.main import main

    assert main(["shiftbench", "export", "--out", str(tmp_path), "--n", "0"]) == 2
    assert main(["shiftbench", "export", "--out", str(tmp_path), "--tasks", "lookup,jump"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "n must be" in err[0] and "unknown task 'jump'" in err[1]


# ---- ShiftBench's chat template ----------------------------------------------------------------------------
def _conv(sample, image_first=True):
    image = {"type": "image", "image": Image.fromarray(sample.image)}
    text = {"type": "text", "text": sample.prompt.split(" ", 1)[1]}
    return [{"role": "user", "content": [image, text] if image_first else [text, image]}]


def test_chat_template_renders_the_bench_prompts_left_padded():
    from dstp.lab.shiftbench.processor import ShiftBenchProcessor

    proc = ShiftBenchProcessor.from_pretrained(CKPT)
    samples = [s for t in TASKS for s in generate_samples(t, 2, seed=5)]
    got = proc.apply_chat_template([_conv(s) for s in samples], add_generation_prompt=True, tokenize=True,
                                   return_dict=True, return_tensors="pt",
                                   processor_kwargs={"padding": True, "padding_side": "left"})
    want = proc([s.image for s in samples], [s.prompt for s in samples], padding_side="left")
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not bool(got["attention_mask"][:, -1].eq(0).any())  # left padding
    assert proc.apply_chat_template(_conv(samples[0])) == samples[0].prompt
    assert proc.apply_chat_template(_conv(samples[0], image_first=False)).endswith(" <image>")  # items in order


@pytest.mark.parametrize("conv, needle", [
    ([{"role": "user", "content": [{"type": "text", "text": "lookup r1c1"}]}], "0 images"),
    ([{"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "lookup r1c1"}]}],
     "needs the image"),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "lookup r1c1"}], "role 'system'"),
    ([{"role": "robot", "content": "lookup r1c1"}], "role 'robot'"),
    ([{"role": "user", "content": [{"type": "text", "text": "<image> lookup r1c1"}]}], "holds '<image>'"),
])
def test_chat_template_bad_conversations_one_line(conv, needle):
    from dstp.lab.shiftbench.processor import ShiftBenchProcessor

    proc = ShiftBenchProcessor.from_pretrained(CKPT)
    two = [{"role": "user", "content": [_conv(generate_samples("lookup", 1, 0)[0])[0]["content"][0]] * 2}]
    for c, n in ((conv, needle), (two, "2 images")):
        with pytest.raises(InputError) as e:
            proc.apply_chat_template([c], tokenize=True, return_dict=True)
        assert n in str(e.value) and "\n" not in str(e.value)


def test_pipeline_chat_equals_generate_on_shiftbench(pipe):
    samples = generate_samples("walk", 3, seed=9)
    a = pipe.chat([_conv(s) for s in samples], max_new_tokens=10, do_sample=False)
    b = pipe.generate([Image.fromarray(s.image) for s in samples], [s.prompt for s in samples], max_new_tokens=10,
                      do_sample=False)
    assert a.texts == b.texts and torch.equal(a.tokens, b.tokens)


# ---- model_args ------------------------------------------------------------------------------------------
def test_model_args_map_one_to_one_onto_load_and_configs():
    from dstp.integrations.lmms_eval import MODEL_ARGS, parse_model_args

    s = parse_model_args({"pretrained": "org/name", "prune": "divprune", "retention": 0.111, "prune_layer": 0,
                          "seed": 7, "dstp": True, "tau": 0.5, "window": 5, "source": "store", "variant": "hard",
                          "max_revived": 9, "probe_layer": 0, "dtype": "bfloat16", "device": "cpu",
                          "batch_size": 8, "max_new_tokens": 64, "compile": True, "stop_check_every": 4})
    assert s.engine == dstp.EngineConfig(compile=True, stop_check_every=4)
    assert parse_model_args({}).engine == dstp.EngineConfig()
    assert s.pretrained == "org/name" and s.dtype == "bfloat16" and s.device == "cpu"
    assert s.prune == dstp.PruneConfig(method="divprune", retention=0.111, layer=0, seed=7)
    assert s.shift == dstp.DSTPConfig(tau=0.5, window=5, source="store", variant="hard", max_revived=9,
                                      probe_layer=0)
    assert (s.batch_size, s.max_new_tokens, s.seed) == (8, 64, 7)
    assert parse_model_args({"system_prompt": "Be brief."}).system_prompt == "Be brief."
    plain = parse_model_args({"prune": "none"})
    assert plain.prune is None and plain.shift is None and plain.pretrained == CKPT
    assert {"pretrained", "prune", "retention", "prune_layer", "dstp", "tau", "window", "source", "dtype", "device",
            "batch_size", "max_new_tokens"} <= set(MODEL_ARGS)


@pytest.mark.parametrize("args, needle", [
    ({"pretraned": "x"}, "unknown model_args key(s) pretraned; valid keys: pretrained, prune, retention"),
    ({"prune": "fastvv", "retention": 0.3}, "unknown prune method 'fastvv'; known: none,"),
    ({"prune": "fastv", "retention": 1.5}, "retention must be in (0, 1]"),
    ({"prune": "fastv", "retention": 0}, "retention must be in (0, 1]"),
    ({"prune": "fastv"}, "needs retention=R"),
    ({"dstp": True}, "dstp=true needs a base pruner"),
    ({"prune": "fastv", "retention": 0.5, "tau": 0.5}, "add dstp=true"),
    ({"retention": 0.5}, "needs a pruner"),
    ({"batch_size": "auto"}, "batch_size='auto': expected an integer"),
    ({"dstp": "maybe"}, "expected true or false"),
    ({"compile": "sometimes"}, "expected true or false"),
    ({"stop_check_every": 0}, "stop_check_every must be an integer >= 1, got 0"),
])
def test_model_args_errors_are_one_line(args, needle):
    from dstp.integrations.lmms_eval import parse_model_args

    with pytest.raises(ConfigError) as e:
        parse_model_args(args)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("arg_string, needle", [
    ("pretrained=/no/such/checkpoint", "/no/such/checkpoint"),
    ("prune=nosuch,retention=0.3", "unknown prune method 'nosuch'"),
    ("prune=fastv,retention=2", "retention must be in (0, 1]"),
    ("dstp=true", "dstp=true needs a base pruner"),
    ("prune=fastv,retention=0.3,speed=9", "valid keys: pretrained,"),
])
def test_bad_model_args_end_the_run_with_one_line(arg_string, needle, capsys):
    """What lmms-eval calls to build the model: one line on stderr and exit status 2."""
    from dstp.integrations.lmms_eval import DSTPModel

    with pytest.raises(SystemExit) as e:
        DSTPModel.create_from_arg_string(arg_string, {"batch_size": 1, "device": None})
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmms-eval --model dstp: error:") and needle in err[0], err


def test_bad_model_args_through_the_lmms_eval_command_line(exported, tmp_path):
    proc = _run([LMMS_EVAL, "--model", "dstp", "--model_args", "prune=fastv,retention=1.5", "--tasks", "shiftbench",
                 "--include_path", str(exported), "--output_path", str(tmp_path)])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if "--model dstp: error" in line]
    assert ours == ["lmms-eval --model dstp: error: retention must be in (0, 1], got 1.5"]
    assert "Traceback" not in proc.stderr and "Running generate_until" not in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("*.json*"))


def test_generation_kwargs_mapping():
    from dstp.integrations.lmms_eval import generation_settings, parse_model_args, truncate

    s = parse_model_args({"seed": 3})
    assert generation_settings({"max_new_tokens": 9, "temperature": 0, "top_p": None, "num_beams": 1,
                                "until": ["\n\n"]}, s, "t") == (9, {"do_sample": False, "seed": 3}, ["\n\n"], [])
    assert generation_settings({"temperature": 0.7, "top_p": 0.9, "image_aspect_ratio": "pad"}, s, "t") == \
        (128, {"do_sample": True, "seed": 3, "temperature": 0.7, "top_p": 0.9}, [], ["image_aspect_ratio"])
    assert generation_settings({"max_new_tokens": 9}, parse_model_args({"max_new_tokens": 4}), "t")[0] == 4
    with pytest.raises(ConfigError, match="task mmmu asks for num_beams=4"):
        generation_settings({"num_beams": 4}, s, "mmmu")
    assert truncate("r1c2 = r1c2\n\nmore", ["\n\n"]) == "r1c2 = r1c2" and truncate("abc", []) == "abc"


def test_loglikelihood_names_the_task():
    from lmms_eval.api.instance import Instance

    from dstp.integrations.lmms_eval import DSTPModel

    model = DSTPModel.create_from_arg_string(f"pretrained={CKPT}")
    req = Instance(request_type="loglikelihood", arguments=("q", " a"), idx=0,
                   metadata={"task": "scienceqa_img", "doc_id": 0, "repeats": 1})
    with pytest.raises(NotImplementedError) as e:
        model.loglikelihood([req])
    assert "task scienceqa_img needs log-likelihoods" in str(e.value) and "\n" not in str(e.value)
    user = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert model._hf_messages(user) == user  # no system prompt unless asked for
    model.settings = type(model.settings)(**{**model.settings.__dict__, "system_prompt": "Be brief."})
    assert model._hf_messages(user) == [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *user]


# ---- registration, and `import dstp` without the integration ---------------------------------------------
REGISTRATION = f"""
import importlib, sys
import dstp, dstp.lab.shiftbench.export, dstp.lab.cli.main
dstp.load({CKPT!r})
bad = sorted(m for m in sys.modules if m.split(".")[0] == "lmms_eval" or m.startswith("dstp.integrations"))
assert not bad, bad  # import dstp (and using it) never imports the integration
sys.modules["lmms_eval"] = None  # lmms-eval absent: importing the integration fails, dstp is unaffected
try:
    importlib.import_module("dstp.integrations.lmms_eval")
    raise SystemExit("imported without lmms_eval")
except ImportError:
    pass
del sys.modules["lmms_eval"]
# the integration imported first: that is what makes lmms-eval build its registry (on importing its models)
import dstp.integrations.lmms_eval as m
from lmms_eval.models import get_model
assert get_model("dstp") is m.DSTPModel and m.DSTPModel.is_simple is False
print("ok")
"""


def test_import_dstp_never_imports_the_integration_and_the_entry_point_registers_dstp():
    proc = _run([sys.executable, "-c", REGISTRATION], timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-2000:]


# ---- end to end through the lmms-eval command line ---------------------------------------------------------
def test_lmms_eval_accuracy_equals_dstp_bench(single_run, bench_records):
    _, out = single_run
    results, samples, records = _outputs(out)
    for task in TASKS:
        bench = bench_records[task]
        name = f"shiftbench_{task}"
        assert results["results"][name]["accuracy,none"] == pytest.approx(bench["accuracy"], abs=1e-12), task
        assert [r["accuracy"] == 1.0 for r in samples[name]] == bench["correct"], task  # sample by sample
        # per-sample efficiency records: the bench's per-task means, computed from the same traces
        mine = [r for r in records if r["task"] == name]
        assert sorted(r["doc_id"] for r in mine) == list(range(N))
        assert sum(r["visual_tokens_per_step"] for r in mine) / N == pytest.approx(bench["visual_tokens_per_step"])
        assert sum(r["shifts"] for r in mine) / N == pytest.approx(bench["shifts_per_answer"])
        tokens = [r["token_counts"][0]["output_tokens"] for r in samples[name]]
        assert tokens == [r["new_tokens"] for r in sorted(mine, key=lambda r: r["doc_id"])]
    assert results["results"]["shiftbench"]["accuracy,none"] == pytest.approx(
        sum(bench_records[t]["accuracy"] for t in TASKS) / 3)


def test_efficiency_records_and_summary(single_run):
    proc, out = single_run
    [results] = list(out.rglob("*_results.json"))
    files = list(out.rglob("*_dstp_efficiency.jsonl"))
    assert len(files) == 1 and files[0].parent == results.parent  # beside lmms-eval's own files
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    for r in records:
        assert r["n_visual"] == 144 and r["kept"] == 48 and r["prune_layer"] == 1
        assert len(r["visual_attended"]) == r["new_tokens"] - 1
        assert all(48 <= v <= 96 for v in r["visual_attended"])  # S0 plus at most k revived
        assert r["prefill_flops"] > 0 and r["decode_flops"] > 0 and r["kv_bytes_peak"] > 0
        assert r["batch_size"] in (1, 2) and r["prefill_flops"] * r["batch_size"] == pytest.approx(
            r["batch_prefill_flops"])
        assert r["revived_tokens"] >= 0 and 0 <= r["shifts"] <= len(r["visual_attended"])
    assert sum(r["revived_tokens"] for r in records) > 0  # DSTP revived something on walks
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("dstp: "))
    rounds = sum(s.hops for s in generate_samples("walk", N, seed=SEED))  # the multi-round task: one per hop
    # one line per request type run (generate_until, generate_until_multi_round)
    assert [line.split(" samples")[0] for line in lines] == sorted([f"dstp: {3 * N}", f"dstp: {rounds}"])
    assert all("visual tokens/step" in line and line.endswith(f"per sample: {files[0]}") for line in lines)


def test_multi_round_follows_the_task_protocol(single_run, exported, pipe):
    """Each round's answer equals Pipeline.chat on that round's conversation; the walk takes `hops` rounds."""
    _, out = single_run
    _, samples, records = _outputs(out)
    rows = [json.loads(line) for line in (exported / "walk.jsonl").read_text().splitlines()]
    from dstp.lab.shiftbench.export import doc_to_visual

    for doc, got in zip(rows, samples["shiftbench_chain"]):
        rounds = got["filtered_resps"]
        rounds = rounds[0] if rounds and isinstance(rounds[0], list) else rounds
        cell, want = doc["question"].split()[-1], []
        for _ in range(doc["hops"]):
            conv = [{"role": "user", "content": [{"type": "image", "image": doc_to_visual(doc)[0]},
                                                 {"type": "text", "text": f"lookup {cell}"}]}]
            want.append(pipe.chat([conv], max_new_tokens=5, do_sample=False).texts[0])
            cell = want[-1].split()[0]
        assert rounds == want
        assert got["chain_accuracy"] == float(parse_answer(want[-1]) == doc["answer"])
    chain = [r for r in records if r["task"] == "shiftbench_chain"]
    assert sorted({r["round"] for r in chain}) == list(range(max(d["hops"] for d in rows)))


def test_data_parallel_two_cpu_processes_same_accuracy(single_run, exported, tmp_path):
    _, out1 = single_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "lmms_eval",
         *_lmms_args("shiftbench", exported, tmp_path)],
        env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, one_samples, _ = _outputs(out1)
    two, two_samples, records = _outputs(tmp_path)
    for task in TASKS:
        name = f"shiftbench_{task}"
        assert two["results"][name]["accuracy,none"] == one["results"][name]["accuracy,none"]
        assert [r["accuracy"] for r in two_samples[name]] == [r["accuracy"] for r in one_samples[name]]
    assert {p.name.rsplit("_", 1)[1] for p in tmp_path.rglob("*_dstp_efficiency_*.jsonl")} == \
        {"rank0.jsonl", "rank1.jsonl"}
    done = sorted((r["task"], r["doc_id"]) for r in records)
    assert done == sorted((f"shiftbench_{t}", i) for t in TASKS for i in range(N))  # each once, padding not run
    assert {r["rank"] for r in records} == {0, 1}
    assert len([line for line in proc.stdout.splitlines() if line.startswith("dstp (rank ")]) == 2


# ---- the paper's grid script (scripts/paper_table.py) ---------------------------------------------------------
def _paper_table():
    import importlib.util

    path = Path(__file__).parents[1] / "scripts" / "paper_table.py"
    spec = importlib.util.spec_from_file_location("paper_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_table"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_paper_grid_commands(capsys):
    pt = _paper_table()
    assert pt.main(["--out", "/tmp/never-written", "--dry-run"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2 * (1 + 4 * 2 * 3)  # models x (unpruned + methods x {vanilla, dstp} x retentions)
    assert all("--model dstp" in c and f"--tasks {','.join(pt.TASKS)}" in c for c in commands)
    assert sum("pretrained=OpenGVLab/InternVL3_5-8B-HF,dtype=bfloat16,batch_size=1,prune=sparsevlm,retention=0.111,"
               "dstp=true " in c for c in commands) == 1
    assert sum(",prune=" not in c for c in commands) == 2


def test_paper_table_from_a_finished_run(single_run, bench_records, tmp_path):
    """The table the grid script writes, built from the end-to-end run's files laid out as one grid cell."""
    import shutil

    pt = _paper_table()
    _, out = single_run
    run = pt.Run(CKPT, "fastv", True, 0.333)
    shutil.copytree(out, run.folder(tmp_path))
    table = pt.markdown(pt.collect([run], tmp_path), [0.333])
    for task in TASKS:
        row = next(line for line in table.splitlines() if f"| shiftbench_{task} (accuracy) | fastv | dstp |" in line)
        assert row.split(" | ")[4] == f"{bench_records[task]['accuracy']:.4g}"
