"""RVIS analysis (DESIGN §6): where the model looks while it writes its answer.

Relevance r_l over all N visual tokens at decoding step l is the head-mean attention of the token fed at step l
(step 0: the last prompt token) over the visual tokens, from an unpruned run. The shift curve is cos(r_0, r_l);
an RVIS event is a dip of it at least 0.1 deep whose lowest similarity is below 0.7 (`dips`, `events`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from dstp.engine.engine import Engine
from dstp.engine.prune_context import visual_layout
from dstp.models.base import PreparedInputs

EVENT_THRESHOLD = 0.7
EVENT_PROMINENCE = 0.1  # how deep a dip must be to count (DESIGN §6)


def extend_prepared(adapter, prepared: PreparedInputs, tokens: torch.Tensor) -> PreparedInputs:
    """The prompt followed by generated `tokens` [B, n], as one prefill input (positions continue)."""
    B, n = tokens.shape
    emb = adapter.embed_tokens(tokens.to(prepared.inputs_embeds.device))
    steps = torch.arange(n, device=emb.device)
    new_pos = prepared.next_position[:, None] + steps
    pos = prepared.position_ids
    new_pos = new_pos[None].expand(3, -1, -1) if pos.dim() == 3 else new_pos
    ones = torch.ones(B, n, dtype=torch.bool, device=emb.device)
    extras = dict(prepared.extras)
    if "deepstack" in extras:  # generated tokens get no DeepStack features
        ds = extras["deepstack"]
        extras["deepstack"] = torch.cat([ds, ds.new_zeros(*ds.shape[:2], n, ds.shape[-1])], 2)
    return PreparedInputs(
        inputs_embeds=torch.cat([prepared.inputs_embeds, emb], 1),
        attention_mask=torch.cat([prepared.attention_mask, ones], 1),
        position_ids=torch.cat([pos, new_pos], -1),
        next_position=prepared.next_position + n,
        visual_mask=torch.cat([prepared.visual_mask, ~ones], 1),
        vision_scores=prepared.vision_scores, extras=extras)


@torch.no_grad()
def relevance(engine: Engine, prepared: PreparedInputs, tokens: torch.Tensor, layers: list[int] | None = None,
              lengths: list[int] | None = None) -> torch.Tensor:
    """Relevance [B, len(layers), n + 1, Nmax]: row l is the attention of the token fed at decoding step l
    (l = 0: the last prompt token; l >= 1: generated token l-1) over each visual token, head-mean."""
    a = engine.adapter
    layers = list(range(a.n_layers)) if layers is None else layers
    T = prepared.inputs_embeds.shape[1]
    n = tokens.shape[1]
    feed = tokens[:, :-1] if n > 0 else tokens  # the last generated token is never fed back
    ext = extend_prepared(a, prepared, feed)
    state_store, cos, sin, capture = engine.run_prompt(ext, set(layers))
    vpos, vvalid, _ = visual_layout(prepared.visual_mask)
    query_pos = (T - 1 + torch.arange(feed.shape[1] + 1, device=vpos.device)).expand(vpos.shape[0], -1)
    out = []
    for i in layers:
        probs = engine.attention_rows(i, capture[i], query_pos, state_store, cos, sin).mean(1)  # [B, Q, T+n]
        rel = probs.gather(2, vpos[:, None, :].expand(-1, probs.shape[1], -1))
        out.append(rel.masked_fill(~vvalid[:, None, :], 0.0))
    return torch.stack(out, 1)


def shift_curve(r: torch.Tensor) -> torch.Tensor:
    """cos(r_0, r_l) for every step: r [..., S, N] -> [..., S]."""
    return torch.nn.functional.cosine_similarity(r, r[..., :1, :], dim=-1)


def dips(curve, prominence: float = EVENT_PROMINENCE) -> list[tuple[int, int]]:
    """The dips of a shift curve as [start, stop) step ranges. A dip starts where the curve falls `prominence` below
    the highest value since the previous dip (at first: step 0, the prompt's own similarity) and ends before the
    step where it rises `prominence` above the lowest value inside it, or at the end of the answer. Changes
    smaller than `prominence` neither start nor end a dip, so noise on a low plateau is one dip, not many."""
    c = [float(x) for x in curve]
    out, start, peak, low = [], None, c[0] if c else 0.0, math.inf
    for i in range(1, len(c)):
        if start is None:
            if c[i] <= peak - prominence:
                start, low = i, c[i]
            peak = max(peak, c[i])
        elif c[i] >= low + prominence:
            out.append((start, i))
            start, peak = None, c[i]
        else:
            low = min(low, c[i])
    if start is not None:
        out.append((start, len(c)))
    return out


def events(curve, threshold: float = EVENT_THRESHOLD, prominence: float = EVENT_PROMINENCE) -> list[int]:
    """RVIS events: one per dip (see `dips`) whose lowest similarity is below `threshold`, at the dip's first step
    within `prominence` of that lowest value (the bottom of the dip, up to noise)."""
    c = [float(x) for x in curve]
    out = []
    for start, stop in dips(c, prominence):
        low = min(c[start:stop])
        if low < threshold:
            out.append(next(i for i in range(start, stop) if c[i] <= low + prominence))
    return out


def topk_overlap(r: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """Per step, the fraction of top-k(r_l) inside the kept set: r [S, N], kept [N] bool -> [S]."""
    idx = r.topk(k, dim=-1).indices
    return kept[idx].float().mean(-1)


def mass_in(r: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per step, the share of relevance on the kept set: [S]."""
    return (r * kept).sum(-1) / r.sum(-1).clamp(min=1e-12)


@dataclass
class RVISReport:
    layer: int
    curve: list[float]
    events: list[int]
    mass_in_prefill_topk: list[float]
    overlap_with_prefill_topk: list[float]

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def report(r_layer: torch.Tensor, layer: int, n_valid: int, retention: float = 0.333) -> RVISReport:
    """RVIS metrics of one sequence at one layer; r_layer [S, Nmax]."""
    r = r_layer[:, :n_valid].float()
    curve = shift_curve(r).tolist()
    k = max(1, math.ceil(retention * n_valid))
    kept = torch.zeros(n_valid, dtype=torch.bool)
    kept[r[0].topk(k).indices] = True
    return RVISReport(layer=layer, curve=curve, events=events(curve), mass_in_prefill_topk=mass_in(r, kept).tolist(),
                      overlap_with_prefill_topk=topk_overlap(r, kept, k).tolist())


def most_focused_layer(r: torch.Tensor) -> int:
    """The layer whose relevance peaks highest on one visual token (mean over steps of the max): where the model
    reads a cell. (Entropy would favour layers that park their attention on a few sink tokens.)"""
    return int(r.float().amax(-1).mean(-1).argmax())


# ---- plots ---------------------------------------------------------------------------------------
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(rep: RVISReport, path: str, shifts: list[int] | None = None, labels: list[str] | None = None):
    plt = _pyplot()
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
    ax.set_title(f"RVIS shift curve, layer {rep.layer}: {_count(rep.events, 'event')}")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


HEATMAP_COLUMNS = 4


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def _cell_ticks(n: int, most: int = 12) -> list[int]:
    step = max(1, math.ceil(n / most))
    return list(range(0, n, step))


def plot_heatmaps(image: np.ndarray, r: torch.Tensor, steps: list[int], path: str,
                  grid: tuple[int, int] | None = None, titles: list[str] | None = None, suptitle: str | None = None):
    """The image, then the relevance over the visual-token grid at each of `steps`, on one colour scale."""
    plt = _pyplot()
    fig = heatmap_figure(image, r, steps, grid, titles, suptitle)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def heatmap_figure(image: np.ndarray, r: torch.Tensor, steps: list[int], grid: tuple[int, int] | None = None,
                   titles: list[str] | None = None, suptitle: str | None = None):
    plt = _pyplot()
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


# ---- CLI -------------------------------------------------------------------------------------------
DEFAULT_SAMPLE_SEED = 7
DSTP_COMPARISON = ("fastv", 0.333)  # the pruner DSTP runs on in `dstp analyze`
ALL_STEPS_UP_TO = 8  # answers this short get a heatmap for every step


def check_analyze_flags(args) -> None:
    """What the flags alone can tell, before a model is loaded."""
    from dstp.errors import InputError

    if args.image is not None and args.prompt is None:
        raise InputError("--image needs --prompt (the question about that image)")
    if args.image is None and args.prompt is not None:
        raise InputError("--prompt needs --image (without --image, analyze uses a ShiftBench walk and its own prompt)")
    if args.image is not None and args.seed is not None:
        raise InputError("--seed picks the ShiftBench sample, so it has no effect with --image")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for s in args.steps or []:
        if not 0 <= s < args.max_new_tokens:
            raise InputError(f"--steps {s} is outside 0..{args.max_new_tokens - 1} (a step per new token, "
                             f"--max-new-tokens {args.max_new_tokens})")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file, not a folder")


def check_against_model(args, pipe) -> None:
    """The flags that depend on the loaded model, before it runs."""
    from dstp.errors import InputError

    layers = pipe.adapter.n_layers
    if args.layer is not None and not 0 <= args.layer < layers:
        raise InputError(f"--layer {args.layer} is outside the model's {layers} layers (0..{layers - 1})")
    if args.image is None and pipe.adapter.family != "shiftbench":
        raise InputError(f"without --image, analyze runs a ShiftBench sample, which a {pipe.adapter.family} model "
                         "cannot read: pass --image FILE --prompt TEXT")
    limit = context_limit(pipe.adapter)
    if limit is not None and args.max_new_tokens >= limit:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context of {limit} tokens")


def context_limit(adapter) -> int | None:
    """The language model's position limit (max_position_embeddings), if its config states one."""
    return getattr(adapter.language_model.config, "max_position_embeddings", None)


def analysis_input(args):
    """(image as an array, prompt): the given ones, or a 4-hop ShiftBench walk."""
    if args.image is None:
        from dstp.lab.shiftbench import generate_samples

        seed = DEFAULT_SAMPLE_SEED if args.seed is None else args.seed
        sample = generate_samples("walk", 1, seed=seed, hops=4)[0]
        return sample.image, sample.prompt
    from dstp.generate_cli import open_image

    return np.asarray(open_image(args.image)), args.prompt


def heatmap_steps(args, rep: RVISReport, n_steps: int) -> list[int]:
    """The steps to draw: --steps, or every step of a short answer, else the prompt, the first three events and the
    last step."""
    import sys

    if args.steps is None:
        return list(range(n_steps)) if n_steps <= ALL_STEPS_UP_TO else sorted({0, *rep.events[:3], n_steps - 1})
    beyond = [s for s in args.steps if s >= n_steps]
    if beyond:
        print(f"dstp analyze: warning: the answer has {n_steps} steps (0..{n_steps - 1}); no heatmap for --steps "
              + ",".join(map(str, beyond)), file=sys.stderr)
    return [s for s in args.steps if s < n_steps]


def dstp_shift_steps(pipe, prepared, max_new_tokens: int) -> tuple[list[int], str]:
    """Where DSTP on FastV at 33.3% declares a shift on the same input (as decoding steps), and its answer."""
    import dstp
    from dstp.config import DSTPConfig, GenerationConfig, PruneConfig

    method, retention = DSTP_COMPARISON
    dpipe = dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig(method, retention),
                            shift=DSTPConfig())
    res = dpipe.generate_prepared(prepared, GenerationConfig(max_new_tokens=max_new_tokens))
    return [s["step"] + 1 for s in res.trace.row(0)["steps"] if s.get("shift")], res.texts[0]


