"""The transformers rows of `dstp speed`: generate() with its dynamic cache and with its static cache, timed up to
its first logits (prefill) and after (decode), and the bytes of the KV cache it holds."""
from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor

from dstp.lab.bench.speed.config import SpeedConfig
from dstp.models.hf_compat import static_cache_compile_config


def sync(device):
    """Wait for the device's queued work (CUDA), so that host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstLogits(LogitsProcessor):
    """Marks when generate() has its first logits: the end of its prefill."""

    def __init__(self, device):
        self.device, self.at = device, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            sync(self.device)
            self.at = time.perf_counter()
        return scores


def hf_run(model, batch, n: int, static: bool, device, compile: bool = True, backend: str = "inductor"):
    """One generate() run (with `static`: `cache_implementation="static"`, compiled by transformers with its compile
    config on any device, CUDA graphs on CUDA, unless `compile` is False): (prefill seconds, decode seconds, decoding
    steps, None)."""
    first = FirstLogits(device)
    kwargs = {"cache_implementation": "static"} if static else {}
    if static and compile:
        kwargs["compile_config"] = static_cache_compile_config(device, backend=backend)
    elif static:
        kwargs["disable_compile"] = True
    sync(device)
    t0 = time.perf_counter()
    model.generate(**batch, max_new_tokens=n, do_sample=False, logits_processor=[first], **kwargs)
    sync(device)
    t1 = time.perf_counter()
    return first.at - t0, t1 - first.at, n - 1, None


def hf_cache_bytes(cfg: SpeedConfig, static: bool, dtype) -> int:
    """generate()'s KV cache at its end: the static cache is allocated for prompt + new tokens up front; the
    dynamic one holds every token but the last sampled."""
    T = cfg.prompt_tokens
    length = T + cfg.new_tokens if static else T + cfg.new_tokens - 1
    hd = cfg.kv_head_dim
    return 2 * cfg.layers * cfg.batch * cfg.kv_heads * hd * length * torch.finfo(dtype).bits // 8
