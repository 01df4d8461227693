"""Write ``MODEL_CARD.md`` next to trained weights: recipe, seed, time, accuracy, where the model reads the image.
``python -m dstp.lab.cli.card DIR [--eval-n N]`` rewrites it from ``DIR/training_record.json`` (after re-running the
final evaluation on N fresh samples per task, if given; ``--notes-only`` re-renders it from the saved analysis and
NOTES.md without running the model)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dstp.pruners import depth_scaled_layer
from dstp.lab.shiftbench.evaluation import lookup_attention_profile, prefill_recall, pruned_accuracy

RETENTIONS = (0.666, 0.333, 0.111)


def analysis(model, processor) -> dict:
    layers = model.config.text_config.num_hidden_layers
    k = depth_scaled_layer(layers)
    profile = {task: lookup_attention_profile(model, processor, task, n=64) for task in ("lookup", "walk")}
    recall = {
        task: [prefill_recall(model, processor, task, r, layer=k - 1, n=200) for r in RETENTIONS] for task in ("lookup", "pair", "walk")
    }
    result = {"layers": layers, "fastv_k": k, "profile": profile, "fastv_recall": recall}
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
        "Tiny vision-language model for the ShiftBench testbed (`dstp.lab.shiftbench`): a per-cell patch embedder",
        "(MLP over each 8x8-pixel cell, plus a learned per-cell coordinate table) in front of a HF `LlamaModel`",
        f"decoder ({cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, rope_theta 1e6) and an `lm_head`.",
        "A text token naming a cell (`r3c7`) gets that cell's coordinate embedding added to its word embedding",
        "(`embed_multimodal`), so the cell name is a query for the cell's visual key.",
        "",
        "## Reproduce",
        "",
        f"`dstp shiftbench train --seed {record['seed']}` (= `python -m dstp.lab.cli.train --seed {record['seed']}`)",
        f"on 2 CPU threads, torch {record['torch']}: {record['steps_done']} steps in {record['train_seconds'] / 60:.1f} min",
        "(wall time, on a shared 2-core machine). This directory is that command's output.",
        "",
        f"Recipe: batch {cfg['batch']} images, each with questions packed after the image up to {cfg['text_tokens']} text tokens (dense",
        f"supervision), AdamW lr {cfg['lr']} ({cfg['warmup']}-step warm-up, cosine decay), init std {cfg['init_std']}",
        "(patch-embedder output rescaled to the coordinate table's scale); at init, heads 0-1 of layer",
        f"{cfg['read_layer']} are a matched filter from a cell name's rolled coordinate copy (q) to the visual token's copy (k);",
        *([f"layers 0-{cfg['read_layer'] - 1} below it start as identities (zero output projections), stay frozen for "
           f"{cfg['freeze_below_steps']} steps, then their learning rate ramps up quadratically over {cfg['below_ramp_steps']} steps;"]
          if cfg["read_layer"] > 0 else []),
        *([f"layer(s) {', '.join(map(str, cfg['locate_layers']))} also start with heads 0-1's q/k as the filter (output still zero):"
           " a shallow layer that can locate the cell (the signal FastV's ranking and DSTP's probe read);"] if cfg.get("locate_layers") else []),
        *([f"in {int(cfg['hide_rows'] * 100)}% of the training rows, a uniform random share (up to {int(cfg['hide_max'] * 100)}%) of the"
           " visual tokens no question of the row needs is hidden from attention, so that missing tokens the answer does not"
           " depend on leave it unchanged;"] if cfg.get("hide_rows") else []),
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
    with torch.no_grad():
        result = analysis(model, processor)
    (Path(out_dir) / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    render_files(out_dir, result, notes)
    return result


def render_files(out_dir: Path, result: dict, notes: str | None = None) -> None:
    """MODEL_CARD.md from the directory's training record, an analysis result and NOTES.md (if present)."""
    record = json.loads((Path(out_dir) / "training_record.json").read_text())
    card = render_card(record, result)
    notes_file = Path(out_dir) / "NOTES.md"
    if notes is None and notes_file.exists():
        notes = notes_file.read_text().strip()
    card = card.replace("NOTES_PLACEHOLDER", notes or "")
    (Path(out_dir) / "MODEL_CARD.md").write_text(card)
