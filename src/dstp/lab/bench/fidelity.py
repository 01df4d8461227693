"""Engine vs transformers' generate() on a tiny random-weight model of every supported family."""
from __future__ import annotations

import json
import platform
import time

import torch
from rich.console import Console
from rich.table import Table

from dstp.api import resolve_device
from dstp.config import GenerationConfig
from dstp.engine.engine import Engine
from dstp.errors import ConfigError
from dstp.lab.bench import tiny_models as tm
from dstp.models.registry import adapter_for_model

CASES = {
    "llava": (tm.tiny_llava, lambda: tm.llava_batch([3, 7, 1])),
    "qwen2_5_vl": (tm.tiny_qwen2_5_vl, lambda: tm.qwen_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
    "qwen3_vl": (tm.tiny_qwen3_vl, lambda: tm.qwen3_vl_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
    "internvl": (tm.tiny_internvl, lambda: tm.internvl_batch([1, 3, 2], [4, 1, 6])),
    "llava_next": (tm.tiny_llava_next, lambda: tm.llava_next_batch([(30, 55), (60, 40), (45, 45)], [3, 7, 1])),
    # anyres crops; two images in one row (a view each); an image downsampled by anyres_max_4
    "llava_onevision": (tm.tiny_llava_onevision,
                        lambda: tm.llava_onevision_batch([[(30, 55)], [(40, 40), (20, 20)], [(70, 70)]], [3, 7, 1])),
    "qwen3_vl_moe": (tm.tiny_qwen3_vl_moe, lambda: tm.qwen3_vl_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
    "qwen3_5": (tm.tiny_qwen3_5, lambda: tm.qwen_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
    "qwen3_5_moe": (lambda: tm.tiny_qwen3_5(moe=True), lambda: tm.qwen_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
    "gemma4": (tm.tiny_gemma4, lambda: tm.gemma4_batch([[(32, 32)], [(24, 40), (40, 24)], []], [3, 1, 6])),
}


def _timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def on(batch: dict, device, dtype) -> dict:
    """The batch on `device`, floating tensors (pixels) in `dtype`."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


@torch.no_grad()
def run_fidelity(new_tokens: int = 32, repeats: int = 3, out_path: str | None = None, device: str = "cpu",
                 dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[dict]:
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        raise ConfigError(f"unknown dtype {unknown[0]!r} for --dtypes; known: {', '.join(DTYPES)}")
    resolve_device(device)
    rows = []
    cases = [(family, dtype) for family in CASES for dtype in dtypes]
    for i, (family, dtype) in enumerate(cases):
        make, batch_fn = CASES[family]
        print(f"[{i + 1}/{len(cases)}] {family} {dtype}", flush=True)
        model = make().to(device, DTYPES[dtype])
        batch = on(batch_fn(), device, DTYPES[dtype])
        adapter = adapter_for_model(model)
        engine = Engine(adapter)
        hf, t_hf = _timed(lambda: model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                                 output_logits=True, return_dict_in_generate=True), repeats)
        ours, t_ours = _timed(lambda: engine.generate(adapter.prepare(batch, vision_scores=False), GenerationConfig(max_new_tokens=new_tokens),
                                                      return_logits=True), repeats)
        hf_tokens = hf.sequences[:, batch["input_ids"].shape[1]:]
        rows.append({
            "family": family,
            "dtype": dtype,
            "device": str(device),
            "batch": int(batch["input_ids"].shape[0]),
            "new_tokens": int(ours.tokens.shape[1]),
            "tokens_identical": bool(torch.equal(ours.tokens, hf_tokens)),
            "max_abs_logit_diff": float((ours.logits - torch.stack(hf.logits, 1)).abs().max()),
            "engine_ms_per_token": 1000 * t_ours / new_tokens,
            "generate_ms_per_token": 1000 * t_hf / new_tokens,
        })
    where = torch.cuda.get_device_name() if str(device).startswith("cuda") else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"engine vs transformers generate() (tiny random weights, {where}, batch 3)")
    for col in ("family", "dtype", "new tokens", "tokens identical", "max |logit diff|", "engine ms/token",
                "generate() ms/token"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["family"], r["dtype"], str(r["new_tokens"]), str(r["tokens_identical"]), f"{r['max_abs_logit_diff']:.2e}",
                      f"{r['engine_ms_per_token']:.1f}", f"{r['generate_ms_per_token']:.1f}")
    Console().print(table)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=2)
    return rows
