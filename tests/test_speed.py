"""`dstp speed` on tiny shapes: both scenarios in one command write every row with its fields, memory measured next
to memory reported, DSTP's host synchronisations per decoding step; bad input is one line and exit 2. No timing
is checked (the numbers of a shared CI machine are noise)."""
import json

import pytest
import torch

from dstp.bench.speed import HostSyncs, ROWS, SMALL, build_batch
from dstp.cli import main


def run_cli(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def speed_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    assert run_cli(["speed", "--small", "--scenario", "both", "--new-tokens", "10", "--sync-debug", "--profile",
                    "--out", str(out)]) == 0
    profile = (out / "profile_weight-bound_fastv_dstp_recompute.txt").read_text()
    assert "dstp.step" in profile and "dstp.recompute" in profile and "aten::" in profile
    return json.loads((out / "speed.json").read_text())


def test_both_scenarios_write_every_row(speed_json):
    rows = speed_json["rows"]
    assert [(r["scenario"], r["name"]) for r in rows] == [(s, n) for s in ("kv-bound", "weight-bound") for n in ROWS]
    for r in rows:
        for field in ("scenario", "name", "tokens_per_s", "prefill_s", "peak_bytes_measured", "peak_bytes_reported"):
            assert field in r, (r["name"], field)
        assert r["tokens_per_s"] > 0 and r["prefill_s"] > 0 and r["peak_bytes_measured"] > 0
        if r["name"].startswith("hf_"):
            assert r["ratio_to_ideal"] is None
        else:
            assert r["ratio_to_ideal"] > 0 and r["prefill_ratio_to_ideal"] > 0
    assert set(speed_json["scenarios"]) == {"kv-bound", "weight-bound"}
    whats = {(t["scenario"], t["what"]) for t in speed_json["targets"]}
    assert ("weight-bound", "fastv_dstp_store / fastv tokens/s") in whats
    assert ("kv-bound", "fastv_dstp_recompute decode / ideal") in whats
    assert all(isinstance(t["met"], bool) for t in speed_json["targets"])


def test_measured_peak_covers_what_the_engine_reports(speed_json):
    """The engine's figure is what its state holds at the end of the run; the measured peak adds the transient
    working memory (activations, logits) and lacks only the input ids, made before tracking began."""
    for r in speed_json["rows"]:
        if r["name"].startswith("hf_"):
            continue
        cfg = SMALL[r["scenario"]]
        ids = build_batch(cfg, "cpu", torch.float32)["input_ids"]
        assert r["peak_bytes_reported"] == sum(r["memory_bytes"].values())
        assert r["peak_bytes_measured"] >= r["peak_bytes_reported"] - ids.numel() * ids.element_size()
    by = {(r["scenario"], r["name"]): r for r in speed_json["rows"]}
    for scenario in ("kv-bound", "weight-bound"):
        store, recompute = by[(scenario, "fastv_dstp_store")], by[(scenario, "fastv_dstp_recompute")]
        assert recompute["peak_bytes_reported"] < store["peak_bytes_reported"]
        assert "reserve" in store["memory_bytes"] and "dstp_cache" in recompute["memory_bytes"]


def test_dstp_adds_one_host_sync_per_step(speed_json):
    for r in speed_json["rows"]:
        if r["name"].startswith("hf_"):
            continue
        dstp = r["name"].startswith("fastv_dstp")
        assert r["dstp_syncs_per_step"] == (1.0 if dstp else None)
        assert r["decode_step_syncs_per_step"] == (1.0 if dstp else 0.0)  # the engine's own step syncs nothing


def test_host_sync_counter():
    t = torch.arange(6)
    with HostSyncs() as c:
        bool(t.sum() > 0)
        t.tolist()
        t.nonzero()
        t.repeat_interleave(2)  # int repeats: no sync
        t[:3] + 1
    assert c.count == 3


@pytest.mark.parametrize("argv,needle", [
    (["--repeats", "0"], "repeats must be >= 1, got 0"),
    (["--scenario", "memory-bound"], "argument --scenario: invalid choice: 'memory-bound'"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--dtype", "auto"], "give a dtype"),
    (["--new-tokens", "1"], "new_tokens must be >= 2"),
])
def test_bad_input_is_one_line(argv, needle, capsys, tmp_path):
    assert run_cli(["speed", "--small", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys, tmp_path):
    assert run_cli(["speed", "--small", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "this torch sees no CUDA device" in err and len(err.splitlines()) == 1
