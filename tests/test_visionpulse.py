"""VisionPulse is its authors' rule (xxhhbbbb/VisionPulse, `visionpulse/modeling_qwen3_vl.py`, eager path; settings
from `vlmeval/config.py`). The reference below is re-derived in plain torch from their code, on transformers' own
eager attention weights at the anchor layer (a softmax over every key: its log is the logits up to a per-head
constant, which changes neither the tau-sharpened visual mass nor the head-mean ranking); it shares no code with
dstp. Layers below the anchor read every token, so the anchor's query and keys at every step are the dense model's:
one forward of transformers over the prompt + the generated tokens gives every step's anchor attention."""
import copy

import pytest
import torch

import dstp
from dstp import VisionPulseConfig
from dstp.config import GenerationConfig, PruneConfig
from dstp.engine.engine import Engine
from dstp.errors import ConfigError
from dstp.models.registry import adapter_for_model
from dstp.policy import make_policy, policy_config
from dstp.lab.bench import tiny_models as tm

N_NEW = 6


def reference_selection(att_row, visual, allowed, cfg: VisionPulseConfig):
    """Their anchor-layer rule for one decoding query per row: att_row [B, H, S] (transformers' attention weights),
    visual / allowed [B, S]. Returns (k [B], selected [B, S])."""
    logp = att_row.double().log()  # logits - logsumexp per head; -inf where masked
    z = logp / cfg.visual_mass_tau
    total = torch.logsumexp(z.masked_fill(~allowed[:, None], float("-inf")), -1)
    vis = torch.logsumexp(z.masked_fill(~visual[:, None], float("-inf")), -1)
    mass = torch.exp(vis - total).max(dim=1).values.float()
    count = visual.sum(-1)
    if cfg.fixed_budget is not None:
        ratio = torch.full_like(mass, cfg.fixed_budget)
    else:
        ratio = mass.clamp(min=cfg.budget_min, max=cfg.budget_max)
    k = torch.minimum((ratio * count).long().clamp(min=1), count)
    score = logp.mean(1).masked_fill(~visual, float("-inf"))  # head-mean logits, shifted by a per-row constant
    selected = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        selected[b, torch.topk(score[b], int(k[b])).indices] = True
    return k, selected


def family(name):
    if name == "qwen3_vl":
        model = tm.tiny_qwen3_vl(layers=4)
        batch = tm.qwen3_vl_batch([(4, 6), (6, 6), (4, 4)], [2, 5, 1])
    elif name == "qwen2_5_vl":
        model = tm.tiny_qwen2_5_vl(layers=4)
        batch = tm.qwen_batch([(4, 6), (6, 6), (4, 4)], [2, 5, 1])
    elif name == "llava_next":
        model = tm.tiny_llava_next(layers=4)
        batch = tm.llava_next_batch([(30, 60), (60, 60), (60, 30)], [3, 1, 4])
    elif name == "qwen3_vl_moe":
        model = tm.tiny_qwen3_vl_moe(layers=4)
        batch = tm.qwen3_vl_batch([(4, 6), (6, 6), (4, 4)], [2, 5, 1])
    elif name == "llava_onevision":
        model = tm.tiny_llava_onevision(layers=4)
        batch = tm.llava_onevision_batch([[(30, 55)], [(40, 40), (20, 20)], []], [3, 7, 4])
    elif name == "internvl":
        model = tm.tiny_internvl(layers=4)
        batch = tm.internvl_batch([1, 2, 1], [3, 1, 4])
    else:
        model = tm.tiny_llava(layers=4)
        batch = tm.llava_batch([3, 7, 1])
    return model, batch


CONFIGS = [VisionPulseConfig.setting("10pct", anchor_layer=2), VisionPulseConfig.setting("5pct", anchor_layer=2),
           VisionPulseConfig(anchor_layer=1, visual_mass_tau=1.0, budget_min=0.02, budget_max=0.98)]


@pytest.mark.parametrize("name", ["qwen3_vl", "internvl", "llava", "qwen2_5_vl", "llava_next", "qwen3_vl_moe",
                                  "llava_onevision"])
