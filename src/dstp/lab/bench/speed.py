"""`dstp speed`: do the savings show up as time and memory? Two synthetic scenarios in one command (DESIGN §8), and
a real model's shapes on request:

- `kv-bound`: many visual tokens (2,304), small layers (8 x 512), batch 4, 32 new tokens: the visual K/V dominate
  what a decoding step reads, as when serving at a large batch.
- `weight-bound`: batch 1, layers wide for their K/V (8 x 1,024, GQA 8 query / 2 KV heads of 128 as in Qwen2.5-VL,
  MLP 2,816, a 32k vocabulary: 123M weights read per step), 1,024 visual tokens, 1,024 new tokens: the weights
  dominate what a step reads (0.49 GB against 34 MB of K/V at the last step), as for a 4-8B model at batch 1,
  whose real size would not fit a few minutes on a 2-core CPU.
- `real` (`--model-config PATH`): a random-weight model built from a published config.json (Qwen3-VL, Qwen2.5-VL,
  LLaVA-1.5) at full depth and width, batch 1, one image (default 1280x960) with the inputs its family's processor
  would give (`real_speed_config`, `build_real_batch`), 128 new tokens: what `scripts/gpu_check.sh` runs on a GPU
  with Qwen3-VL-4B's config.

Rows: transformers' generate() with its dynamic cache (`hf_generate`) and its static cache (`hf_generate_static`),
the engine unpruned, FastV at 33.3% from layer 2, and FastV + DSTP with each source. DSTP rows are forced to shift
every `shift_every` steps (kv-bound 8, weight-bound and real 32, window 20) with DSTP's `random` target: on random
weights CPTS's top-k rarely leaves S0 (S0's softmax over k keys out-scores the reserve's over N - k), so random targets
make each shift revive about (1 - retention) * k tokens, and the cost of producing their K/V is really paid.

Per row: decoding throughput `tokens_per_s` (batch x decoding steps / decoding seconds), `prefill_s` (vision tower
and embedding included), `peak_bytes_measured` (bench/memory.py: allocations over the whole call) next to
`peak_bytes_reported` (the engine: every buffer its state holds, `Engine.held_bytes`; generate(): its KV cache),
and the measured time over an ideal, both relative to the unpruned engine: decode proportional to the bytes a step
reads (`decode_bytes`: the weights once per step, the K/V it attends, DSTP's moves of revived K/V and, for
`recompute`, the weights of layers >= P once per shift), prefill proportional to FLOPs.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, replace

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LogitsProcessor

from dstp.api import first_line
from dstp.lab.bench.memory import PeakMemory
from dstp.lab.bench.real_config import REAL_IMAGE, build_real_batch, build_real_model, real_speed_config
from dstp.lab.bench.speed_config import SCENARIOS, SMALL, SpeedConfig
from dstp.config import DSTPConfig, GenerationConfig, PruneConfig
from dstp.engine.engine import Engine
from dstp.pruners.base import budget
from dstp.errors import ConfigError
from dstp.models.registry import adapter_for_model
from dstp.pruners import get_pruner
from dstp.shift import ShiftPolicy

IMAGE_TOKEN = 3


ROWS = ("hf_generate", "hf_generate_static", "engine_unpruned", "fastv", "fastv_dstp_store", "fastv_dstp_recompute")


def build_model(cfg: SpeedConfig, device, dtype):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=2 * cfg.grid, patch_size=2, projection_dim=32)
    text = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                       max_position_embeddings=cfg.grid ** 2 + cfg.prompt_text + cfg.new_tokens + 64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one run of each kind: (prefill seconds, decode seconds, decoding steps, what it reports) --------------------
class _FirstLogits(LogitsProcessor):
    """Marks when generate() has its first logits: the end of its prefill."""

    def __init__(self, device):
        self.device, self.at = device, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            _sync(self.device)
            self.at = time.perf_counter()
        return scores


def hf_run(model, batch, n: int, static: bool, device, compile: bool = True):
    """generate() (with `static`: `cache_implementation="static"`, which transformers compiles on CUDA unless
    `compile` is False)."""
    first = _FirstLogits(device)
    kwargs = {"cache_implementation": "static"} if static else {}
    if static and not compile:
        kwargs["disable_compile"] = True
    _sync(device)
    t0 = time.perf_counter()
    model.generate(**batch, max_new_tokens=n, do_sample=False, logits_processor=[first], **kwargs)
    _sync(device)
    t1 = time.perf_counter()
    return first.at - t0, t1 - first.at, n - 1, None


def engine_run(adapter, engine, batch, gen, pruner, policy, retention, device):
    _sync(device)
    t0 = time.perf_counter()
    prepared = adapter.prepare(batch, vision_scores=False)
    _sync(device)
    t_prep = time.perf_counter() - t0
    out = engine.generate(prepared, gen, pruner=pruner, shift=policy)
    return t_prep + out.trace.prefill_seconds, out.trace.decode_seconds, len(out.trace.steps), out.trace


def hf_cache_bytes(cfg: SpeedConfig, static: bool, dtype) -> int:
    """generate()'s KV cache at its end: the static cache is allocated for prompt + new tokens up front; the
    dynamic one holds every token but the last sampled."""
    T = cfg.prompt_tokens
    length = T + cfg.new_tokens if static else T + cfg.new_tokens - 1
    hd = cfg.kv_head_dim
    return 2 * cfg.layers * cfg.batch * cfg.kv_heads * hd * length * torch.finfo(dtype).bits // 8


# -- the byte-proportional ideal of a decoding run ------------------------------------------------------------------
def decode_bytes(cfg: SpeedConfig, adapter, engine, trace, source: str | None) -> float:
    """Bytes a run's decoding steps read: per step the weights once (shared by the batch) and, per row, the K/V
    slots it attends (layers < P: every prompt token and the generated ones; layers >= P: text, the active visual
    set, generated ones); per shift, moving the revived K/V into the head's last slots (read + write) and, for
    `recompute`, the weights of layers >= P once more."""
    a, L, B = adapter, cfg.layers, cfg.batch
    eb = torch.finfo(a.dtype).bits // 8
    slot = 2 * a.n_kv_heads * a.head_dim * eb
    N = cfg.visual_tokens
    T = cfg.prompt_tokens
    P = trace.prune_layer if trace.stages else L
    weights = (L * engine.linear_params + cfg.hidden * cfg.vocab) * eb
    total = 0.0
    for t, step in enumerate(trace.steps):
        total += weights
        seen = t + 1  # generated tokens in the cache, this one included
        for b in range(B):
            total += slot * (P * (T + seen) + (L - P) * (T - N + int(step.visual_attended[b]) + seen))
        if source is not None and step.revived is not None:
            revived = sum(len(r) for r in step.revived)
            total += 2 * revived * (L - P) * slot
            if source == "recompute" and revived:
                total += (L - P) * engine.linear_params * eb
    return total


# -- host synchronisations -------------------------------------------------------------------------------------------
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
             "aten::unique_dim", "aten::unique_consecutive", "aten::equal"}


class HostSyncs(TorchDispatchMode):
    """Counts what makes the host wait for the device, on any device: reading a value (`item`, `bool`, `int`,
    `tolist`), ops whose output size depends on the data (`nonzero`, `masked_select`, `unique`, `repeat_interleave`
    by a tensor), copies from a device to the host. On CUDA, `torch.cuda.set_sync_debug_mode` gives the
    driver's own count next to it (`cuda_syncs`); on CPU it cannot see a host-to-device copy."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.cuda_syncs = 0
        self._tolist = None
        self._in_tolist = False
        self._caught = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if not self._in_tolist:
            if name in _SYNC_OPS or name == "aten::repeat_interleave.Tensor" and "output_size" not in (kwargs or {}):
                self.count += 1
            elif name in ("aten::_to_copy", "aten::copy_"):
                src = args[1] if name == "aten::copy_" else args[0]
                dst = (kwargs or {}).get("device") if name == "aten::_to_copy" else args[0].device
                if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None \
                        and torch.device(dst).type == "cpu":
                    self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.count += 1
            counter._in_tolist = True
            try:
                return original(t)
            finally:
                counter._in_tolist = False

        torch.Tensor.tolist = tolist
        if torch.cuda.is_available():
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def snapshot(self) -> tuple[int, int]:
        cuda = sum("synchronizing" in str(w.message) for w in self._records) if self._caught is not None else 0
        return self.count, cuda

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        torch.Tensor.tolist = self._tolist
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.cuda_syncs = self.snapshot()[1]
            self._caught.__exit__(*exc)
        return out


