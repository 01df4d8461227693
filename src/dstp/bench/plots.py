"""PNG plots of a bench.json: accuracy vs retention, accuracy vs TFLOPs, success by RVIS event count."""
from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _colors(methods):
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(methods))}


def plot_accuracy_vs_retention(records, path):
    tasks = sorted({r["task"] for r in records})
    pruned = [r for r in records if r["method"] != "none" and r["shift"] in ("none", "dstp")]
    if not pruned:
        return None
    colors = _colors({r["method"] for r in pruned})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in records:
            if r["task"] == task and r["method"] == "none":
                ax.axhline(r["accuracy"], color="black", lw=1, ls=":", label="unpruned")
        groups = defaultdict(list)
        for r in pruned:
            if r["task"] == task:
                groups[(r["method"], r["shift"])].append(r)
        for (m, s), rs in sorted(groups.items()):
            rs = sorted(rs, key=lambda r: r["retention"])
            ax.plot([100 * r["retention"] for r in rs], [r["accuracy"] for r in rs], color=colors[m],
                    ls="-" if s == "none" else "--", marker="o" if s == "none" else "^",
                    label=f"{m}" + (" + DSTP" if s == "dstp" else ""))
        ax.set_title(task)
        ax.set_xlabel("visual tokens kept (%)")
        ax.set_ylabel("exact-answer accuracy")
        ax.set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("ShiftBench: accuracy vs retention (solid: vanilla pruner, dashed: + DSTP)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_flops(records, path, task="walk"):
    rs = [r for r in records if r["task"] == task]
    if not rs:
        return None
    colors = _colors({r["method"] for r in rs if r["method"] != "none"} or {"none"})
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rs:
        x = (r["prefill_flops"] + r["decode_flops"]) / 1e12
        if r["method"] == "none":
            ax.scatter([x], [r["accuracy"]], color="black", marker="*", s=120, zorder=3)
            ax.annotate("unpruned", (x, r["accuracy"]), fontsize=7)
            continue
        ax.scatter([x], [r["accuracy"]], color=colors[r["method"]], marker="o" if r["shift"] == "none" else "^",
                   s=40 if r["shift"] == "none" else 60, edgecolor="black" if r["shift"] != "none" else None)
        ax.annotate(f"{100 * r['retention']:.0f}%", (x, r["accuracy"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    for m, c in colors.items():
        ax.scatter([], [], color=c, label=m)
    ax.scatter([], [], color="grey", marker="o", label="vanilla")
    ax.scatter([], [], color="grey", marker="^", edgecolor="black", label="+ DSTP")
    ax.set_xlabel("TFLOPs per sample (prefill + decode)")
    ax.set_ylabel("exact-answer accuracy")
    ax.set_title(f"ShiftBench {task}: accuracy vs compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_success_by_events(records, path, retention=0.333):
    rs = [r for r in records if r["shift"] == "none" and r.get("events") and r.get("correct")]
    if not rs:
        return None
    target = min({r["retention"] for r in rs}, key=lambda x: abs(x - retention))
    rs = [r for r in rs if r["retention"] in (target, 1.0)]
    tasks = sorted({r["task"] for r in rs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    colors = _colors({r["method"] for r in rs})
    for ax, task in zip(axes[0], tasks):
        group = [r for r in rs if r["task"] == task]
        if not group:
            continue
        ev = np.array(group[0]["events"])
        bins = sorted(set(ev.tolist()))
        width = 0.8 / max(1, len(group))
        for j, r in enumerate(sorted(group, key=lambda r: r["method"])):
            ok = np.array(r["correct"], dtype=float)
            acc = [ok[ev == b].mean() for b in bins]
            ax.bar(np.arange(len(bins)) + j * width, acc, width, color=colors[r["method"]],
                   label=r["method"] if r["method"] != "none" else "unpruned")
        ax.set_xticks(np.arange(len(bins)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{b}\n(n={int((ev == b).sum())})" for b in bins], fontsize=7)
        ax.set_xlabel("RVIS events in the answer (unpruned run)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{task}: vanilla pruners at {100 * target:.1f}%")
        ax.set_ylim(0, 1.05)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(records, out) -> list[str]:
    paths = [plot_accuracy_vs_retention(records, os.path.join(out, "accuracy_vs_retention.png")),
             plot_accuracy_vs_flops(records, os.path.join(out, "accuracy_vs_tflops.png")),
             plot_success_by_events(records, os.path.join(out, "success_by_rvis_events.png"))]
    return [p for p in paths if p]
