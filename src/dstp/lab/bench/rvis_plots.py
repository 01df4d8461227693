"""Plots of an RVIS analysis (`dstp.rvis`): the shift curve with its dips and events, and relevance heatmaps over
the visual-token grid at chosen decoding steps."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dstp.rvis import EVENT_PROMINENCE, EVENT_THRESHOLD, RVISReport, dips  # noqa: E402


def grid_shape(n: int, hint: tuple[int, int] | None = None) -> tuple[int, int]:
    if hint is not None and hint[0] * hint[1] == n:
        return hint
    side = int(round(math.sqrt(n)))
    if side * side == n:
        return side, side
    for h in range(side, 0, -1):
        if n % h == 0:
            return h, n // h
    return 1, n


def plot_curve(rep: RVISReport, path: str, shifts: list[int] | None = None, labels: list[str] | None = None):
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for k, (start, stop) in enumerate(dips(rep.curve)):
        ax.axvspan(start - 0.5, stop - 0.5, color="grey", alpha=0.12, lw=0,
                   label=f"dip (>= {EVENT_PROMINENCE} deep)" if k == 0 else None)
    ax.plot(rep.curve, marker=".", label="cos(r_0, r_l)")
    ax.axhline(EVENT_THRESHOLD, color="grey", ls="--", lw=0.8, label=f"event threshold {EVENT_THRESHOLD}")
    if rep.events:
        ax.scatter(rep.events, [rep.curve[i] for i in rep.events], color="red", zorder=3,
                   label="RVIS event (dip below threshold)")
    for s in shifts or []:
        ax.axvline(s, color="orange", alpha=0.5, lw=1)
    if shifts:
        ax.plot([], [], color="orange", alpha=0.5, label="DSTP shift (FastV 33.3%)")
    if labels and len(labels) <= 64:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("decoding step (token fed)")
    ax.set_ylabel("cos similarity to the\nprompt's relevance")
    ax.set_title(f"RVIS shift curve, layer {rep.layer}: {counted(rep.events, 'event')}")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


HEATMAP_COLUMNS = 4


def counted(items, noun: str) -> str:
    """'1 event', '3 events'."""
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def _cell_ticks(n: int, most: int = 12) -> list[int]:
    step = max(1, math.ceil(n / most))
    return list(range(0, n, step))


def plot_heatmaps(image: np.ndarray, r: torch.Tensor, steps: list[int], path: str,
                  grid: tuple[int, int] | None = None, titles: list[str] | None = None, suptitle: str | None = None):
    """The image, then the relevance over the visual-token grid at each of `steps`, on one colour scale."""
    fig = heatmap_figure(image, r, steps, grid, titles, suptitle)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def heatmap_figure(image: np.ndarray, r: torch.Tensor, steps: list[int], grid: tuple[int, int] | None = None,
                   titles: list[str] | None = None, suptitle: str | None = None):
    h, w = grid_shape(r.shape[-1], grid)
    heats = [r[s].reshape(h, w).float().numpy() for s in steps]
    vmax = max(float(x.max()) for x in heats) or 1.0
    ncols = min(HEATMAP_COLUMNS, len(steps) + 1)
    nrows = math.ceil((len(steps) + 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.7 * ncols + 0.8, 2.8 * nrows), squeeze=False)
    axes = list(axes.flat)
    axes[0].imshow(np.asarray(image), extent=(-0.5, w - 0.5, h - 0.5, -0.5))  # in token-grid units, as the heatmaps
    for ax, heat in zip(axes[1:], heats):
        shown = ax.imshow(heat, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
    for i, (ax, title) in enumerate(zip(axes, ["image"] + (titles or [f"step {s}" for s in steps]))):
        ax.set_xticks(_cell_ticks(w))
        ax.set_yticks(_cell_ticks(h))
        ax.tick_params(labelsize=6, length=2)
        ax.set_xlabel("column", fontsize=7)
        if i % ncols == 0:
            ax.set_ylabel("row", fontsize=7)
        ax.set_title(title, fontsize=8)
    for ax in axes[len(steps) + 1:]:
        ax.axis("off")
    fig.subplots_adjust(hspace=0.45)
    bar = fig.colorbar(shown, ax=axes, fraction=0.03, pad=0.02)
    bar.set_label("attention of the fed token (head mean)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


def plot_frame_heatmap(frames: torch.Tensor, path: str, labels: list[str] | None = None, layer: int | None = None,
                       events: list[int] | None = None):
    """The frame-by-step heatmap of a video: frames [S, F] relevance summed per frame (`dstp.rvis.frame_relevance`),
    one column per decoding step (the token fed), one row per frame; RVIS events marked on the step axis."""
    m = frames.float().T.numpy()  # [F, S]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * m.shape[1] + 2.5), max(2.5, 0.3 * m.shape[0] + 1.5)))
    im = ax.imshow(m, aspect="auto", cmap="magma", interpolation="nearest", vmin=0.0)
    ax.set_yticks(range(m.shape[0]))
    ax.set_ylabel("frame (temporal patch)")
    if labels and len(labels) <= 64:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("decoding step (token fed)")
    for e in events or []:
        ax.axvline(e, color="cyan", lw=1, alpha=0.7)
    where = "" if layer is None else f", layer {layer}"
    ax.set_title(f"attention on each frame per step{where}" + (" (cyan: RVIS events)" if events else ""))
    fig.colorbar(im, ax=ax, label="attention mass on the frame")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