def count_host_syncs(adapter, engine, batch, pruner, policy, retention, n: int) -> dict:
    """Host synchronisations per decoding step of one generation of n tokens: inside `Engine.decode_step` (DSTP
    included), inside DSTP's step alone, and over the whole decoding loop (from the first step to the last: the
    sampling and stop check between steps included; set-up and trace building before and after it are not)."""
    prepared = adapter.prepare(batch, vision_scores=False)
    counter = HostSyncs()
    inside = {"decode_step": [0, 0], "dstp": [0, 0]}
    loop = {}

    def counted(kind, fn):
        def wrapped(*args, **kwargs):
            before = counter.snapshot()
            loop.setdefault("first", before)
            try:
                return fn(*args, **kwargs)
            finally:
                after = loop["last"] = counter.snapshot()
                inside[kind][0] += after[0] - before[0]
                inside[kind][1] += after[1] - before[1]
        return wrapped

    engine.decode_step = counted("decode_step", engine.decode_step)
    if policy is not None:
        policy.step = counted("dstp", policy.step)
    try:
        with counter:
            out = engine.generate(prepared, GenerationConfig(max_new_tokens=n), pruner=pruner,
                                  shift=policy)
    finally:
        del engine.decode_step
        if policy is not None:
            del policy.step
    steps = max(1, len(out.trace.steps))
    per_step = lambda k, i: inside[k][i] / steps if k == "decode_step" or policy is not None else None  # noqa: E731
    row = {"decode_step_syncs_per_step": per_step("decode_step", 0), "dstp_syncs_per_step": per_step("dstp", 0),
           "loop_syncs_per_step": (loop["last"][0] - loop["first"][0]) / steps}
    if adapter.device.type == "cuda":
        row.update(cuda_decode_step_syncs_per_step=per_step("decode_step", 1),
                   cuda_dstp_syncs_per_step=per_step("dstp", 1),
                   cuda_loop_syncs_per_step=(loop["last"][1] - loop["first"][1]) / steps)
    return row


