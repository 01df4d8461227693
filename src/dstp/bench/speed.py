"""`dstp speed`: do the savings show up as time? One run, side by side (DESIGN §8):
transformers' generate(), the engine unpruned, FastV at 33.3%, and FastV + DSTP (store and recompute,
forced to shift every `shift_every` steps so runs compare). Random weights, visual KV dominates.
`tokens_per_s` is decoding throughput (batch x new tokens per second of decoding); prefill is its own column.

On random weights CPTS's top-k rarely leaves S0 (S0's softmax over k keys out-scores the reserve's over N - k),
so the forced shifts use DSTP's `random` target: each shift then revives about (1 - retention) * k tokens, as
the study's walks do, and the cost of producing their K/V is really paid."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from dstp.config import DSTPConfig, GenerationConfig, PruneConfig
from dstp.engine.engine import Engine
from dstp.models.registry import adapter_for_model
from dstp.pruners import get_pruner
from dstp.shift import ShiftPolicy

IMAGE_TOKEN = 3


@dataclass(frozen=True)
class SpeedConfig:
    grid: int = 48  # visual tokens = grid^2
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    intermediate: int = 1024
    vocab: int = 1024
    batch: int = 4
    prompt_text: int = 16
    new_tokens: int = 32
    retention: float = 0.333
    shift_every: int = 8
    repeats: int = 5
    seed: int = 0


SMALL = SpeedConfig(grid=16, hidden=256, layers=4, heads=4, intermediate=512, batch=2, new_tokens=16, repeats=3)


def build_model(cfg: SpeedConfig, device, dtype):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=2 * cfg.grid, patch_size=2, projection_dim=32)
    text = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=cfg.grid ** 2 + 1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = None  # always generate new_tokens
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def build_batch(cfg: SpeedConfig, device, dtype):
    g = torch.Generator().manual_seed(cfg.seed)
    text = torch.randint(10, cfg.vocab, (cfg.batch, cfg.prompt_text), generator=g)
    half = cfg.prompt_text // 2
    ids = torch.cat([torch.ones(cfg.batch, 1, dtype=torch.long), text[:, :half],
                     torch.full((cfg.batch, cfg.grid ** 2), IMAGE_TOKEN), text[:, half:]], 1)
    pixels = torch.randn(cfg.batch, 3, 2 * cfg.grid, 2 * cfg.grid, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.no_grad()
def run_speed(cfg: SpeedConfig, device: str = "cpu", dtype: str = "float32") -> dict:
    torch_dtype = getattr(torch, dtype)
    model = build_model(cfg, device, torch_dtype)
    batch = build_batch(cfg, device, torch_dtype)
    adapter = adapter_for_model(model)
    engine = Engine(adapter)
    gen = GenerationConfig(max_new_tokens=cfg.new_tokens)
    n = cfg.new_tokens
    rows = []

    # transformers: prefill = generate(1 token); decode = the rest
    t1, _ = _median_time(lambda: model.generate(**batch, max_new_tokens=1, do_sample=False), cfg.repeats, device)
    tn, _ = _median_time(lambda: model.generate(**batch, max_new_tokens=n, do_sample=False), cfg.repeats, device)
    T = batch["input_ids"].shape[1]
    kv_hf = 2 * cfg.layers * cfg.batch * cfg.heads * (cfg.hidden // cfg.heads) * (T + n) * torch.finfo(torch_dtype).bits // 8

    fastv = get_pruner(PruneConfig(method="fastv", retention=cfg.retention, layer=2), cfg.layers)
    variants = {
        "engine_unpruned": (None, None),
        "fastv": (fastv, None),
        "fastv_dstp_store": (fastv, DSTPConfig(source="store", force_every=cfg.shift_every, variant="random")),
        "fastv_dstp_recompute": (fastv, DSTPConfig(source="recompute", force_every=cfg.shift_every, variant="random")),
    }
    measured = {}
    for name, (pruner, shift) in variants.items():
        policy = ShiftPolicy(shift, pruner.layer) if shift is not None else None

        def once():
            prepared = adapter.prepare(batch, vision_scores=False)
            return engine.generate(prepared, gen, pruner=pruner, retention=cfg.retention, shift=policy)

        once()  # warm-up
        prefill, decode, out = [], [], None
        for _ in range(cfg.repeats):
            _sync(device)
            t0 = time.perf_counter()
            prepared = adapter.prepare(batch, vision_scores=False)
            _sync(device)
            t_prep = time.perf_counter() - t0
            out = engine.generate(prepared, gen, pruner=pruner, retention=cfg.retention, shift=policy)
            prefill.append(t_prep + out.trace.prefill_seconds)
            decode.append(out.trace.decode_seconds / max(1, len(out.trace.steps)))
        measured[name] = (statistics.median(prefill), statistics.median(decode), out.trace)

    base_prefill, base_decode, base_trace = measured["engine_unpruned"]
    rows.append(dict(name="hf_generate", prefill_s=t1, decode_ms_per_token=1000 * (tn - t1) / (n - 1),
                     tokens_per_s=cfg.batch * (n - 1) / (tn - t1), kv_bytes_peak=kv_hf,
                     flops=base_trace.prefill_flops + base_trace.decode_flops, ratio_to_ideal=None,
                     prefill_ratio_to_ideal=None, visual_tokens_per_step=cfg.grid ** 2))
    for name, (prefill, decode, trace) in measured.items():
        flops = trace.prefill_flops + trace.decode_flops
        ideal_prefill = base_prefill * trace.prefill_flops / base_trace.prefill_flops
        ideal_decode = base_decode * trace.decode_flops / base_trace.decode_flops
        attended = sum(float(s.visual_attended.float().mean()) for s in trace.steps) / max(1, len(trace.steps))
        rows.append(dict(name=name, prefill_s=prefill, decode_ms_per_token=1000 * decode,
                         tokens_per_s=cfg.batch / decode, kv_bytes_peak=trace.kv_bytes_peak,
                         flops=flops, ratio_to_ideal=decode / ideal_decode, prefill_ratio_to_ideal=prefill / ideal_prefill,
                         visual_tokens_per_step=attended))
    device_name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"device": device_name, "dtype": dtype, "config": asdict(cfg), "rows": rows,
            "torch": torch.__version__}


def print_speed(result: dict):
    c = result["config"]
    table = Table(title=f"dstp speed: {result['device']}, {result['dtype']}, batch {c['batch']}, "
                        f"{c['grid'] ** 2} visual tokens, {c['layers']} layers x {c['hidden']}, "
                        f"{c['new_tokens']} new tokens, median of {c['repeats']}")
    for col in ("row", "prefill s", "decode ms/tok", "tokens/s", "KV MiB", "GFLOPs", "vis tok/step",
                "decode/ideal", "prefill/ideal"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        table.add_row(r["name"], f"{r['prefill_s']:.3f}", f"{r['decode_ms_per_token']:.1f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['kv_bytes_peak'] / 2**20:.1f}", f"{r['flops'] / 1e9:.1f}",
                      f"{r['visual_tokens_per_step']:.0f}", fmt(r["ratio_to_ideal"]), fmt(r["prefill_ratio_to_ideal"]))
    Console(width=140).print(table)


def run_speed_cli(args) -> int:
    cfg = SMALL if args.small else SpeedConfig(repeats=args.repeats)
    result = run_speed(cfg, device=args.device, dtype=args.dtype)
    print_speed(result)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "speed.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0
