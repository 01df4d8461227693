"""PNG plots of a bench.json: accuracy vs retention, accuracy vs GFLOPs, success by RVIS event count."""
from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MARKERS = "osD^vP*Xh<>"
DODGE = 0.025  # horizontal offset between methods at one retention, in category units, so equal values stay visible


def _styles(methods) -> dict:
    """A colour and a marker per method (the same in every plot)."""
    cmap = plt.get_cmap("tab10")
    return {m: (cmap(i % 10), MARKERS[i % len(MARKERS)]) for i, m in enumerate(sorted(methods))}


def _series_style(shift: str) -> dict:
    """Vanilla pruner: solid line, filled marker; + DSTP: dashed line, hollow marker."""
    return dict(ls="-") if shift == "none" else dict(ls="--", markerfacecolor="white")


def _label(method: str, shift: str) -> str:
    return method + (" + DSTP" if shift == "dstp" else "")


def _gflops(r: dict) -> float:
    return (r["prefill_flops"] + r["decode_flops"]) / 1e9


def _pruned_groups(records, task) -> dict:
    """(method, shift) -> its records on `task`, by retention (vanilla and + DSTP only)."""
    groups = defaultdict(list)
    for r in records:
        if r["task"] == task and r["method"] != "none" and r["shift"] in ("none", "dstp"):
            groups[(r["method"], r["shift"])].append(r)
    order = sorted(groups, key=lambda k: (k[0], k[1] != "none"))  # each method's vanilla line, then + DSTP
    return {k: sorted(groups[k], key=lambda r: r["retention"]) for k in order}


def _legend_outside(fig, axes):
    handles, labels = {}, {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))