# -- the benchmark ---------------------------------------------------------------------------------------------------
def _variants(cfg: SpeedConfig, n_layers: int) -> dict:
    fastv = get_pruner(PruneConfig(method="fastv", retention=cfg.retention, layer=cfg.prune_layer), n_layers)
    dstp = dict(force_every=cfg.shift_every, window=cfg.window, variant="random")
    # recompute keeps at most one shift's revived tokens (k); unbounded, random targets would soon have computed
    # most of the reserve, and its memory would be store's (plus the hidden states at P)
    k = int(budget(torch.tensor([cfg.visual_tokens]), cfg.retention))
    return {"engine_unpruned": (None, None), "fastv": (fastv, None),
            "fastv_dstp_store": (fastv, DSTPConfig(source="store", **dstp)),
            "fastv_dstp_recompute": (fastv, DSTPConfig(source="recompute", cache_tokens=k, **dstp))}


def _profile(fn, path: str, engine, policy):
    """A torch.profiler table of one run: the engine's phases and DSTP's are labelled (`dstp.step`: detection, CPTS,
    the windows and the stores told what to read; `dstp.recompute`: producing revived K/V, inside it), then the
    operators by self time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def label(obj, attr, name):
        fn_ = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            with record_function(name):
                return fn_(*args, **kwargs)
        setattr(obj, attr, wrapped)

    labels = [(engine, "prefill", "engine.prefill"), (engine, "decode_step", "engine.decode_step"),
              (policy, "step", "dstp.step"), (policy, "_recompute", "dstp.recompute")]
    for obj, attr, name in labels:
        label(obj, attr, name)
    cuda = torch.cuda.is_available()
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            fn()
    finally:
        for obj, attr, _ in labels:
            delattr(obj, attr)
    events = prof.key_averages()
    phases = [e for e in events if e.key in {name for _, _, name in labels}]
    with open(path, "w") as f:
        f.write("phases (CPU total, calls):\n")
        for e in sorted(phases, key=lambda e: -e.cpu_time_total):
            f.write(f"  {e.key:<20} {e.cpu_time_total / 1e6:9.3f} s  {e.count:6d}\n")
        f.write(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25))


@torch.no_grad()
def run_scenario(cfg: SpeedConfig, device, dtype, progress=None, sync_debug=False, profile_dir=None,
                 compile_static: bool = True) -> list[dict]:
    if cfg.model_config is not None:
        model = build_real_model(cfg, device, dtype)
        batch = build_real_batch(cfg, model.config, device, dtype)
    else:
        model = build_model(cfg, device, dtype)
        batch = build_batch(cfg, device, dtype)
    adapter = adapter_for_model(model)
    engine = Engine(adapter)
    gen = GenerationConfig(max_new_tokens=cfg.new_tokens)
    variants = _variants(cfg, adapter.n_layers)
    task = progress.add_task(cfg.scenario, total=len(ROWS) * (1 + cfg.repeats)) if progress else None

    def say(name, what):
        if progress:
            progress.update(task, description=f"{cfg.scenario} · {name} · {what}")

    measured = {}
    for name in ROWS:
        static = name == "hf_generate_static"
        # transformers compiles a static-cache generate() on CUDA (torch.compile, mode "reduce-overhead")
        compiled = static and device.type == "cuda" and compile_static
        compile_error = None
        if name.startswith("hf_"):
            once = lambda: hf_run(model, batch, cfg.new_tokens, static, device, compiled)  # noqa: E731
            reported, policy = hf_cache_bytes(cfg, static, dtype), None
        else:
            pruner, shift = variants[name]
            policy = ShiftPolicy(shift, pruner.layer) if shift is not None else None
            once = lambda: engine_run(adapter, engine, batch, gen, pruner, policy, cfg.retention, device)  # noqa: E731
        say(name, "peak memory (and warm-up)" + (" (and torch.compile)" if compiled else ""))
        try:
            with PeakMemory(device) as mem:
                first = once()
        except Exception as e:  # noqa: BLE001  torch.compile failing here (no C compiler, ...): run uncompiled
            if not compiled:
                raise
            compile_error, compiled = first_line(e), False
            if progress:
                progress.console.print(f"{cfg.scenario} {name}: torch.compile failed ({compile_error}); "
                                       f"the row runs uncompiled")
            torch._dynamo.reset()
            once = lambda: hf_run(model, batch, cfg.new_tokens, True, device, compile=False)  # noqa: E731
            with PeakMemory(device) as mem:
                first = once()
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
                   decode_ms_per_token=1000 * decode / steps, peak_bytes_measured=mem.peak_bytes,
                   peak_bytes_reported=reported, decode_steps=steps)
        if static:
            row.update(compiled=compiled, compile_error=compile_error)
        trace = runs[-1][3]
        if trace is not None:
            row.update(memory_bytes=trace.memory_bytes, prefill_flops=trace.prefill_flops,
                       decode_flops=trace.decode_flops,
                       decode_bytes=decode_bytes(cfg, adapter, engine, trace, variants[name][1] and
                                                 variants[name][1].source),
                       visual_tokens_per_step=sum(float(s.visual_attended.float().mean()) for s in trace.steps)
                       / max(1, len(trace.steps)))
            if sync_debug:
                say(name, "host syncs")
                pruner, _ = variants[name]
                row.update(count_host_syncs(adapter, engine, batch, pruner, policy, cfg.retention,
                                            min(cfg.new_tokens, 2 * cfg.shift_every + 1)))
            if profile_dir is not None and policy is not None:
                say(name, "profile")
                short = GenerationConfig(max_new_tokens=min(cfg.new_tokens, 4 * cfg.shift_every + 1))
                _profile(lambda: engine_run(adapter, engine, batch, short, variants[name][0], policy, cfg.retention,
                                            device), os.path.join(profile_dir, f"profile_{cfg.scenario}_{name}.txt"),
                         engine, policy)
        measured[name] = row
        if progress:
            progress.console.print(f"{cfg.scenario} {name}: {row['tokens_per_s']:.1f} tok/s, prefill {prefill:.3f} s, "
                                   f"peak {mem.peak_bytes / 2**20:.1f} MiB ({reported / 2**20:.1f} reported)")
    base = measured["engine_unpruned"]
    for row in measured.values():
        if "decode_bytes" not in row:
            row.update(ratio_to_ideal=None, prefill_ratio_to_ideal=None)
            continue
        ideal_decode = base["decode_ms_per_token"] * row["decode_bytes"] / base["decode_bytes"]
        ideal_prefill = base["prefill_s"] * row["prefill_flops"] / base["prefill_flops"]
        row.update(ratio_to_ideal=row["decode_ms_per_token"] / ideal_decode,
                   prefill_ratio_to_ideal=row["prefill_s"] / ideal_prefill)
    if progress:
        progress.update(task, description=f"{cfg.scenario} · done")
    del model, engine, adapter
    return list(measured.values())


def targets(rows: list[dict]) -> list[dict]:
    """Issue 16's targets as ratios: engine >= 1.0x generate()'s static cache (tokens/s); weight-bound (and `real`,
    the batch-1 model weight-bound stands in for): DSTP store >= 0.95x and recompute >= 0.90x FastV (tokens/s);
    kv-bound: DSTP within 1.15x of the ideal for its active set (decode time over the byte-proportional ideal)."""
    by = {(r["scenario"], r["name"]): r for r in rows}
    out = []

    def add(scenario, what, value, target, higher_is_better=True):
        out.append(dict(scenario=scenario, what=what, value=value, target=target,
                        met=value >= target if higher_is_better else value <= target))

    for scenario in sorted({r["scenario"] for r in rows}):
        tps = lambda name: by[(scenario, name)]["tokens_per_s"]  # noqa: E731
        add(scenario, "engine_unpruned / hf_generate_static tokens/s", tps("engine_unpruned") / tps("hf_generate_static"),
            1.0)
        if scenario in ("weight-bound", "real"):
            add(scenario, "fastv_dstp_store / fastv tokens/s", tps("fastv_dstp_store") / tps("fastv"), 0.95)
            add(scenario, "fastv_dstp_recompute / fastv tokens/s", tps("fastv_dstp_recompute") / tps("fastv"), 0.90)
        else:
            for name in ("fastv_dstp_store", "fastv_dstp_recompute"):
                add(scenario, f"{name} decode / ideal", by[(scenario, name)]["ratio_to_ideal"], 1.15, False)
    return out


def run_speed(scenarios=("kv-bound", "weight-bound"), device: str = "cpu", dtype: str = "float32", small=False,
              repeats: int | None = None, new_tokens: int | None = None, sync_debug=False, profile_dir=None,
              console: Console | None = None, model_config: str | None = None, image: str | None = None,
              layers: int | None = None, compile_static: bool = True) -> dict:
    """The rows of each scenario. `real` (needs `model_config`, a published config.json or its folder): a
    random-weight model built from it at full depth (`layers`: the LLM's depth instead) and width, one image of
    `image` pixels ("WxH", default 1280x960) processed as its family's processor would, batch 1."""
    from dstp.api import resolve_device, resolve_dtype

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"dstp speed builds random-weight models: give a dtype (float32, bfloat16, float16), "
                          f"not {dtype!r}")
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
            rows += run_scenario(cfg, dev, torch_dtype, progress, sync_debug, profile_dir, compile_static)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"device": device_name, "dtype": str(torch_dtype).replace("torch.", ""), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "scenarios": {c.scenario: {**asdict(c), "visual_tokens": c.visual_tokens, "prompt_tokens": c.prompt_tokens,
                                       "head_dim": c.kv_head_dim} for c in configs},
            "rows": rows, "targets": targets(rows)}


