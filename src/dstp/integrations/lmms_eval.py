"""dstp as an lmms-eval model: ``lmms-eval --model dstp --model_args ...`` (lmms-eval 0.7, its chat interface).

Registered through lmms-eval's ``lmms_eval.models`` entry point (``pip install "dstp[eval]"``;
`dstp.integrations.lmms_eval_models`); no fork, no copy
of lmms-eval code. Each request's messages (the task's ``doc_to_messages``) become one conversation of
`Pipeline.chat`; requests with the same generation settings run ``batch_size`` at a time through the dstp
engine. Example:

    lmms-eval --model dstp --tasks mathverse_testmini --output_path logs/ \\
        --model_args pretrained=Qwen/Qwen3-VL-4B-Instruct,prune=fastv,retention=0.333,dstp=true,batch_size=8

model_args (`MODEL_ARGS` below): each of ``pretrained`` (default: the shipped ShiftBench model), ``prune`` (a
method or none), ``retention``, ``prune_layer``, ``contextual_fraction``, ``seed``, ``dstp`` (true/false), ``tau``,
``window``, ``source``, ``probe_layer``, ``max_revived``, ``variant``, ``dtype``, ``device`` is one argument of
`dstp.load` or one field of the configs; ``batch_size``, ``max_new_tokens`` (overrides every task's generation
length), ``efficiency_out`` and ``system_prompt`` belong to the harness side. A bad key or value, a method that does
not exist, a retention outside (0, 1], dstp=true without prune, a checkpoint that does not load: one line on stderr
and exit status 2, before any sample runs (lmms-eval itself would print a traceback and exit 0).

Per sample, an efficiency record (visual tokens attended per decoding step, prefill and decode FLOPs, peak KV
bytes, GPU memory, shifts, revived tokens, latency) goes to ``<output_path>/<model>/<time>_dstp_efficiency.jsonl``
beside lmms-eval's own files (``_rank<r>`` added per process under ``accelerate launch``); generated token
counts go through lmms-eval's `GenerationResult`; each run prints one summary line.

FLOPs, KV bytes and times are measured per engine call (a batch): a sample's record holds the batch's totals
divided by the batch size, and the totals themselves (``batch_*``); with ``batch_size=1`` they are its own.
``loglikelihood`` is not provided: it raises a one-line error naming the task.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from lmms_eval.utils import get_datetime_str, sanitize_model_name, simple_parse_args_string

import dstp
from dstp.errors import ConfigError, DSTPError
from dstp.pruners import PRUNERS

MODEL_NAME = "dstp"
DEFAULT_MAX_NEW_TOKENS = 128  # when neither the task nor model_args set a generation length
# `pretrained` when model_args leave it out: the shipped ShiftBench model, package data of the lab
# (`dstp.lab.shiftbench.default_checkpoint_dir()`); `dstp.load` imports the lab only when it loads it
SHIPPED_MODEL = str(Path(dstp.__file__).resolve().parent / "lab" / "shiftbench" / "checkpoint")

# model arg -> (kind, what it sets)
MODEL_ARGS = {
    "pretrained": ("str", "dstp.load(model_id_or_path): hub id or directory (default: the shipped ShiftBench model)"),
    "prune": ("str", "PruneConfig.method, or none"),
    "retention": ("float", "PruneConfig.retention, in (0, 1]"),
    "prune_layer": ("int", "PruneConfig.layer (K; default: the method's, depth-scaled)"),
    "contextual_fraction": ("float", "PruneConfig.contextual_fraction (visionzip)"),
    "seed": ("int", "PruneConfig.seed and the sampling seed (dstp bench uses its --seed for both)"),
    "dstp": ("bool", "DSTP on top of the pruner: DSTPConfig(...) or None"),
    "tau": ("float", "DSTPConfig.tau"),
    "window": ("int", "DSTPConfig.window"),
    "source": ("str", "DSTPConfig.source: recompute or store"),
    "probe_layer": ("int", "DSTPConfig.probe_layer"),
    "max_revived": ("int", "DSTPConfig.max_revived"),
    "variant": ("str", "DSTPConfig.variant"),
    "policy": ("str", "decode-time policy: none, dstp (as dstp=true) or visionpulse (no pruner)"),
    "visionpulse_setting": ("str", "VisionPulse's authors' setting: 10pct (default) or 5pct"),
    "anchor_layer": ("int", "VisionPulseConfig.anchor_layer"),
    "visual_mass_tau": ("float", "VisionPulseConfig.visual_mass_tau"),
    "budget_min": ("float", "VisionPulseConfig.budget_min, in (0, 1]"),
    "budget_max": ("float", "VisionPulseConfig.budget_max, in (0, 1]"),
    "fixed_budget": ("float", "VisionPulseConfig.fixed_budget, in (0, 1]"),
    "dtype": ("str", "dstp.load(dtype=): auto, bfloat16, float16, float32"),
    "device": ("str", "dstp.load(device=) (default: cuda if present, else cpu; each process's own under accelerate)"),
    "compile": ("bool", "dstp.load(compile=): the decoding step under torch.compile (CUDA graphs on CUDA)"),
    "stop_check_every": ("int", "EngineConfig.stop_check_every: decoding steps between two checks for the end"),
    "batch_size": ("int", "requests per engine call (default: lmms-eval's --batch_size, 1)"),
    "max_new_tokens": ("int", "generation length for every task, instead of the task's"),
    "efficiency_out": ("str", "folder for the efficiency JSONL (default: lmms-eval's --output_path)"),
    "system_prompt": ("str", ("a system message before every conversation (default: none; lmms-eval's own "
                              "qwen3_vl model sends 'You are a helpful assistant.')")),
}
PRUNE_FIELDS = {"prune_layer": "layer", "contextual_fraction": "contextual_fraction"}
DSTP_FIELDS = ("tau", "window", "source", "probe_layer", "max_revived", "variant")
VISIONPULSE_FIELDS = ("anchor_layer", "visual_mass_tau", "budget_min", "budget_max", "fixed_budget")


# ---- model_args ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    pretrained: str
    prune: dstp.PruneConfig | None
    shift: dstp.DSTPConfig | dstp.VisionPulseConfig | None
    dtype: str
    device: str | None
    batch_size: int
    max_new_tokens: int | None
    seed: int
    efficiency_out: str | None
    system_prompt: str | None = None
    engine: dstp.EngineConfig = dstp.EngineConfig()


def _value(name: str, kind: str, value):
    """lmms-eval hands model_args over as bool/int/float/str (`handle_arg_string`); coerce to `kind`."""
    if kind == "str":
        return str(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
    elif kind == "int" and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind == "float" and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    expected = {"bool": "true or false", "int": "an integer", "float": "a number"}[kind]
    raise ConfigError(f"model_args {name}={value!r}: expected {expected}")


def parse_model_args(args: dict) -> Settings:
    """model_args -> what `dstp.load` and the configs get; ConfigError (one line) for anything unusable."""
    unknown = [k for k in args if k not in MODEL_ARGS]
    if unknown:
        raise ConfigError(f"unknown model_args key(s) {', '.join(unknown)}; valid keys: {', '.join(MODEL_ARGS)}")
    a = {k: _value(k, MODEL_ARGS[k][0], v) for k, v in args.items()}
    method = a.get("prune", "none").strip()
    method = None if method.lower() in ("", "none") else method
    prune = shift = None
    if method is None:
        stray = [k for k in ("retention", *PRUNE_FIELDS) if k in a]
        if stray:
            raise ConfigError(f"{stray[0]}={a[stray[0]]} needs a pruner: add prune=METHOD")
    else:
        if method not in PRUNERS:
            raise ConfigError(f"unknown prune method {method!r}; known: none, {', '.join(sorted(PRUNERS))}")
        if "retention" not in a:
            raise ConfigError(f"prune={method} needs retention=R (the fraction of visual tokens kept, in (0, 1])")
        fields = {PRUNE_FIELDS[k]: a[k] for k in PRUNE_FIELDS if k in a}
        if "seed" in a:
            fields["seed"] = a["seed"]
        prune = dstp.PruneConfig(method=method, retention=a["retention"], **fields)
    policy = a.get("policy", "dstp" if a.get("dstp", False) else "none").strip().lower()
    if policy not in ("none", "dstp", "visionpulse"):
        raise ConfigError(f"unknown decode-time policy {policy!r}; known: none, dstp, visionpulse")
    if a.get("dstp", False) and policy != "dstp":
        raise ConfigError(f"dstp=true and policy={policy} disagree: pick one")
    vp_stray = [k for k in ("visionpulse_setting", *VISIONPULSE_FIELDS) if k in a]
    if policy == "visionpulse":
        if prune is not None:
            raise ConfigError(f"policy=visionpulse selects among every visual token the unpruned prefill keeps; its "
                              f"rule has no prefill pruner: drop prune={method}")
        fields = {k: a[k] for k in VISIONPULSE_FIELDS if k in a}
        shift = dstp.VisionPulseConfig.setting(a.get("visionpulse_setting", "10pct"), **fields)
    elif vp_stray:
        raise ConfigError(f"{vp_stray[0]}={a[vp_stray[0]]} is a VisionPulse setting: add policy=visionpulse")
    if policy == "visionpulse":
        stray = [k for k in DSTP_FIELDS if k in a]
        if stray:
            raise ConfigError(f"{stray[0]}={a[stray[0]]} is a DSTP setting, not VisionPulse's")
    elif policy == "dstp":
        if prune is None:
            raise ConfigError("dstp=true needs a base pruner: add prune=METHOD,retention=R")
        shift = dstp.DSTPConfig(**{k: a[k] for k in DSTP_FIELDS if k in a})
    else:
        stray = [k for k in DSTP_FIELDS if k in a]
        if stray:
            raise ConfigError(f"{stray[0]}={a[stray[0]]} is a DSTP setting: add dstp=true")
    for key in ("batch_size", "max_new_tokens"):
        if key in a and a[key] < 1:
            raise ConfigError(f"model_args {key}={a[key]}: must be >= 1")
    engine = dstp.EngineConfig(compile=a.get("compile", False), stop_check_every=a.get("stop_check_every", 8))
    return Settings(pretrained=a.get("pretrained", SHIPPED_MODEL), prune=prune, shift=shift, engine=engine,
                    dtype=a.get("dtype", "auto"), device=a.get("device"), batch_size=a.get("batch_size", 1),
                    max_new_tokens=a.get("max_new_tokens"),
                    seed=a.get("seed", 0), efficiency_out=a.get("efficiency_out"),
                    system_prompt=a.get("system_prompt") or None)


def generation_settings(gen_kwargs: dict | None, settings: Settings, task: str):
    """A task's generation_kwargs -> (max_new_tokens, `Pipeline.chat` generation arguments, stop strings, the keys
    dstp does not use). temperature 0 (lmms-eval's greedy) or absent is plain greedy; beam search is refused."""
    g = {k: v for k, v in dict(gen_kwargs or {}).items() if v is not None}
    until = g.pop("until", [])
    until = [until] if isinstance(until, str) else [u for u in until if u]
    max_new = settings.max_new_tokens or int(g.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    g.pop("max_new_tokens", None)
    beams = int(g.pop("num_beams", 1))
    if beams > 1:
        raise ConfigError(f"task {task} asks for num_beams={beams}: dstp's engine does not do beam search")
    explicit = g.pop("do_sample", None)
    temperature = float(g.pop("temperature", 1.0 if explicit else 0.0))
    do_sample = temperature > 0 and explicit is not False
    generation = {"do_sample": do_sample, "seed": settings.seed}
    top = {k: g.pop(k) for k in ("top_p", "top_k") if k in g}
    if do_sample:
        generation.update(temperature=temperature, **top)
    if "repetition_penalty" in g:
        generation["repetition_penalty"] = float(g.pop("repetition_penalty"))
    return max_new, generation, until, sorted(g)


def truncate(text: str, until: list[str]) -> str:
    """The text up to the first stop string (lmms-eval's `until`)."""
    cut = min((i for i in (text.find(u) for u in until) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def lmms_cli_args(argv: list[str]) -> argparse.Namespace:
    """lmms-eval's --output_path and --timezone on this process's command line (None when absent)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", default=None)
    parser.add_argument("--timezone", default=None)
    try:
        return parser.parse_known_args(argv)[0]
    except SystemExit:
        return argparse.Namespace(output_path=None, timezone=None)


# ---- efficiency records --------------------------------------------------------------------------------------
def efficiency_records(trace, batch_seconds: float, peak_memory: int | None) -> list[dict]:
    """One record per batch row from a generation trace: decoding steps are the row's own (the first token comes
    from the prefill, so a row with n new tokens ran n - 1 steps), costs are the batch's shared evenly."""
    batch = len(trace.n_visual)
    out = []
    for b in range(batch):
        n_new = trace.new_tokens[b]
        steps = trace.steps[: max(0, n_new - 1)]
        kept = len(trace.kept[b]) if trace.kept[b] else trace.n_visual[b]
        attended = [int(s.visual_attended[b]) for s in steps]
        out.append({
            "n_visual": trace.n_visual[b], "kept": kept, "prune_layer": trace.prune_layer, "new_tokens": n_new,
            "visual_tokens_per_step": sum(attended) / len(attended) if attended else float(kept),
            "visual_attended": attended,
            "shifts": sum(bool(s.shift[b]) for s in steps if s.shift is not None),
            "revived_tokens": sum(len(s.revived[b]) for s in steps if s.revived),
            "prefill_flops": trace.prefill_flops / batch, "decode_flops": trace.decode_flops / batch,
            "kv_bytes_peak": trace.kv_bytes_peak / batch,
            "prefill_seconds": trace.prefill_seconds / batch, "decode_seconds": trace.decode_seconds / batch,
            "batch_size": batch, "batch_prefill_flops": trace.prefill_flops, "batch_decode_flops": trace.decode_flops,
            "batch_kv_bytes_peak": trace.kv_bytes_peak, "batch_prefill_seconds": trace.prefill_seconds,
            "batch_decode_seconds": trace.decode_seconds, "batch_seconds": batch_seconds,
            "batch_peak_memory_bytes": peak_memory,
        })
    return out


def summary_line(records: list[dict], rank: int, world_size: int, path: Path | None) -> str:
    n = len(records)
    who = f"dstp (rank {rank} of {world_size})" if world_size > 1 else "dstp"
    if not n:
        return f"{who}: no samples"

    def mean(key):
        return sum(r[key] for r in records) / n

    calls = {id(r["_batch"]) for r in records}
    seconds = sum(r["batch_seconds"] for r in {id(r["_batch"]): r for r in records}.values())
    line = (f"{who}: {n} samples in {len(calls)} engine calls, {seconds:.1f} s | visual tokens/step "
            f"{mean('visual_tokens_per_step'):.1f} of {mean('n_visual'):.0f} | GFLOPs/sample "
            f"{(mean('prefill_flops') + mean('decode_flops')) / 1e9:.3f} (prefill {mean('prefill_flops') / 1e9:.3f}, "
            f"decode {mean('decode_flops') / 1e9:.3f}) | peak KV/sample {mean('kv_bytes_peak') / 2**20:.2f} MiB | "
            f"shifts/answer {mean('shifts'):.2f} | revived/answer {mean('revived_tokens'):.1f} | "
            f"new tokens/answer {mean('new_tokens'):.1f}")
    return line + (f" | per sample: {path}" if path is not None else " | no --output_path: records not written")


# ---- the model -----------------------------------------------------------------------------------------------
class DSTPModel(lmms):
    """lmms-eval chat model over `dstp.load(...)`: request in, `Pipeline.chat` out."""

    is_simple = False

    def __init__(self, **model_args) -> None:
        super().__init__()
        self.settings = s = parse_model_args(model_args)
        self.pretrained_arg = str(model_args.get("pretrained", ""))  # lmms-eval names its output folder after it
        self.accelerator = Accelerator()
        # the process's place as lmms-eval's evaluator reads it (torchrun / accelerate launch environment)
        self._rank = int(os.environ.get("RANK", str(self.accelerator.process_index)))
        self._world_size = int(os.environ.get("WORLD_SIZE", str(self.accelerator.num_processes)))
        device = s.device
        if device in (None, "cuda") and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if self._world_size > 1 else "cuda"
        elif device is None:
            device = "cpu"
        self.pipe = dstp.load(s.pretrained, prune=s.prune, shift=s.shift, dtype=s.dtype, device=device, engine=s.engine)
        self._device = torch.device(device)
        self.efficiency_path = self._efficiency_path()
        self._records: list[dict] = []
        self._ignored: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DSTPModel:
        """lmms-eval's constructor hook. model_args win over its own --batch_size/--device; bad model_args end
        the run with one line and exit status 2 (lmms-eval would swallow the error and exit 0)."""
        try:
            try:
                args = simple_parse_args_string(arg_string or "")
            except ValueError:
                raise ConfigError(f"model_args must be key=value pairs separated by commas, got {arg_string!r}; "
                                  f"valid keys: {', '.join(MODEL_ARGS)}") from None
            for key in ("batch_size", "device"):
                value = (additional_config or {}).get(key)
                if value is not None and key not in args:
                    args[key] = value
            model = cls(**args)
        except DSTPError as e:
            print(f"lmms-eval --model {MODEL_NAME}: error: {str(e).strip().splitlines()[0]}", file=sys.stderr,
                  flush=True)
            raise SystemExit(2) from None
        return model

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def _efficiency_path(self) -> Path | None:
        """`<output_path>/<model, as lmms-eval names its folder>/<time>_dstp_efficiency[_rank<r>].jsonl`."""
        cli = lmms_cli_args(sys.argv[1:])
        root = self.settings.efficiency_out or cli.output_path
        if root is None:
            return None
        stamp = get_datetime_str(**({"timezone": cli.timezone} if cli.timezone else {}))  # lmms-eval's file stamps
        rank = f"_rank{self._rank}" if self._world_size > 1 else ""
        sub = sanitize_model_name(self.pretrained_arg)
        return Path(root) / sub / f"{stamp}_dstp_efficiency{rank}.jsonl"

    # -- lmms-eval's request types ----------------------------------------------------------------------------
    def loglikelihood(self, requests):
        tasks = sorted({str(r.task_name) for r in requests}) or ["?"]
        raise NotImplementedError(f"task {', '.join(tasks)} needs log-likelihoods, which lmms-eval's dstp model does "
                                  f"not compute (generation tasks only)")

    def generate_until(self, requests) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        start = len(self._records)
        for chunk in self._chunks(requests):
            convs = [self._messages(requests[i])[0] for i in chunk]
            for i, res in zip(chunk, self._chat(convs, [requests[i] for i in chunk], round_idx=None)):
                results[i] = res
        self._summary(start)
        return results

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """lmms-eval's multi-round protocol: round 0 is the task's messages; round r > 0 asks `doc_to_messages`
        again with round_idx, previous_output and previous_round_info, and stops at `terminal` (or when the task
        returns plain messages). Each round is one conversation; the rows of a batch advance round by round."""
        outputs: list[list[str]] = [[] for _ in requests]
        start = len(self._records)
        for chunk in self._chunks(requests):
            convs = {i: self._messages(requests[i])[0] for i in chunk}
            info = {i: None for i in chunk}
            round_idx = 0
            while convs:
                live = sorted(convs)
                answers = self._chat([convs[i] for i in live], [requests[i] for i in live], round_idx=round_idx)
                round_idx += 1
                for i, res in zip(live, answers):
                    outputs[i].append(res.text)
                    nxt = self._messages(requests[i], round_idx, list(outputs[i]), info[i])
                    if nxt is None:
                        del convs[i]
                    else:
                        convs[i], info[i] = nxt
        self._summary(start)
        return outputs

    # -- helpers ----------------------------------------------------------------------------------------------
    def _chunks(self, requests):
        """Indices of requests with equal generation settings, `batch_size` at a time, in request order."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[2], sort_keys=True, default=str), []).append(i)
        for idx in groups.values():
            for k in range(0, len(idx), self.batch_size):
                yield idx[k:k + self.batch_size]

    def _messages(self, request, round_idx=None, previous_output=None, previous_round_info=None):
        """The request's conversation in transformers' chat format (round 0), or for a later round
        (conversation, round info), or None when the task says the rounds are over."""
        _, doc_to_messages, _, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        if round_idx is None:
            return self._hf_messages(doc_to_messages(doc)), None
        payload = doc_to_messages(doc, round_idx=round_idx, previous_output=previous_output,
                                  previous_round_info=previous_round_info)
        if not (isinstance(payload, tuple) and len(payload) == 4) or payload[1]:
            return None
        return self._hf_messages(payload[0]), payload[3]

    def _hf_messages(self, messages: list) -> list[dict]:
        messages = self._apply_system_prompt([dict(m) for m in messages], self.settings.system_prompt)
        return ChatMessages(messages=messages).to_hf_messages()

    def _chat(self, conversations, requests, round_idx) -> list[GenerationResult]:
        """One engine call for a batch of conversations with the same generation settings."""
        first = requests[0]
        task = first.args[4]
        max_new, generation, until, unused = generation_settings(first.args[2], self.settings, task)
        if unused and (task, tuple(unused)) not in self._ignored:
            self._ignored.add((task, tuple(unused)))
            print(f"dstp: task {task}: generation_kwargs {', '.join(unused)} do not apply to dstp's engine, ignored",
                  flush=True)
        padding = [bool((r.metadata or {}).get("__padding_only__")) for r in requests]
        run = [i for i, p in enumerate(padding) if not p]  # lmms-eval's rank-padding copies are not run
        results = [GenerationResult(text="", token_counts=TokenCounts(output_tokens=0)) for _ in requests]
        if not run:
            return results
        cuda = self._device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self._device)
        t0 = time.perf_counter()
        try:
            out = self.pipe.chat([conversations[i] for i in run], max_new_tokens=max_new, **generation)
        except DSTPError as e:
            docs = ", ".join(str(requests[i].args[3]) for i in run)
            raise type(e)(f"task {task}, docs {docs}: {e}") from None
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self._device) if cuda else None
        batch_tag = object()
        for j, (i, rec) in enumerate(zip(run, efficiency_records(out.trace, seconds, peak))):
            r = requests[i]
            results[i] = GenerationResult(text=truncate(out.texts[j], until),
                                          token_counts=TokenCounts(output_tokens=int(out.trace.new_tokens[j])))
            rec = {"task": r.args[4], "doc_id": r.args[3], "round": round_idx, "rank": self._rank, **rec}
            self._write(rec)
            self._records.append({**rec, "_batch": batch_tag})
        return results

    def _write(self, record: dict) -> None:
        if self.efficiency_path is None:
            return
        self.efficiency_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.efficiency_path, "a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")

    def _summary(self, start: int) -> None:
        print(summary_line(self._records[start:], self._rank, self._world_size, self.efficiency_path), flush=True)


def _plain(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return str(value)
