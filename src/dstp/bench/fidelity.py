"""Engine vs transformers' generate() on a tiny random-weight model of every supported family."""
from __future__ import annotations

import json
import platform
import time

import torch
from rich.console import Console
from rich.table import Table

from dstp.bench import tiny_models as tm
from dstp.config import GenerationConfig
from dstp.engine.engine import Engine
from dstp.models.registry import adapter_for_model

CASES = {
    "llava": (tm.tiny_llava, lambda: tm.llava_batch([3, 7, 1])),
    "qwen2_5_vl": (tm.tiny_qwen2_5_vl, lambda: tm.qwen_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
    "qwen3_vl": (tm.tiny_qwen3_vl, lambda: tm.qwen3_vl_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
    "internvl": (tm.tiny_internvl, lambda: tm.internvl_batch([1, 3, 2], [4, 1, 6])),
    "llava_next": (tm.tiny_llava_next, lambda: tm.llava_next_batch([(30, 55), (60, 40), (45, 45)], [3, 7, 1])),
}


def _timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


@torch.no_grad()
def run_fidelity(new_tokens: int = 32, repeats: int = 3, out_path: str | None = None) -> list[dict]:
    rows = []
    for family, (make, batch_fn) in CASES.items():
        model, batch = make(), batch_fn()
        adapter = adapter_for_model(model)
        engine = Engine(adapter)
        hf, t_hf = _timed(lambda: model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                                 output_logits=True, return_dict_in_generate=True), repeats)
        ours, t_ours = _timed(lambda: engine.generate(adapter.prepare(batch, vision_scores=False), GenerationConfig(max_new_tokens=new_tokens),
                                                      return_logits=True), repeats)
        hf_tokens = hf.sequences[:, batch["input_ids"].shape[1]:]
        rows.append({
            "family": family,
            "batch": int(batch["input_ids"].shape[0]),
            "new_tokens": int(ours.tokens.shape[1]),
            "tokens_identical": bool(torch.equal(ours.tokens, hf_tokens)),
            "max_abs_logit_diff": float((ours.logits - torch.stack(hf.logits, 1)).abs().max()),
            "engine_ms_per_token": 1000 * t_ours / new_tokens,
            "generate_ms_per_token": 1000 * t_hf / new_tokens,
        })
    table = Table(title=f"engine vs transformers generate() (tiny random weights, {platform.machine()} CPU, "
                        f"{torch.get_num_threads()} threads, batch 3, float32)")
    for col in ("family", "new tokens", "tokens identical", "max |logit diff|", "engine ms/token",
                "generate() ms/token"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["family"], str(r["new_tokens"]), str(r["tokens_identical"]), f"{r['max_abs_logit_diff']:.2e}",
                      f"{r['engine_ms_per_token']:.1f}", f"{r['generate_ms_per_token']:.1f}")
    Console().print(table)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=2)
    return rows
