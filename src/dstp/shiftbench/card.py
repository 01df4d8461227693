"""Write ``MODEL_CARD.md`` next to trained weights: recipe, seed, time, accuracy, where the model
reads the image. ``python -m dstp.shiftbench.card DIR`` rewrites it from ``DIR/training_record.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dstp.pruners import depth_scaled_layer
from dstp.shiftbench.evaluation import lookup_attention_profile, prefill_recall

RETENTIONS = (0.666, 0.333, 0.111)


def analysis(model, processor) -> dict:
    layers = model.config.text_config.num_hidden_layers
    k = depth_scaled_layer(layers)
    profile = {task: lookup_attention_profile(model, processor, task, n=64) for task in ("lookup", "walk")}
    recall = {
        task: [prefill_recall(model, processor, task, r, layer=k - 1, n=200) for r in RETENTIONS] for task in ("lookup", "walk")
    }
    result = {"layers": layers, "fastv_k": k, "profile": profile, "fastv_recall": recall}
    try:
        from dstp.shiftbench.evaluation import pruned_accuracy
    except ImportError:  # an older evaluation module already imported by the training process
        return result
    result["pruned_accuracy"] = [
        {"method": method, "prune_layer": layer, "retention": r, "task": task,
         "accuracy": pruned_accuracy(model, processor, task, r, layer, method, n=100)}
        for method, layer in (("fastv", k), ("random", 0), ("prompt_oracle", 0))
        for r in (1.0, 0.333, 0.111)
        for task in ("lookup", "walk")
    ]  # fmt: skip
    return result


def _fmt(values) -> str:
    return " | ".join(f"{v:.3f}" for v in values)


def render_card(record: dict, result: dict) -> str:
    cfg, m = record["config"], record["metrics"]
    layers, k = result["layers"], result["fastv_k"]
    lines = [
        "# ShiftBench model (dstp)",
        "",
        "Tiny vision-language model for the ShiftBench testbed (`dstp.shiftbench`): a per-cell patch embedder",
        "(MLP over each 8x8-pixel cell, plus a learned per-cell coordinate table) in front of a HF `LlamaModel`",
        f"decoder ({cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, rope_theta 1e6) and an `lm_head`.",
        "A text token naming a cell (`r3c7`) gets that cell's coordinate embedding added to its word embedding",
        "(`embed_multimodal`), so the cell name is a query for the cell's visual key.",
        "",
        "## Reproduce",
        "",
        f"`dstp shiftbench train --seed {record['seed']}` (= `python -m dstp.shiftbench.train --seed {record['seed']}`)",
        f"on 2 CPU threads, torch {record['torch']}: {record['steps_done']} steps in {record['train_seconds'] / 60:.1f} min",
        "(wall time, on a shared 2-core machine). This directory is that command's output.",
        "",
        f"Recipe: batch {cfg['batch']} images, each with questions packed after the image up to {cfg['text_tokens']} text tokens (dense",
        f"supervision), AdamW lr {cfg['lr']} ({cfg['warmup']}-step warm-up, cosine decay), init std {cfg['init_std']}",
        "(patch-embedder output rescaled to the coordinate table's scale); at init, heads 0-1 of layer",
        f"{cfg.get('read_layer', 0)} are a matched filter from a cell name's rolled coordinate copy (q) to the visual token's copy (k);",
        f"curriculum: lookups only for {cfg['lookup_steps']} steps, then lookup/pair/walk with the walk's",
        f"maximum hop count growing from 1 to {cfg['max_hops']} by {int(cfg['ramp_end'] * 100)}% of the steps.",
        "",
        f"## Accuracy (unpruned, greedy, {record['eval_n']} fresh samples each, generator seed {record['eval_seed']}+)",
        "",
        "| lookup | pair | walk h2 | walk h3 | walk h4 | walk h5 | walk h6 |",
        "|---|---|---|---|---|---|---|",
        "| " + " | ".join(f"{v:.3f}" for v in [m["lookup"], m["pair"], *m["walk"].values()]) + " |",
        "",
        "## Where the model reads the image (issue item 5)",
        "",
        "Attention of the position that must read a cell (teacher forced; the token before each read token)",
        "on that cell's visual token, per decoder layer (eager attention, 64 samples):",
        "",
        "| task | measure | " + " | ".join(f"L{i}" for i in range(layers)) + " |",
        "|---|---|" + "---|" * layers,
    ]
    for task, prof in result["profile"].items():
        lines.append(f"| {task} | head mean | {_fmt(prof['head_mean'])} |")
        lines.append(f"| {task} | best head | {_fmt(prof['best_head'])} |")
    uniform = result["profile"]["walk"]["uniform"]
    lines += [
        "",
        f"(Uniform attention would give about {uniform:.3f}.)",
        "",
        "Oracle check of prefill pruning: FastV-style selection (top-k visual tokens by the last prompt",
        f"token's head-mean attention at layer K-1 = {k - 1}, i.e. K={k}, the same fraction of depth as K=2 of 32",
        "layers, `dstp.pruners.depth_scaled_layer`) against `Sample.cells_needed`:",
        "",
        "| task | retention | recall of needed cells | all needed cells kept |",
        "|---|---|---|---|",
    ]
    for task, rows in result["fastv_recall"].items():
        for r in rows:
            lines.append(f"| {task} | {r['retention']:.3f} | {r['recall']:.3f} | {r['all_kept']:.3f} |")
    if "pruned_accuracy" in result:
        lines += [
            "",
            "Accuracy with visual tokens pruned once at prefill (simulation in `evaluation.pruned_accuracy`, 100",
            f"samples each, walks of 2-6 hops): FastV K={k} (top-k by layer-{k - 1} attention, pruned from layer {k} on) and",
            "random pruning and the prompt oracle (the cells the prompt names, then random) before the LLM (layer 0):",
            "",
            "| method | retention | lookup | walk |",
            "|---|---|---|---|",
        ]
        rows = {}
        for r in result["pruned_accuracy"]:
            rows.setdefault((r["method"], r["prune_layer"], r["retention"]), {})[r["task"]] = r["accuracy"]
        for (method, layer, ret), acc in rows.items():
            lines.append(f"| {method} (layer {layer}) | {ret:.3f} | {acc['lookup']:.2f} | {acc['walk']:.2f} |")
    lines += ["", "## Notes", "", "NOTES_PLACEHOLDER", ""]
    return "\n".join(lines)


def write_card(out_dir: Path, model, processor, notes: str | None = None) -> dict:
    record = json.loads((Path(out_dir) / "training_record.json").read_text())
    with torch.no_grad():
        result = analysis(model, processor)
    (Path(out_dir) / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    card = render_card(record, result)
    notes_file = Path(out_dir) / "NOTES.md"
    if notes is None and notes_file.exists():
        notes = notes_file.read_text().strip()
    card = card.replace("NOTES_PLACEHOLDER", notes or "")
    (Path(out_dir) / "MODEL_CARD.md").write_text(card)
    return result


def main(argv=None) -> int:
    from dstp.shiftbench import load_shiftbench

    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(2)
    out = Path(argv[0])
    model, processor = load_shiftbench(out)
    print(json.dumps(write_card(out, model, processor), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
