"""The paper's table through lmms-eval: every model x (unpruned, each pruner vanilla and + DSTP at each retention)
on the paper's benchmarks, one `lmms-eval --model dstp` run per cell row, then one markdown table like bench.md.

    python scripts/paper_table.py --out runs/paper               # the whole grid (GPU, hub access, a judge key)
    python scripts/paper_table.py --out runs/paper --dry-run     # print the commands, run nothing
    python scripts/paper_table.py --out runs/paper --table-only  # rebuild paper_table.md from finished runs
    python scripts/paper_table.py --processes 8 ...              # data parallel: accelerate launch, one GPU each

Runs whose results already exist are skipped, so an interrupted grid resumes. A run that leaves no results file
(lmms-eval reports errors and still exits 0) is listed as failed at the end, exit status 1. Offline smoke test on
the shipped ShiftBench model (what tests/test_lmms_eval.py checks for one cell):

    dstp shiftbench export --out /tmp/sb --n 20
    HF_DATASETS_OFFLINE=1 python scripts/paper_table.py --out /tmp/sb_grid --include-path /tmp/sb \\
        --models "$(python -c 'import dstp.lab.shiftbench as s; print(s.default_checkpoint_dir())')" \\
        --tasks shiftbench --methods fastv --retentions 0.333 --dtype float32 --device cpu

See docs/paper.md for what each benchmark needs. Not run here on the real checkpoints (no GPU, no hub access).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MODELS = ("Qwen/Qwen3-VL-4B-Instruct", "OpenGVLab/InternVL3_5-8B-HF")
# lmms-eval 0.7.3 task names: MathVerse, WeMath, DynaMath, LogicVista, MMMU-Pro (standard + vision), GQA, TextVQA,
# ScienceQA (image subset)
TASKS = ("mathverse_testmini", "wemath_testmini_reasoning", "dynamath_reasoning", "logicvista_reasoning", "mmmu_pro",
         "gqa", "textvqa_val", "scienceqa_img")
METHODS = ("fastv", "divprune", "visionzip", "sparsevlm")
RETENTIONS = (0.666, 0.333, 0.111)


@dataclass(frozen=True)
class Run:
    model: str
    method: str | None  # None: unpruned
    dstp: bool = False
    retention: float | None = None

    @property
    def name(self) -> str:
        if self.method is None:
            return "unpruned"
        return f"{self.method}_{'dstp' if self.dstp else 'vanilla'}_{self.retention:g}"

    def folder(self, out: Path) -> Path:
        return out / self.model.strip("/").replace("/", "__") / self.name


def grid(models, methods, retentions) -> list[Run]:
    runs = []
    for model in models:
        runs.append(Run(model, None))
        runs += [Run(model, m, d, r) for m in methods for d in (False, True) for r in retentions]
    return runs


def model_args(run: Run, args) -> str:
    parts = [f"pretrained={run.model}", f"dtype={args.dtype}", f"batch_size={args.batch_size}"]
    if args.device:
        parts.append(f"device={args.device}")
    if run.method is not None:
        parts += [f"prune={run.method}", f"retention={run.retention}"]
        if run.dstp:
            parts.append("dstp=true")
    if args.max_new_tokens:
        parts.append(f"max_new_tokens={args.max_new_tokens}")
    return ",".join(parts + list(args.model_arg))


def command(run: Run, args) -> list[str]:
    if args.processes > 1:
        launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(args.processes), "-m", "lmms_eval"]
    else:
        launch = [sys.executable, "-m", "lmms_eval"]
    cmd = [*launch, "--model", "dstp", "--model_args", model_args(run, args), "--tasks", ",".join(args.tasks),
           "--output_path", str(run.folder(args.out)), "--log_samples"]
    if args.include_path:
        cmd += ["--include_path", args.include_path]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    return cmd


def finished(run: Run, out: Path) -> Path | None:
    found = sorted(run.folder(out).rglob("*_results.json"))
    return found[-1] if found else None


# ---- the table -----------------------------------------------------------------------------------------------
def main_metric(entry: dict) -> tuple[str, float] | None:
    """The first score of a task's results entry ("metric,filter": value), skipping stderrs and aliases."""
    for key, value in entry.items():
        if "," in key and "stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key.split(",")[0], float(value)
    return None