def print_speed(result: dict, console: Console | None = None):
    console = console or Console(width=160)
    mib = lambda x: "-" if x is None else f"{x / 2**20:.1f}"  # noqa: E731
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for scenario, c in result["scenarios"].items():
        model = "" if not c.get("model_config") else \
            f"{c['architecture']} from {c['model_config']}, random weights, image {c['image']}, "
        visual = c.get("visual_tokens") or c["grid"] ** 2
        table = Table(title=f"dstp speed {scenario}: {model}{result['device']}, {result['dtype']}, batch "
                            f"{c['batch']}, {visual} visual tokens, {c['layers']} layers x {c['hidden']}, "
                            f"{c['new_tokens']} new tokens, shift every {c['shift_every']}, median of {c['repeats']}")
        for col in ("row", "tokens/s", "prefill s", "decode ms/tok", "peak MiB measured", "peak MiB reported",
                    "vis tok/step", "decode/ideal", "prefill/ideal", "syncs/step (in DSTP)"):
            table.add_column(col, justify="right")
        for r in result["rows"]:
            if r["scenario"] != scenario:
                continue
            syncs = "-" if "loop_syncs_per_step" not in r else \
                f"{r['loop_syncs_per_step']:.2f} ({fmt(r.get('dstp_syncs_per_step'))})"
            label = r["name"] + (" (compiled)" if r.get("compiled") else "")
            table.add_row(label, f"{r['tokens_per_s']:.1f}", f"{r['prefill_s']:.3f}",
                          f"{r['decode_ms_per_token']:.2f}", mib(r["peak_bytes_measured"]),
                          mib(r["peak_bytes_reported"]),
                          fmt(r.get("visual_tokens_per_step")), fmt(r["ratio_to_ideal"]),
                          fmt(r["prefill_ratio_to_ideal"]), syncs)
        console.print(table)
    table = Table(title="targets (issue 16)")
    for col in ("scenario", "ratio", "value", "target", "met"):
        table.add_column(col)
    for t in result["targets"]:
        sign = ">=" if "tokens/s" in t["what"] else "<="
        table.add_row(t["scenario"], t["what"], f"{t['value']:.2f}", f"{sign} {t['target']:.2f}",
                      "yes" if t["met"] else "NO")
    console.print(table)
