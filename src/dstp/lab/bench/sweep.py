"""`dstp bench`: the ShiftBench study. Unpruned, and every pruner vanilla and + DSTP, at each retention, on
every task: accuracy, RVIS events, visual tokens attended per step, FLOPs, KV bytes, wall time.
Writes `bench.json` (a list of records) and PNG plots into the output folder."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import dstp
from dstp.api import Pipeline
from dstp.config import DSTPConfig, GenerationConfig, PruneConfig, VisionPulseConfig, check_retention
from dstp.errors import ConfigError
from dstp.lab.shiftbench import check_answer, default_checkpoint_dir, generate_samples
from dstp.policy import check_policy, make_policy
from dstp.pruners import PRUNERS, get_pruner
from dstp.visionpulse import check_anchor
from dstp.rvis import events, relevance, shift_curve

DEFAULT_METHODS = ("fastv", "divprune", "visionzip", "cdpruner", "sparsevlm", "pyramiddrop", "random", "oracle")
DEFAULT_RETENTIONS = (0.666, 0.333, 0.111)


@dataclass(frozen=True)
class BenchConfig:
    model: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    tasks: tuple[str, ...] = ("lookup", "pair", "walk")
    retentions: tuple[float, ...] = DEFAULT_RETENTIONS
    n: int = 500
    seed: int = 1234
    batch_size: int = 32
    dstp: DSTPConfig = field(default_factory=DSTPConfig)
    shifts: tuple[str, ...] = ("none", "dstp")  # what to run on top of each pruner
    # decode-time policies compared: dstp runs on top of each pruner; visionpulse on the unpruned prefill (its rule
    # has no prefill pruner), at each of its authors' settings
    policies: tuple[str, ...] = ("dstp",)
    visionpulse_settings: tuple[str, ...] = ("10pct", "5pct")
    include_unpruned: bool = True
    # prune point K of the in-LLM pruners (FastV, SparseVLM); None: their default, depth-scaled (K=1 of ShiftBench's 16)
    prune_layer: int | None = None


@dataclass
class TaskData:
    task: str
    samples: list
    chunks: list  # [(prepared, relevant, samples)]
    max_new_tokens: int
    events: list[int] = field(default_factory=list)  # RVIS events per sample (unpruned run)
    rvis_layer: int = 0


def _variants(cfg: BenchConfig) -> list[tuple[str, str, DSTPConfig | None]]:
    """(shift name, label, DSTPConfig or None) for each thing run on top of a pruner."""
    out = []
    for s in cfg.shifts:
        if s == "none":
            out.append(("none", "vanilla", None))
        elif s == "dstp":
            if "dstp" in cfg.policies:
                out.append(("dstp", "+DSTP", cfg.dstp))
        else:
            raise ConfigError(f"unknown shift {s!r}")
    return out


def load_pipeline(model: str | None):
    path = model or str(default_checkpoint_dir())
    if model is None and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"the shipped ShiftBench checkpoint is missing at {path}: run `dstp shiftbench train`")
    return dstp.load(path)


def prepare_task(pipe: Pipeline, task: str, cfg: BenchConfig) -> TaskData:
    samples = generate_samples(task, cfg.n, seed=cfg.seed)
    longest = max(len(s.target.split()) for s in samples)
    chunks = []
    n_vis = pipe.processor.num_image_tokens
    scores = any("vision_scores" in PRUNERS[m].needs for m in cfg.methods if m in PRUNERS)
    for i in range(0, len(samples), cfg.batch_size):
        part = samples[i:i + cfg.batch_size]
        prepared = pipe.prepare([Image.fromarray(s.image) for s in part], [s.prompt for s in part], vision_scores=scores)
        relevant = torch.zeros(len(part), n_vis, dtype=torch.bool)
        for b, s in enumerate(part):
            relevant[b, s.cells_needed] = True
        chunks.append((prepared, relevant, part))
    return TaskData(task=task, samples=samples, chunks=chunks, max_new_tokens=longest + 2)


def run_config(pipe: Pipeline, data: TaskData, prune: PruneConfig | None, shift: DSTPConfig | None, seed: int):
    """Generate every sample of a task under one configuration; per-sample outcomes and cost totals."""
    p = Pipeline(pipe.adapter, prune=prune, shift=shift)
    gen = GenerationConfig(max_new_tokens=data.max_new_tokens, seed=seed)
    correct, texts, vis, shifts_per_answer = [], [], [], []
    prefill_flops = decode_flops = kv = 0.0
    t0 = time.perf_counter()
    for prepared, relevant, part in data.chunks:
        res = p.generate_prepared(prepared, gen, relevant=relevant)
        tr = res.trace
        for b, (s, text) in enumerate(zip(part, res.texts)):
            correct.append(bool(check_answer(s, text)))
            texts.append(text)
            steps = tr.steps[: max(0, tr.new_tokens[b] - 1)]
            vis.append(float(np.mean([int(st.visual_attended[b]) for st in steps])) if steps else
                       float(len(tr.kept[b]) if tr.kept[b] else tr.n_visual[b]))
            if isinstance(shift, DSTPConfig):
                shifts_per_answer.append(sum(bool(st.shift[b]) for st in steps))
        prefill_flops += tr.prefill_flops
        decode_flops += tr.decode_flops
        kv = max(kv, tr.kv_bytes_peak / len(part))
    seconds = time.perf_counter() - t0
    n = len(correct)
    return dict(correct=correct, texts=texts, accuracy=float(np.mean(correct)), visual_tokens_per_step=float(np.mean(vis)),
                prefill_flops=prefill_flops / n, decode_flops=decode_flops / n, kv_bytes_peak=int(kv),
                seconds=seconds, shifts_per_answer=float(np.mean(shifts_per_answer)) if shifts_per_answer else 0.0)


def rvis_events(pipe: Pipeline, data: TaskData, unpruned_texts: list[str]) -> None:
    """RVIS events per sample from the unpruned run, at the layer that reads the needed cells most."""
    tok = pipe.processor.tokenizer
    per_layer_mass, rels = [], []
    start = 0
    for prepared, _, part in data.chunks:
        texts = unpruned_texts[start:start + len(part)]
        start += len(part)
        ids = [tok.convert_tokens_to_ids(t.split()) + [tok.eos_token_id] for t in texts]
        width = max(len(i) for i in ids)
        tokens = torch.full((len(part), width), tok.pad_token_id, dtype=torch.long)
        for b, i in enumerate(ids):
            tokens[b, :len(i)] = torch.tensor(i)
        r = relevance(pipe.engine, prepared, tokens)  # [B, L, S, N]
        rels.append((r, [len(i) for i in ids]))
        mass = torch.zeros(r.shape[1])
        count = 0
        for b, s in enumerate(part):
            for step, cells in enumerate(s.token_reads[: r.shape[2]]):
                if cells:
                    mass += r[b, :, step, list(cells)].sum(-1)
                    count += 1
        per_layer_mass.append(mass / max(count, 1))
    layer = int(torch.stack(per_layer_mass).mean(0).argmax())
    data.rvis_layer = layer
    data.events = []
    for r, lengths in rels:
        curves = shift_curve(r[:, layer])
        for b, n in enumerate(lengths):
            data.events.append(len(events(curves[b, :n].tolist())))


def check_config(cfg: BenchConfig) -> None:
    """What the configuration alone can tell, before a model is loaded."""
    for m in cfg.methods:
        if m not in PRUNERS and m != "none":
            raise ConfigError(f"unknown method {m!r}; known: none, {', '.join(sorted(PRUNERS))}")
    for r in cfg.retentions:
        check_retention(r)
    for p in cfg.policies:
        check_policy(p)
    for name in cfg.visionpulse_settings:
        VisionPulseConfig.setting(name)
    if cfg.n < 1 or cfg.batch_size < 1:
        raise ConfigError(f"--n and --batch-size must be >= 1, got {cfg.n} and {cfg.batch_size}")


def check_model(pipe: Pipeline, cfg: BenchConfig) -> None:
    """The loaded model can run every configuration (a bad prune layer fails here, not after the first runs)."""
    if pipe.adapter.family != "shiftbench":
        raise ConfigError(f"dstp bench runs ShiftBench, so --model must be a ShiftBench checkpoint; "
                          f"{cfg.model} is a {pipe.adapter.family} model")
    for m in cfg.methods:
        if m != "none":
            get_pruner(_prune_config(cfg, m, cfg.retentions[0]), pipe.adapter.n_layers)
    if "visionpulse" in cfg.policies:
        make_policy(VisionPulseConfig(), None, pipe.adapter.n_layers)


def _prune_config(cfg: BenchConfig, method: str, retention: float) -> PruneConfig:
    layer = cfg.prune_layer if PRUNERS[method].default_layer > 0 else None  # only the pruners inside the LLM
    return PruneConfig(method=method, retention=retention, seed=cfg.seed, layer=layer)


def _jobs(cfg: BenchConfig) -> list[tuple]:
    """(task, method or None, variant or None, retention) for every run, the unpruned ones first."""
    methods = [m for m in cfg.methods if m != "none"]
    jobs = [(t, None, None, 1.0) for t in cfg.tasks] if cfg.include_unpruned or not methods else []
    jobs += [(t, m, v, r) for t in cfg.tasks for m in methods for v in _variants(cfg) for r in cfg.retentions]
    if "visionpulse" in cfg.policies:  # retention: the setting's largest budget per step
        for name in cfg.visionpulse_settings:
            vp = VisionPulseConfig.setting(name)
            jobs += [(t, None, ("visionpulse", f"VisionPulse {name}", vp), vp.budget_max) for t in cfg.tasks]
    return jobs


def run_bench(cfg: BenchConfig, console: Console | None = None, pipe: Pipeline | None = None,
              on_record=None) -> list[dict]:
    """Every job of `cfg`; `on_record(records so far)` after each (to write partial results)."""
    console = console or Console(width=150)
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    pipe = pipe or load_pipeline(cfg.model)
    check_model(pipe, cfg)
    jobs = _jobs(cfg)
    records, data = [], {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("ShiftBench", total=len(jobs))
        for task, method, variant, retention in jobs:
            if task not in data:
                progress.update(bar, description=f"{task}: preparing {cfg.n} samples")
                data[task] = prepare_task(pipe, task, cfg)
            shift_name = "none" if variant is None else variant[0]
            label = f"{task} {method or 'unpruned'} {shift_name} {retention:.3f}"
            progress.update(bar, description=label)
            rec = _run_job(pipe, data[task], cfg, method, variant, retention)
            records.append(rec)
            progress.console.print(f"{label}: accuracy {rec['accuracy']:.3f}, {rec['seconds']:.1f} s")
            if on_record is not None:
                on_record(records)
            progress.advance(bar)
    return records


def _run_job(pipe: Pipeline, d: TaskData, cfg: BenchConfig, method, variant, retention) -> dict:
    shift_name = "none" if variant is None else variant[0]
    prune = _prune_config(cfg, method, retention) if method else None
    out = run_config(pipe, d, prune, None if variant is None else variant[2], cfg.seed)
    if method is None and variant is None:
        rvis_events(pipe, d, out["texts"])
    rec = dict(task=d.task, method=method or "none", shift=shift_name, retention=retention, n=len(d.samples),
               accuracy=out["accuracy"], rvis_events_mean=float(np.mean(d.events)) if d.events else None,
               rvis_layer=d.rvis_layer, visual_tokens_per_step=out["visual_tokens_per_step"],
               prefill_flops=out["prefill_flops"], decode_flops=out["decode_flops"],
               kv_bytes_peak=out["kv_bytes_peak"], seconds=out["seconds"],
               shifts_per_answer=out["shifts_per_answer"], model=cfg.model or "shiftbench (shipped)",
               seed=cfg.seed, correct=out["correct"], events=d.events,
               hops=[s.hops for s in d.samples], prune_layer=None if method is None else
               get_pruner(prune, pipe.adapter.n_layers).layer)
    if variant is not None and isinstance(variant[2], DSTPConfig):
        rec["dstp"] = asdict(variant[2])
    if variant is not None and isinstance(variant[2], VisionPulseConfig):
        rec["visionpulse"] = asdict(variant[2])
        rec["setting"] = variant[1].split()[-1]
        rec["anchor_layer"] = check_anchor(variant[2], pipe.adapter.n_layers)
    return rec


def print_table(records: list[dict], console: Console | None = None):
    console = console or Console(width=150)
    table = Table(title="ShiftBench: exact-answer accuracy (and visual tokens attended per decode step)")
    for col in ("task", "method", "shift", "retention", "accuracy", "vis tok/step", "GFLOPs/sample", "KV KiB/sample",
                "shifts/answer", "RVIS events", "s"):
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(r["task"], r["method"], r["shift"], f"{r['retention']:.3f}", f"{r['accuracy']:.3f}",
                      f"{r['visual_tokens_per_step']:.1f}", f"{(r['prefill_flops'] + r['decode_flops']) / 1e9:.3f}",
                      f"{r['kv_bytes_peak'] / 1024:.0f}", f"{r['shifts_per_answer']:.1f}",
                      "-" if r["rvis_events_mean"] is None else f"{r['rvis_events_mean']:.2f}", f"{r['seconds']:.1f}")
    console.print(table)


def markdown(records: list[dict]) -> str:
    """Accuracy per task x method x shift, retentions as columns (the README's table)."""
    rets = sorted({r["retention"] for r in records if r["method"] != "none"}, reverse=True)
    mid = rets[len(rets) // 2] if rets else 1.0  # the retention whose GFLOPs the table shows (unpruned: 1.0)
    lines = ["| task | method | shift | " + "".join(f"{100 * r:.1f}% | " for r in rets)
             + f"GFLOPs/sample at {100 * mid:.1f}% |", "|---|---|---|" + "---|" * (len(rets) + 1)]
    for r in records:
        if r["method"] == "none" and r["shift"] == "none":
            lines.append(f"| {r['task']} | unpruned | - | " + "".join(f"{r['accuracy']:.3f} | " for _ in rets)
                         + f"{_gflops(r)} |")
    groups: dict = {}
    for r in records:
        if r["method"] != "none":
            groups.setdefault((r["task"], r["method"], r["shift"]), {})[r["retention"]] = r
    for (task, method, shift), by in groups.items():
        cells = "".join(f"{by[x]['accuracy']:.3f} | " if x in by else "- | " for x in rets)
        lines.append(f"| {task} | {method} | {shift} | {cells}{_gflops(by[mid]) if mid in by else '-'} |")
    return "\n".join(lines) + "\n" + policy_markdown(records)


def policy_markdown(records: list[dict]) -> str:
    """Every record by visual tokens attended per decoding step (the axis DSTP and VisionPulse are compared on)."""
    if not any(r["shift"] == "visionpulse" for r in records):
        return ""
    lines = ["", "| task | method | policy | retention | visual tokens/step | accuracy | GFLOPs/sample |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["task"], r["visual_tokens_per_step"])):
        policy = f"visionpulse {r['setting']}" if r["shift"] == "visionpulse" else r["shift"]
        method = "unpruned" if r["method"] == "none" else r["method"]
        lines.append(f"| {r['task']} | {method} | {policy} | {100 * r['retention']:.1f}% | "
                     f"{r['visual_tokens_per_step']:.1f} | {r['accuracy']:.3f} | {_gflops(r)} |")
    return "\n".join(lines) + "\n"


def _gflops(r: dict) -> str:
    return f"{(r['prefill_flops'] + r['decode_flops']) / 1e9:.3f}"


def save(records: list[dict], out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bench.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(markdown(records))
    return path