def test_selection_is_the_authors_rule(name):
    model, batch = family(name)
    adapter = adapter_for_model(model)
    prepared = adapter.prepare(batch)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    unclamped = 0
    for cfg in CONFIGS:
        policy = make_policy(cfg, None, adapter.n_layers)
        out = Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=()),
                                       shift=policy)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        T = ids.shape[1]
        gen = out.tokens[:, :N_NEW - 1]
        assert not bool((gen == getattr(model.config, "image_token_id", tm.IMAGE_TOKEN)).any())
        full = {**batch, "input_ids": torch.cat([ids, gen], 1),
                "attention_mask": torch.cat([mask, torch.ones_like(gen)], 1)}
        if "mm_token_type_ids" in batch:  # Qwen3-VL: generated tokens are text
            full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(gen)], 1)
        with torch.no_grad():
            att = eager(**full, output_attentions=True).attentions[cfg.anchor_layer]
        for t, step in enumerate(out.trace.steps):
            S = T + t + 1
            visual = torch.zeros(ids.shape[0], S, dtype=torch.bool)
            visual[:, :T] = prepared.visual_mask
            allowed = full["attention_mask"][:, :S].bool()
            k, selected = reference_selection(att[:, :, T + t, :S], visual, allowed, cfg)
            assert step.visual_attended.tolist() == k.tolist()
            # dstp reports the selection by visual rank; the reference by position
            ours = torch.zeros_like(visual[:, :T])
            for b in range(ids.shape[0]):
                pos = torch.nonzero(prepared.visual_mask[b]).flatten()
                ours[b, pos[step.selected_mask[b, :len(pos)]]] = True
            assert torch.equal(ours, selected[:, :T])
            n = prepared.visual_mask.sum(-1)
            lo, hi = (cfg.budget_min * n).long(), (cfg.budget_max * n).long()
            unclamped += int(((k > lo) & (k < hi)).sum())
    assert unclamped > 0  # the wide setting's budget followed the visual mass, not only its bounds


def test_whole_budget_is_the_dense_model():
    """fixed_budget=1 reads every visual token at every step: transformers' own greedy tokens."""
    model, batch = family("qwen3_vl")
    adapter = adapter_for_model(model)
    policy = make_policy(VisionPulseConfig(anchor_layer=2, fixed_budget=1.0), None, adapter.n_layers)
    out = Engine(adapter).generate(adapter.prepare(batch), GenerationConfig(max_new_tokens=N_NEW), shift=policy)
    hf = model.generate(**batch, max_new_tokens=N_NEW, do_sample=False)
    assert torch.equal(out.tokens, hf[:, batch["input_ids"].shape[1]:])
    assert all(s.visual_attended.tolist() == adapter.prepare(batch).n_visual.tolist() for s in out.trace.steps)


def test_holds_every_visual_token_and_reads_the_selection():
    """KV held: the unpruned model's (every visual token's K/V at every layer); the decode FLOPs count only the selected
    visual tokens at layers >= anchor (below the unpruned run's)."""
    model, batch = family("llava")
    adapter = adapter_for_model(model)
    prepared = adapter.prepare(batch)
    gen = GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=())
    dense = Engine(adapter).generate(prepared, gen)
    vp = Engine(adapter).generate(prepared, gen, shift=make_policy(VisionPulseConfig.setting("10pct", anchor_layer=2),
                                                                    None, adapter.n_layers))
    # the same K/V; the second store (layers >= anchor) adds one slot layout (order: long, valid: bool per slot)
    B, T = prepared.attention_mask.shape
    assert vp.trace.memory_bytes["kv"] - dense.trace.memory_bytes["kv"] == B * (T + N_NEW) * (8 + 1)
    assert 0 < vp.trace.memory_bytes["visionpulse"] < vp.trace.memory_bytes["kv"] // 20
    # each step: layers >= anchor skip the unselected visual tokens; selecting costs the anchor's q/k projections
    # of the new token and its logits over every key once
    a, L, A = adapter, adapter.n_layers, 2
    H, hd, D = a.n_heads, a.head_dim, model.config.text_config.hidden_size
    prompt = int(prepared.attention_mask.sum())
    saved = sum((L - A) * 4.0 * H * hd * int((prepared.n_visual - s.visual_attended).sum()) for s in vp.trace.steps)
    extra = sum(B * 2.0 * D * hd * (H + a.n_kv_heads) + 2.0 * H * hd * (prompt + B * (t + 1))
                for t in range(len(vp.trace.steps)))
    assert vp.trace.decode_flops == pytest.approx(dense.trace.decode_flops - saved + extra, rel=1e-9)
    assert saved > 0
    assert vp.trace.prefill_flops == dense.trace.prefill_flops
    assert all(int(s.visual_attended.max()) <= int(0.10 * prepared.n_visual.min()) for s in vp.trace.steps)


