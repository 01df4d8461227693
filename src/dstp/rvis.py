"""RVIS analysis (DESIGN §6): where the model looks while it writes its answer.

Relevance r_l over all N visual tokens at decoding step l is the head-mean attention of the token fed at step l
(step 0: the last prompt token) over the visual tokens, from an unpruned run. The shift curve is cos(r_0, r_l);
an RVIS event is a local minimum of it below `threshold` (0.7).
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
    capture = {i: None for i in layers}
    state_store = engine.new_store(range(0, a.n_layers), ext.inputs_embeds.shape[0], ext.inputs_embeds.shape[1])
    order = torch.arange(ext.inputs_embeds.shape[1], device=ext.inputs_embeds.device).expand_as(ext.attention_mask)
    state_store.claim(0, order, ext.attention_mask)
    cos, sin = a.rotary(ext.inputs_embeds, ext.position_ids)
    engine.run_layers(range(a.n_layers), ext.inputs_embeds, state_store, 0, order, cos, sin, order, ext.extras,
                       capture)
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


def events(curve: np.ndarray, threshold: float = EVENT_THRESHOLD) -> list[int]:
    """Steps where the shift curve has a local minimum below `threshold` (plateaus count once)."""
    c = np.asarray(curve, dtype=float)
    out = []
    for i in range(1, len(c)):
        left = c[i - 1]
        j = i
        while j + 1 < len(c) and c[j + 1] == c[i]:
            j += 1
        right = c[j + 1] if j + 1 < len(c) else math.inf
        if c[i] < threshold and c[i] < left and c[i] < right:
            out.append(i)
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


def plot_curve(rep: RVISReport, path: str, shifts: list[int] | None = None, labels: list[str] | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(rep.curve, marker=".", label="cos(r_0, r_l)")
    ax.axhline(EVENT_THRESHOLD, color="grey", ls="--", lw=0.8, label=f"event threshold {EVENT_THRESHOLD}")
    if rep.events:
        ax.scatter(rep.events, [rep.curve[i] for i in rep.events], color="red", zorder=3, label="RVIS event")
    for s in shifts or []:
        ax.axvline(s, color="orange", alpha=0.4, lw=1)
    if shifts:
        ax.plot([], [], color="orange", alpha=0.4, label="DSTP shift")
    if labels and len(labels) <= 64:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_xlabel("decoding step (token fed)")
    ax.set_ylabel("similarity to prefill relevance")
    ax.set_title(f"RVIS shift curve, layer {rep.layer}: {len(rep.events)} events")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmaps(image: np.ndarray, r: torch.Tensor, steps: list[int], path: str,
                  grid: tuple[int, int] | None = None, titles: list[str] | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = grid_shape(r.shape[-1], grid)
    fig, axes = plt.subplots(1, len(steps), figsize=(3 * len(steps), 3.2), squeeze=False)
    gray = np.asarray(image, dtype=float).mean(-1) if np.asarray(image).ndim == 3 else np.asarray(image, float)
    for ax, s, title in zip(axes[0], steps, titles or [None] * len(steps)):
        ax.imshow(gray, cmap="gray", alpha=0.35)
        heat = r[s].reshape(h, w).float().numpy()
        ax.imshow(heat, cmap="magma", alpha=0.75, extent=(0, gray.shape[1], gray.shape[0], 0),
                  interpolation="nearest")
        ax.set_title(title or f"step {s}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- CLI -------------------------------------------------------------------------------------------
def run_analyze_cli(args) -> int:
    import dstp
    from dstp.config import GenerationConfig
    from dstp.generate_cli import default_model, open_image

    pipe = dstp.load(args.model or default_model())
    if args.image is None:
        from dstp.shiftbench import generate_samples

        sample = generate_samples("walk", 1, seed=args.seed, hops=4)[0]
        image, prompt = sample.image, sample.prompt
    else:
        if args.prompt is None:
            raise dstp.InputError("--prompt is required with --image")
        image, prompt = np.asarray(open_image(args.image)), args.prompt
    from PIL import Image

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
    # what DSTP does on the same input, on top of FastV at 33.3%
    from dstp.config import DSTPConfig, PruneConfig

    dpipe = dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig("fastv", 0.333),
                            shift=DSTPConfig())
    dres = dpipe.generate_prepared(prepared, GenerationConfig(max_new_tokens=args.max_new_tokens))
    shifts = [s["step"] + 1 for s in dres.trace.row(0)["steps"] if s.get("shift")]
    os.makedirs(args.out, exist_ok=True)
    plot_curve(rep, os.path.join(args.out, "shift_curve.png"), shifts=shifts, labels=fed)
    steps = args.steps or sorted({0, *rep.events[:3], len(rep.curve) - 1})
    steps = [s for s in steps if 0 <= s < rel.shape[1]]
    plot_heatmaps(np.asarray(image), rel[layer, :, :nv], steps, os.path.join(args.out, "heatmaps.png"),
                  titles=[f"step {s}: fed {fed[s]!r}" + (" (event)" if s in rep.events else "") for s in steps])
    result = {"prompt": prompt, "answer": pipe.decode(tokens, [n])[0], "layer": layer,
              "reports": [r.to_dict() for r in reports], "dstp_shift_steps": shifts,
              "dstp_answer": dres.texts[0], "fed_tokens": fed}
    with open(os.path.join(args.out, "rvis.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"answer: {result['answer']}")
    print(f"layer {layer}: {len(rep.events)} RVIS events at steps {rep.events}; DSTP shifted at {shifts}")
    print(f"wrote {args.out}/shift_curve.png, heatmaps.png, rvis.json")
    return 0