def plot_accuracy_vs_retention(records, path):
    tasks = sorted({r["task"] for r in records})
    methods = {r["method"] for r in records if r["method"] != "none"}
    if not methods:
        return None
    styles = _styles(methods)
    retentions = sorted({r["retention"] for r in records if r["method"] != "none"})
    x_of = {ret: i for i, ret in enumerate(retentions)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in records:
            if r["task"] == task and r["method"] == "none":
                ax.axhline(r["accuracy"], color="black", lw=1, ls=":", label="unpruned")
        groups = _pruned_groups(records, task)
        for j, ((m, s), rs) in enumerate(groups.items()):
            color, marker = styles[m]
            offset = (j - (len(groups) - 1) / 2) * DODGE
            ax.plot([x_of[r["retention"]] + offset for r in rs], [r["accuracy"] for r in rs], color=color,
                    marker=marker, ms=5, lw=1.3, label=_label(m, s), **_series_style(s))
        ax.set_xticks(range(len(retentions)))
        ax.set_xticklabels([f"{100 * r:.1f}%" for r in retentions])
        ax.set_xlim(-0.5, len(retentions) - 0.5)
        ax.set_title(task)
        ax.set_xlabel("visual tokens kept")
        ax.set_ylabel("exact-answer accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(axis="y", alpha=0.3)
    _legend_outside(fig, axes[0])
    fig.suptitle("ShiftBench: accuracy vs retention (vanilla: solid, filled markers; + DSTP: dashed, hollow)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy_vs_flops(records, path, task="walk"):
    rs = [r for r in records if r["task"] == task]
    groups = _pruned_groups(records, task)
    if not rs:
        return None
    styles = _styles({m for m, _ in groups})
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for r in rs:
        if r["method"] == "none":
            ax.scatter([_gflops(r)], [r["accuracy"]], color="black", marker="*", s=140, zorder=3, label="unpruned")
    for (m, s), group in groups.items():
        color, marker = styles[m]
        ax.plot([_gflops(r) for r in group], [r["accuracy"] for r in group], color=color, marker=marker, ms=6,
                lw=1.3, label=_label(m, s), **_series_style(s))
    kept = ", ".join(f"{100 * r:.1f}%" for r in sorted({r["retention"] for g in groups.values() for r in g}))
    ax.set_xlabel("GFLOPs per sample (prefill + decode)")
    ax.set_ylabel("exact-answer accuracy")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"ShiftBench {task}: accuracy vs compute\n(each line: {kept} of the visual tokens kept, left to right)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _bars(ax, ev, group, styles):
    """One bar per method and event count; a bar at zero is still drawn (outline and a '0')."""
    bins = sorted(set(ev.tolist()))
    width = 0.8 / max(1, len(group))
    for j, r in enumerate(sorted(group, key=lambda r: r["method"])):
        ok = np.array(r["correct"], dtype=float)
        acc = np.array([ok[ev == b].mean() for b in bins])
        x = np.arange(len(bins)) + j * width
        color = styles[r["method"]][0]
        ax.bar(x, acc, width, color=color, edgecolor=color, lw=1.2,
               label=r["method"] if r["method"] != "none" else "unpruned")
        for xi, a in zip(x, acc):
            if a < 0.005:
                ax.text(xi, 0.01, "0", ha="center", va="bottom", fontsize=7, color=color, fontweight="bold")
    ax.set_xticks(np.arange(len(bins)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{b}\n(n={int((ev == b).sum())})" for b in bins], fontsize=8)


def plot_success_by_events(records, path, retention=0.333):
    rs = [r for r in records if r["shift"] == "none" and r.get("events") and r.get("correct")]
    if not rs:
        return None
    target = min({r["retention"] for r in rs}, key=lambda x: abs(x - retention))
    rs = [r for r in rs if r["retention"] in (target, 1.0)]
    tasks = sorted({r["task"] for r in rs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    styles = _styles({r["method"] for r in rs})
    for ax, task in zip(axes[0], tasks):
        group = [r for r in rs if r["task"] == task]
        _bars(ax, np.array(group[0]["events"]), group, styles)
        ax.set_xlabel("RVIS events in the answer (unpruned run)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{task}: vanilla pruners at {100 * target:.1f}%")
        ax.set_ylim(-0.04, 1.05)
    _legend_outside(fig, axes[0])
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy_vs_visual_tokens(records, path):
    """Accuracy against the visual tokens attended per decoding step, per task: the unpruned model, each pruner
    (vanilla and + DSTP) over its retentions, and VisionPulse at each setting (on the unpruned prefill)."""
    vp = [r for r in records if r["shift"] == "visionpulse"]
    if not vp:
        return None
    tasks = sorted({r["task"] for r in records})
    styles = _styles({r["method"] for r in records if r["method"] != "none"})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in records:
            if r["task"] == task and r["method"] == "none" and r["shift"] == "none":
                ax.scatter([r["visual_tokens_per_step"]], [r["accuracy"]], color="black", marker="*", s=140,
                           zorder=3, label="unpruned")
        for (m, s), rs in _pruned_groups(records, task).items():
            color, marker = styles[m]
            ax.plot([r["visual_tokens_per_step"] for r in rs], [r["accuracy"] for r in rs], color=color,
                    marker=marker, ms=5, lw=1.3, label=_label(m, s), **_series_style(s))
        mine = sorted((r for r in vp if r["task"] == task), key=lambda r: r["visual_tokens_per_step"])
        ax.plot([r["visual_tokens_per_step"] for r in mine], [r["accuracy"] for r in mine], color="crimson",
                marker="P", ms=8, lw=1.3, ls="-.", label="VisionPulse (" + ", ".join(r["setting"] for r in mine) + ")")
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("visual tokens attended per decoding step")
        ax.set_ylabel("exact-answer accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes[0])
    fig.suptitle("ShiftBench: accuracy vs visual tokens per step (DSTP on pruners, VisionPulse on the full prefill)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(records, out) -> list[str]:
    pruned = [r for r in records if r["shift"] != "visionpulse"]  # the retention plots: pruners and unpruned
    paths = [plot_accuracy_vs_retention(pruned, os.path.join(out, "accuracy_vs_retention.png")),
             plot_accuracy_vs_flops(pruned, os.path.join(out, "accuracy_vs_gflops.png")),
             plot_success_by_events(pruned, os.path.join(out, "success_by_rvis_events.png")),
             plot_accuracy_vs_visual_tokens(records, os.path.join(out, "accuracy_vs_visual_tokens.png"))]
    return [p for p in paths if p]
