"""The rows of `dstp speed` (ROWS), every row of a scenario (`run_scenario`) and the whole command's result
(`run_speed`): the transformers baselines (baselines.py) and the engine unpruned, FastV, FastV + DSTP with each
source and VisionPulse (its authors' 10% setting, reading the selected tokens' K/V gathered), each timed, its peak
memory measured and its decode time set against the byte-proportional ideal."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, replace

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dstp.api import first_line, resolve_device, resolve_dtype
from dstp.config import DSTPConfig, EngineConfig, GenerationConfig, PruneConfig, VisionPulseConfig
from dstp.engine.engine import Engine
from dstp.engine.step_compiler import check_backend
from dstp.errors import ConfigError
from dstp.lab.bench.speed.baselines import hf_cache_bytes, hf_run, sync
from dstp.lab.bench.speed.config import SCENARIOS, SMALL, SpeedConfig
from dstp.lab.bench.speed.ideal import decode_bytes
from dstp.lab.bench.speed.memory import PeakMemory
from dstp.lab.bench.speed.models import build_batch, build_model
from dstp.lab.bench.speed.profiling import profile_run
from dstp.lab.bench.speed.real import REAL_IMAGE, build_real_batch, build_real_model, real_speed_config
from dstp.lab.bench.speed.report import targets
from dstp.lab.bench.speed.syncs import count_host_syncs
from dstp.models.registry import adapter_for_model
from dstp.policy import make_policy
from dstp.pruners import get_pruner
from dstp.pruners.base import budget

ENGINE_ROWS = ("engine_unpruned", "fastv", "fastv_dstp_store", "fastv_dstp_recompute", "visionpulse")
# transformers' generate() (dynamic cache, eager; static cache, compiled), then the engine's rows eager and compiled
ROWS = ("hf_generate", "hf_generate_static", *ENGINE_ROWS, *(f"{name}_compiled" for name in ENGINE_ROWS))


def engine_run(adapter, engine, batch, gen, pruner, policy, retention, device):
    """One engine run: (prefill seconds, preparing the inputs included; decode seconds; decoding steps; trace)."""
    sync(device)
    t0 = time.perf_counter()
    prepared = adapter.prepare(batch, vision_scores=False)
    sync(device)
    t_prep = time.perf_counter() - t0
    out = engine.generate(prepared, gen, pruner=pruner, shift=policy)
    return t_prep + out.trace.prefill_seconds, out.trace.decode_seconds, len(out.trace.steps), out.trace


def engine_variants(cfg: SpeedConfig, n_layers: int) -> dict:
    """Row name -> (pruner, decode-time policy config) of the engine rows. VisionPulse: its authors' 10% setting on
    the unpruned prefill."""
    fastv = get_pruner(PruneConfig(method="fastv", retention=cfg.retention, layer=cfg.prune_layer), n_layers)
    dstp = dict(force_every=cfg.shift_every, window=cfg.window, variant="random")
    # recompute keeps at most one shift's revived tokens (k); unbounded, random targets would soon have computed
    # most of the reserve, and its memory would be store's (plus the hidden states at P)
    k = int(budget(torch.tensor([cfg.visual_tokens]), cfg.retention))
    return {"engine_unpruned": (None, None), "fastv": (fastv, None),
            "fastv_dstp_store": (fastv, DSTPConfig(source="store", **dstp)),
            "fastv_dstp_recompute": (fastv, DSTPConfig(source="recompute", cache_tokens=k, **dstp)),
            "visionpulse": (None, VisionPulseConfig.setting("10pct"))}


@torch.no_grad()
def run_scenario(cfg: SpeedConfig, device, dtype, progress=None, sync_debug=False, profile_dir=None,
                 compile_static: bool = True, compile_backend: str = "inductor") -> list[dict]:
    if cfg.model_config is not None:
        model = build_real_model(cfg, device, dtype)
        batch = build_real_batch(cfg, model.config, device, dtype)
    else:
        model = build_model(cfg, device, dtype)
        batch = build_batch(cfg, device, dtype)
    adapter = adapter_for_model(model)
    eager = Engine(adapter)
    gen = GenerationConfig(max_new_tokens=cfg.new_tokens)
    variants = engine_variants(cfg, adapter.n_layers)
    task = progress.add_task(cfg.scenario, total=len(ROWS) * (1 + cfg.repeats)) if progress else None

    def say(name, what):
        if progress:
            progress.update(task, description=f"{cfg.scenario} · {name} · {what}")

    measured = {}
    for name in ROWS:
        static = name == "hf_generate_static"
        # transformers compiles its static-cache generate() (torch.compile, CUDA graphs on CUDA) where it can
        compiled = static and compile_static or name.endswith("_compiled")
        compile_error = None
        engine = eager
        if name.startswith("hf_"):
            once = lambda: hf_run(model, batch, cfg.new_tokens, static, device, compiled, compile_backend)  # noqa: E731
            reported, policy = hf_cache_bytes(cfg, static, dtype), None
        else:
            pruner, shift = variants[name.removesuffix("_compiled")]
            policy = make_policy(shift, pruner, adapter.n_layers) if shift is not None else None
            if compiled:  # a fresh compile per row: its first (tracked) run is the warm-up
                torch._dynamo.reset()
                engine = Engine(adapter, EngineConfig(compile=True, compile_backend=compile_backend))
            once = lambda: engine_run(adapter, engine, batch, gen, pruner, policy, cfg.retention, device)  # noqa: E731
        say(name, "peak memory (and warm-up)" + (" (and torch.compile)" if compiled else ""))
        peak = None  # the CPU tracker is a dispatch mode, which a compiled graph runs past: no figure there
        try:
            if compiled and device.type != "cuda":
                first = once()
            else:
                with PeakMemory(device) as mem:
                    first = once()
                peak = mem.peak_bytes
        except Exception as e:  # noqa: BLE001  torch.compile failing here (no C compiler, ...): run uncompiled
            if not static or not compiled:
                raise
            compile_error, compiled = first_line(e), False
            if progress:
                progress.console.print(f"{cfg.scenario} {name}: torch.compile failed ({compile_error}); "
                                       f"the row runs uncompiled")
            torch._dynamo.reset()
            once = lambda: hf_run(model, batch, cfg.new_tokens, True, device, compile=False)  # noqa: E731
            with PeakMemory(device) as mem:
                first = once()
            peak = mem.peak_bytes
        if not name.startswith("hf_"):
            reported = sum(first[3].memory_bytes.values())
        if progress:
            progress.advance(task)
        runs = []
        for r in range(cfg.repeats):
            say(name, f"timing {r + 1}/{cfg.repeats}")
            runs.append(once())
            if progress:
                progress.advance(task)
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        steps = runs[0][2]
        row = dict(scenario=cfg.scenario, name=name, tokens_per_s=cfg.batch * steps / decode, prefill_s=prefill,
                   decode_ms_per_token=1000 * decode / steps, peak_bytes_measured=peak,
                   peak_bytes_reported=reported, decode_steps=steps)
        row.update(compiled=compiled)
        if static:
            row.update(compile_error=compile_error)
        trace = runs[-1][3]
        if trace is not None:
            row.update(memory_bytes=trace.memory_bytes, prefill_flops=trace.prefill_flops,
                       decode_flops=trace.decode_flops,
                       decode_bytes=decode_bytes(cfg, adapter, engine, trace, getattr(shift, "source", None)),
                       visual_tokens_per_step=sum(float(s.visual_attended.float().mean()) for s in trace.steps)
                       / max(1, len(trace.steps)))
            if sync_debug and not compiled:  # the counter sees eager ops; the compiled step is the same code
                say(name, "host syncs")
                row.update(count_host_syncs(adapter, engine, batch, pruner, policy, cfg.retention,
                                            min(cfg.new_tokens, 2 * cfg.shift_every + 1)))
            if profile_dir is not None and policy is not None and not compiled:
                say(name, "profile")
                short = GenerationConfig(max_new_tokens=min(cfg.new_tokens, 4 * cfg.shift_every + 1))
                profile_run(lambda: engine_run(adapter, engine, batch, short, pruner, policy, cfg.retention,
                                            device), os.path.join(profile_dir, f"profile_{cfg.scenario}_{name}.txt"),
                         engine, policy)
        measured[name] = row
        if progress:
            progress.console.print(f"{cfg.scenario} {name}: {row['tokens_per_s']:.1f} tok/s, prefill {prefill:.3f} s, "
                                   f"peak {'-' if peak is None else f'{peak / 2**20:.1f}'} MiB ({reported / 2**20:.1f} reported)")
    for row in measured.values():
        if "decode_bytes" not in row:
            row.update(ratio_to_ideal=None, prefill_ratio_to_ideal=None)
            continue
        base = measured["engine_unpruned_compiled" if row["compiled"] else "engine_unpruned"]
        ideal_decode = base["decode_ms_per_token"] * row["decode_bytes"] / base["decode_bytes"]
        ideal_prefill = base["prefill_s"] * row["prefill_flops"] / base["prefill_flops"]
        row.update(ratio_to_ideal=row["decode_ms_per_token"] / ideal_decode,
                   prefill_ratio_to_ideal=row["prefill_s"] / ideal_prefill)
    if progress:
        progress.update(task, description=f"{cfg.scenario} · done")
    del model, engine, eager, adapter
    torch._dynamo.reset()
    return list(measured.values())


def run_speed(scenarios=("overhead-bound", "kv-bound", "weight-bound"), device: str = "cpu", dtype: str = "float32", small=False,
              repeats: int | None = None, new_tokens: int | None = None, sync_debug=False, profile_dir=None,
              console: Console | None = None, model_config: str | None = None, image: str | None = None,
              layers: int | None = None, compile_static: bool = True, compile_backend: str = "inductor") -> dict:
    """The rows of each scenario. `real` (needs `model_config`, a published config.json or its folder): a
    random-weight model built from it at full depth (`layers`: the LLM's depth instead) and width, one image of
    `image` pixels ("WxH", default 1280x960) processed as its family's processor would, batch 1."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"dstp speed builds random-weight models: give a dtype (float32, bfloat16, float16), "
                          f"not {dtype!r}")
    check_backend(compile_backend)
    if repeats is not None and repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if new_tokens is not None and new_tokens < 2:
        raise ConfigError(f"new_tokens must be >= 2 (one decoding step at least), got {new_tokens}")
    unknown = [s for s in scenarios if s not in SCENARIOS and s != "real"]
    if unknown:
        raise ConfigError(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}, both, real")
    if "real" in scenarios and model_config is None:
        raise ConfigError("the real scenario needs --model-config PATH (a published config.json of a supported family)")
    if model_config is not None and "real" not in scenarios:
        raise ConfigError("--model-config runs the real scenario: leave --scenario out or give --scenario real")
    if model_config is None and (image is not None or layers is not None):
        raise ConfigError("--image and --layers shape the real scenario: give --model-config PATH")
    if small and "real" in scenarios:
        raise ConfigError("--small shrinks the synthetic scenarios; for a quicker real run give --layers N and "
                          "--new-tokens N")
    configs = []
    for s in scenarios:
        cfg = real_speed_config(model_config, image or REAL_IMAGE, layers) if s == "real" else \
            (SMALL if small else SCENARIOS)[s]
        if repeats is not None:
            cfg = replace(cfg, repeats=repeats)
        if new_tokens is not None:
            cfg = replace(cfg, new_tokens=new_tokens)
        configs.append(cfg)
    if profile_dir is not None:
        os.makedirs(profile_dir, exist_ok=True)
    console = console or Console()
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for cfg in configs:
            rows += run_scenario(cfg, dev, torch_dtype, progress, sync_debug, profile_dir, compile_static,
                                 compile_backend)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"device": device_name, "dtype": str(torch_dtype).replace("torch.", ""), "torch": torch.__version__,
            "compile_backend": compile_backend,
            "transformers": transformers.__version__,
            "scenarios": {c.scenario: {**asdict(c), "visual_tokens": c.visual_tokens, "prompt_tokens": c.prompt_tokens,
                                       "head_dim": c.kv_head_dim} for c in configs},
            "rows": rows, "targets": targets(rows)}