def test_default_anchor_is_the_authors_depth():
    from dstp.visionpulse import check_anchor

    assert check_anchor(VisionPulseConfig(), 36) == 17  # Qwen3-VL-4B/8B, InternVL3.5-4B/8B
    assert check_anchor(VisionPulseConfig(), 16) == 8  # ShiftBench
    assert check_anchor(VisionPulseConfig(), 4) == 2


# -- bad input: one line each ------------------------------------------------------------------------------------
def test_bad_input_is_one_line():
    model, _ = family("llava")
    with pytest.raises(ConfigError, match="unknown decode-time policy 'pulse'; known: dstp, visionpulse"):
        policy_config("pulse")
    with pytest.raises(ConfigError, match="its rule has no prefill pruner"):
        dstp.from_model(model, prune=PruneConfig("fastv", 0.5), shift=VisionPulseConfig(anchor_layer=2))
    for field in ("budget_min", "budget_max", "fixed_budget"):
        for value in (0.0, 1.5, -0.1):
            with pytest.raises(ConfigError, match=rf"VisionPulse {field} must be in \(0, 1\], got {value}"):
                VisionPulseConfig(**{field: value})
    with pytest.raises(ConfigError, match="budget_min=0.2 is above budget_max=0.1"):
        VisionPulseConfig(budget_min=0.2, budget_max=0.1)
    with pytest.raises(ConfigError, match="anchor_layer 9 is outside this model's 4 layers"):
        dstp.from_model(model, shift=VisionPulseConfig(anchor_layer=9))
    with pytest.raises(ConfigError, match="unknown VisionPulse setting '20pct'"):
        VisionPulseConfig.setting("20pct")
    with pytest.raises(ConfigError, match="shift= takes a decode-time policy config"):
        dstp.from_model(model, shift="visionpulse")
    with pytest.raises(ConfigError) as e:  # a sliding window hides the visual tokens the rule selects among
        dstp.from_model(tm.tiny_qwen2_5_vl(window=8), shift=VisionPulseConfig(anchor_layer=2))
    assert str(e.value) == ("VisionPulse is not supported on qwen2_5_vl: layers [1, 2, 3] are sliding-window layers, "
                            "where its selection among every visual token is not defined (docs/visionpulse.md)")


@pytest.mark.parametrize("args,needle", [
    (["--policy", "pulse"], "unknown decode-time policy 'pulse'"),
    (["--policy", "visionpulse", "--prune", "fastv", "--retention", "0.5"], "has no prefill pruner"),
    (["--policy", "visionpulse", "--fixed-budget", "0"], "fixed_budget must be in (0, 1]"),
    (["--policy", "visionpulse", "--fixed-budget", "1.5"], "fixed_budget must be in (0, 1]"),
    (["--fixed-budget", "0.5"], "--fixed-budget needs --policy visionpulse"),
])
def test_cli_bad_policy_exit_2(args, needle, capsys):
    from dstp.lab.cli.main import main

    try:
        code = main(["generate", "--prompt", "P", "--model", "M", *args])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_lmms_eval_model_args():
    from dstp.integrations.lmms_eval import parse_model_args

    s = parse_model_args({"policy": "visionpulse", "visionpulse_setting": "5pct", "anchor_layer": 3})
    assert s.shift == VisionPulseConfig(anchor_layer=3, visual_mass_tau=0.1, budget_min=0.01, budget_max=0.05)
    assert s.prune is None
    with pytest.raises(ConfigError, match="unknown decode-time policy 'pulse'"):
        parse_model_args({"policy": "pulse"})
    with pytest.raises(ConfigError, match="its rule has no prefill pruner: drop prune=fastv"):
        parse_model_args({"policy": "visionpulse", "prune": "fastv", "retention": 0.5})
    with pytest.raises(ConfigError, match=r"budget_max must be in \(0, 1\]"):
        parse_model_args({"policy": "visionpulse", "budget_max": 2.0})
    with pytest.raises(ConfigError, match="is a VisionPulse setting: add policy=visionpulse"):
        parse_model_args({"budget_max": 0.5})