def run_analyze_cli(args) -> int:
    import dstp
    from PIL import Image

    from dstp.config import GenerationConfig
    from dstp.generate_cli import default_model

    check_analyze_flags(args)
    pipe = dstp.load(args.model or default_model())
    check_against_model(args, pipe)
    image, prompt = analysis_input(args)
    prepared = pipe.prepare([Image.fromarray(np.asarray(image))], [prompt])
    out = pipe.engine.generate(prepared, GenerationConfig(max_new_tokens=args.max_new_tokens))
    n = out.trace.new_tokens[0]
    tokens = out.tokens[:, :n]
    rel = relevance(pipe.engine, prepared, tokens)[0]  # [L, S, N]
    nv = int(prepared.n_visual[0])
    tok = pipe.processor.tokenizer
    fed = ["<prompt>"] + [tok.decode([t]) for t in tokens[0, :-1].tolist()]
    reports = [report(rel[i], i, nv) for i in range(rel.shape[0])]
    layer = args.layer if args.layer is not None else most_focused_layer(rel[:, :, :nv])
    rep = reports[layer]
    shifts, dstp_answer = dstp_shift_steps(pipe, prepared, args.max_new_tokens)
    os.makedirs(args.out, exist_ok=True)
    plot_curve(rep, os.path.join(args.out, "shift_curve.png"), shifts=shifts, labels=fed)
    steps = heatmap_steps(args, rep, rel.shape[1])
    plot_heatmaps(np.asarray(image), rel[layer, :, :nv], steps, os.path.join(args.out, "heatmaps.png"),
                  titles=[f"step {s}: fed {fed[s]!r}" + (" (event)" if s in rep.events else "") for s in steps],
                  suptitle=f"relevance at layer {layer} (one colour scale for all steps)")
    result = {"prompt": prompt, "answer": pipe.decode(tokens, [n])[0], "layer": layer,
              "event_rule": {"threshold": EVENT_THRESHOLD, "prominence": EVENT_PROMINENCE},
              "reports": [r.to_dict() for r in reports], "dstp_shift_steps": shifts,
              "dstp_answer": dstp_answer, "fed_tokens": fed}
    with open(os.path.join(args.out, "rvis.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"answer: {result['answer']}")
    print(f"layer {layer}: {_count(rep.events, 'RVIS event')} at steps {rep.events}; DSTP shifted at {shifts}")
    print(f"wrote {args.out}/shift_curve.png, heatmaps.png, rvis.json")
    return 0