def efficiency(folder: Path) -> dict[str, dict]:
    """task -> mean GFLOPs/sample and visual tokens/step, from the dstp model's efficiency JSONL files."""
    sums: dict[str, list[float]] = {}
    for path in folder.rglob("*_dstp_efficiency*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            acc = sums.setdefault(r["task"], [0.0, 0.0, 0])
            acc[0] += (r["prefill_flops"] + r["decode_flops"]) / 1e9
            acc[1] += r["visual_tokens_per_step"]
            acc[2] += 1
    return {t: {"gflops": g / n, "visual_tokens": v / n} for t, (g, v, n) in sums.items()}


def collect(runs: list[Run], out: Path) -> list[dict]:
    """One record per (run, task) that finished: model, method, shift, retention, task, metric, score, cost."""
    records = []
    for run in runs:
        path = finished(run, out)
        if path is None:
            continue
        results = json.loads(path.read_text())["results"]
        cost = efficiency(path.parent)
        for task, entry in results.items():
            score = main_metric(entry)
            if score is None:
                continue
            records.append(dict(model=run.model, method=run.method or "none", shift="dstp" if run.dstp else "-",
                                retention=run.retention, task=task, metric=score[0], score=score[1],
                                **cost.get(task, {"gflops": None, "visual_tokens": None})))
    return records


def markdown(records: list[dict], retentions) -> str:
    mid = retentions[len(retentions) // 2]
    head = ("| model | task (metric) | method | shift | " + " | ".join(f"{100 * r:.1f}%" for r in retentions)
            + f" | GFLOPs/sample at {100 * mid:.1f}% |")
    lines = [head, "|---|---|---|---|" + "---|" * (len(retentions) + 1)]
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["model"], r["task"], r["metric"], r["method"], r["shift"])
        rows.setdefault(key, {})[r["retention"]] = r
    for (model, task, metric, method, shift), by in rows.items():
        if method == "none":
            only = by[None]
            cells = [f"{only['score']:.4g}"] * len(retentions)
            cost = only["gflops"]
        else:
            cells = [f"{by[x]['score']:.4g}" if x in by else "-" for x in retentions]
            cost = by[mid]["gflops"] if mid in by else None
        lines.append(f"| {model} | {task} ({metric}) | {'unpruned' if method == 'none' else method} | {shift} | "
                     + " | ".join(cells) + f" | {'-' if cost is None else f'{cost:.2f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="one folder per model and run; paper_table.md here")
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    p.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--retentions", type=lambda s: [float(x) for x in s.split(",")], default=list(RETENTIONS))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="model_args device (default: cuda if present, else cpu)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="model_args max_new_tokens for every task (default: each task's own generation length)")
    p.add_argument("--model-arg", action="append", default=[], help="extra model_args key=value (repeatable)")
    p.add_argument("--processes", type=int, default=1, help="> 1: accelerate launch --multi_gpu, data parallel")
    p.add_argument("--include-path", default=None, help="lmms-eval --include_path (e.g. a ShiftBench export)")
    p.add_argument("--limit", type=float, default=None, help="lmms-eval --limit (smoke tests only)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    args = p.parse_args(argv)

    runs = grid(args.models, args.methods, args.retentions)
    failed = []
    if not args.table_only:
        for i, run in enumerate(runs, 1):
            cmd = command(run, args)
            if args.dry_run:
                print(shlex.join(cmd))
                continue
            if finished(run, args.out):
                print(f"[{i}/{len(runs)}] {run.model} {run.name}: done before, skipped", flush=True)
                continue
            print(f"[{i}/{len(runs)}] {run.model} {run.name}: {shlex.join(cmd)}", flush=True)
            run.folder(args.out).mkdir(parents=True, exist_ok=True)
            with open(run.folder(args.out) / "lmms_eval.log", "w") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            if code != 0 or not finished(run, args.out):
                failed.append(f"{run.model} {run.name} (exit {code}; log: {run.folder(args.out) / 'lmms_eval.log'})")
    if args.dry_run:
        return 0
    table = markdown(collect(runs, args.out), args.retentions)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_table.md").write_text(table)
    print(table + f"wrote {args.out / 'paper_table.md'}")
    for f in failed:
        print(f"failed: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