# -- ShiftBench: dstp bench --policies ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shiftbench_dir(tmp_path_factory):
    from dstp.lab.shiftbench.processor import ShiftBenchProcessor
    from dstp.lab.shiftbench.train import TrainConfig, build_model

    path = tmp_path_factory.mktemp("sb")
    processor = ShiftBenchProcessor.build()
    build_model(TrainConfig(seed=0), processor).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def run_cli(argv):
    from dstp.lab.cli.main import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_bench_compares_dstp_and_visionpulse(shiftbench_dir, tmp_path):
    import json

    out = tmp_path / "res"
    code = run_cli(["bench", "--model", shiftbench_dir, "--n", "2", "--methods", "fastv", "--tasks", "walk",
                    "--retentions", "0.333", "--policies", "dstp,visionpulse", "--out", str(out), "--batch-size", "2"])
    assert code == 0
    records = json.loads((out / "bench.json").read_text())
    combos = sorted((r["method"], r["shift"], r.get("setting")) for r in records)
    assert combos == [("fastv", "dstp", None), ("fastv", "none", None), ("none", "none", None),
                      ("none", "visionpulse", "10pct"), ("none", "visionpulse", "5pct")]
    vp = {r["setting"]: r for r in records if r["shift"] == "visionpulse"}
    # 144 visual tokens: the 10% setting reads floor(5%..10% of 144) = 7..14 per step, the 5% one 1..7
    assert 7 <= vp["10pct"]["visual_tokens_per_step"] <= 14 and 1 <= vp["5pct"]["visual_tokens_per_step"] <= 7
    assert vp["10pct"]["anchor_layer"] == 8 and vp["10pct"]["visionpulse"]["visual_mass_tau"] == 0.4
    assert "visionpulse 5pct" in (out / "bench.md").read_text()
    assert (out / "accuracy_vs_visual_tokens.png").stat().st_size > 1000


@pytest.mark.parametrize("flags,needle", [
    (["--policies", "pulse"], "unknown decode-time policy 'pulse'"),
    (["--policies", "dstp", "--methods", "none"], "--policies dstp runs DSTP on top of pruners"),
    (["--policies", "visionpulse", "--ablation"], "--policies has no effect there"),
])
def test_bench_bad_policies_exit_2(flags, needle, capsys):
    assert run_cli(["bench", "--model", "M", *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_step_gathers_only_the_read_set(monkeypatch):
    """At layers >= anchor attention gets the K/V of the text, the k_max best visual slots (k_max = the budget's
    upper bound: floor(10% of 25) = 2 here) and the generated slots, not every prompt slot."""
    from dstp.engine import kv_store

    model, batch = family("llava")
    adapter = adapter_for_model(model)
    prepared = adapter.prepare(batch)
    widths, update = [], kv_store.GatherView.update

    def spy(self, *args, **kwargs):
        k, v = update(self, *args, **kwargs)
        widths.append(k.shape[2])
        return k, v

    monkeypatch.setattr(kv_store.GatherView, "update", spy)
    policy = make_policy(VisionPulseConfig.setting("10pct", anchor_layer=2), None, adapter.n_layers)
    Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=4, stop_token_ids=()), shift=policy)
    text = int((prepared.attention_mask & ~prepared.visual_mask).sum(-1).max())
    assert widths == [text + 2 + t + 1 for t in range(3) for _ in range(2)]  # 3 steps x layers 2, 3


def test_cli_generate_with_visionpulse(shiftbench_dir, tmp_path):
    """`dstp generate --policy visionpulse`: each step's selection in the trace, at most the 5% setting's budget
    (floor(5% of 144) = 7) and at least 1."""
    import json

    from PIL import Image

    from dstp.lab.shiftbench import generate_samples

    sample = generate_samples("lookup", 1, seed=0)[0]
    image = tmp_path / "grid.png"
    Image.fromarray(sample.image).save(image)
    trace = tmp_path / "trace.json"
    assert run_cli(["generate", "--model", shiftbench_dir, "--image", str(image), "--prompt", sample.prompt,
                    "--policy", "visionpulse", "--visionpulse-setting", "5pct", "--max-new-tokens", "4",
                    "--trace-json", str(trace)]) == 0
    steps = json.loads(trace.read_text())["steps"]
    assert steps and all(1 <= s["visual_attended"] == len(s["selected"]) <= 7 for s in steps)
