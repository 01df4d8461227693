"""VisionPulse (Xu et al., ICML 2026, arXiv 2605.31457; code xxhhbbbb/VisionPulse): step-wise visual token selection.

The authors' rule (their eager path, `visionpulse/modeling_qwen3_vl.py`; settings from `vlmeval/config.py`):
- the prefill is dense: every token, every layer; every visual token's K/V stay in the cache for the whole decode;
- at each decoding step, at the anchor layer A (17 in every setting of theirs), the new token's scaled attention
  logits over every key (text, visual, generated, itself) give per head the visual mass with temperature tau,
  exp(logsumexp_visual(logits / tau) - logsumexp_all(logits / tau)); the step's budget is its max over heads,
  clamped to [budget_min, budget_max] (or `fixed_budget`); k = floor(budget * N) per row, at least 1, at most N;
- the k visual tokens with the highest head-mean logit (before softmax) are the ones read, at layer A and every
  later layer of this step (one selection shared by layers A..L-1); layers < A read every token. The next step
  selects afresh: nothing is evicted.

In the engine VisionPulse is a decode-time policy (dstp.policy) whose prefill schedule is one stage at A that keeps
every token: layers [0, A) in the `full` store, layers [A, L) in the stage's store, whose visual slots it switches
on (selected) or off each step; the step stays tensor-only and compiles to one graph.

Memory and reads: it holds every visual token's K/V at every layer (the unpruned model's KV, reported as `kv`) plus
its small per-row state (`visionpulse`); a step reads every slot at layers < A and, at layers >= A, gathers the K/V
of the text, the k selected visual tokens and the generated tokens (KVStore.read_prompt: the text slots and the
k_max best visual slots, k_max the budget's upper bound so that the shapes stay fixed, those past k masked), plus,
to select, the anchor keys of every slot once.

Departures (docs/visionpulse.md):
- dstp keeps original positions everywhere (theirs do too: nothing is re-indexed), so there is none there.
- A gathered step instead of their Triton block-sparse kernel: their Triton path (`visionpulse_triton`) selects
  whole blocks (k = ceil(budget * N / block) blocks, mixed text/visual blocks always kept); dstp implements their
  eager token-level rule and gathers the selected tokens' K/V (their eager path masks a dense read).
- The anchor query and key are projected once more from the layer's input to select before the layer runs (their
  anchor layer reuses its own); the extra FLOPs are counted.
- Their rule has no prefill pruner: combining VisionPulse with one is refused (dstp.policy.make_policy).
- Anchor layer default: their 17 of 36 layers scaled to the model's depth (17 on their models), as dstp's pruner
  defaults are; they fix 17.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dstp.config import VisionPulseConfig
from dstp.engine.held_bytes import HeldBytes
from dstp.engine.prune_context import PruneResult, first_true
from dstp.engine.step_compiler import mark_static
from dstp.engine.trace import StepTrace
from dstp.errors import ConfigError


AUTHORS_ANCHOR, AUTHORS_LAYERS = 17, 36  # every setting of theirs: layer 17 of Qwen3-VL-4B/8B's (InternVL3.5's) 36


def check_anchor(config: VisionPulseConfig, n_layers: int) -> int:
    """The anchor layer: the config's, or the authors' 17 of 36 at the same fraction of depth (17 on their
    models, 8 on ShiftBench's 16 layers)."""
    a = config.anchor_layer
    if a is None:
        return max(1, min(n_layers - 1, round(AUTHORS_ANCHOR * n_layers / AUTHORS_LAYERS)))
    if not 1 <= a < n_layers:
        raise ConfigError(f"VisionPulse anchor_layer {a} is outside this model's {n_layers} layers "
                          f"(valid: 1..{n_layers - 1}); set VisionPulseConfig(anchor_layer=...)")
    return a


class KeepEverything:
    """VisionPulse's prefill schedule: one stage from the anchor layer on that keeps every visual token."""
    name = "visionpulse_anchor"
    needs = ()

    def __init__(self, layer: int):
        self.layer = layer

    def select(self, ctx) -> PruneResult:
        return PruneResult(kept=ctx.kept_before.clone())


def visual_mass(logits: torch.Tensor, allowed: torch.Tensor, visual: torch.Tensor, tau: float) -> torch.Tensor:
    """[B] the largest, over heads, share of tau-sharpened attention on visual keys: logits [B, H, S] over keys
    `allowed` [B, S], of which `visual` [B, S] are visual."""
    z = logits.float() / tau
    total = torch.logsumexp(z.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    vis = torch.logsumexp(z.masked_fill(~(visual & allowed)[:, None], float("-inf")), dim=-1)
    return torch.exp(vis - total).amax(dim=1)


def step_budget(mass: torch.Tensor, n_visual: torch.Tensor, config: VisionPulseConfig) -> torch.Tensor:
    """[B] visual tokens to read this step: floor(budget * N), at least 1, at most N."""
    if config.fixed_budget is not None:
        ratio = torch.full_like(mass, float(config.fixed_budget))
    else:
        ratio = mass.clamp(min=config.budget_min, max=config.budget_max)
    return torch.minimum((ratio * n_visual).long().clamp(min=1), n_visual)


@dataclass
class VisionPulseState:
    adapter: object
    anchor: int
    base_valid: torch.Tensor  # [B, Tk] the anchor stage's prompt slots at prefill
    slot_visual: torch.Tensor  # [B, Tk] the slot holds a visual token
    slot_rank: torch.Tensor  # [B, Tk] its visual rank (-1: text or padding)
    n_visual: torch.Tensor  # [B]
    # what a step reads at layers >= anchor (KVStore.read_prompt): the text slots, then the k_max best visual slots,
    # of which the first k count
    text_index: torch.Tensor  # [B, n_text] the prompt's text slots (padded with slots that do not count)
    text_ok: torch.Tensor  # [B, n_text]
    k_max: int  # the most visual tokens one step may select (the budget's upper bound)
    read_index: torch.Tensor  # [B, n_text + k_max]
    read_mask: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.base_valid, self.slot_visual, self.slot_rank, self.n_visual, self.text_index, self.text_ok,
                self.read_index, self.read_mask]

    def held_bytes(self, held: HeldBytes):
        held.add("visionpulse", self.tensors())


class VisionPulsePolicy:
    reserve_kind = "reserve"  # never used: VisionPulse's stage has no reserve
    fills_reserve = False
    reads_stage_input = True  # its step projects the anchor's query and key from the anchor layer's input

    def __init__(self, config: VisionPulseConfig):
        self.config = config

    def prefill_pruner(self, pruner, n_layers: int):
        if pruner is not None:
            raise ConfigError(f"VisionPulse's rule has no prefill pruner; drop the pruner ({pruner.name})")
        return KeepEverything(check_anchor(self.config, n_layers))

    def probe_layer(self, P: int, L: int):
        return None  # it reads the anchor layer's own query, from the stage's input

    def reserve_slots(self, dropped: int) -> int:
        return 0

    def setup(self, adapter, state, outputs) -> VisionPulseState:
        stage = state.stages[0]
        s, Tk, T = stage.store, stage.Tk, state.T
        s.allow_holes()
        tags = s.prompt_tags(Tk)
        inside = (tags >= 0) & (tags < T)
        B, N = state.visual_pos.shape
        rank_of_pos = torch.full((B, T), -1, dtype=torch.long, device=tags.device)
        rank_of_pos.scatter_(1, state.visual_pos,
                             torch.arange(N, device=tags.device).expand(B, N).masked_fill(~state.visual_valid, -1))
        base = s.prompt_valid(Tk).clone()
        rank = torch.where(inside & base, rank_of_pos.gather(1, tags.clamp(0, T - 1)), -1)
        visual, n_visual = rank >= 0, state.visual_valid.sum(-1)
        text = base & ~visual
        text_index, text_ok = first_true(text, int(text.sum(-1).max()))
        upper = self.config.fixed_budget if self.config.fixed_budget is not None else self.config.budget_max
        k_max = int(step_budget(torch.full(n_visual.shape, float(upper), device=tags.device), n_visual,
                                VisionPulseConfig(fixed_budget=upper)).max())
        read_index = torch.cat([text_index, text_index[:, :1].expand(B, k_max)], 1).contiguous()
        read_mask = torch.cat([text_ok, torch.zeros(B, k_max, dtype=torch.bool, device=tags.device)], 1)
        st = VisionPulseState(adapter=adapter, anchor=stage.layers.start, base_valid=base, slot_visual=visual,
                              slot_rank=rank, n_visual=n_visual, text_index=text_index, text_ok=text_ok, k_max=k_max,
                              read_index=read_index, read_mask=read_mask)
        s.read_prompt(st.read_index, st.read_mask)
        mark_static(st.tensors())
        return st

    def noise(self, st):
        return None

    def scores(self, st: VisionPulseState, state, hidden, cos, sin):
        """The new token's scaled logits [B, H, C + 1] at the anchor layer over every slot of the stage's store and
        itself (last), which of those keys exist, and which are visual ([B, C + 1] each)."""
        a, s, A = st.adapter, state.stages[0].store, st.anchor
        q = a.query(A, hidden, cos, sin)  # [B, H, 1, hd]
        keys = torch.cat([s.layer_keys(A, s.capacity), a.key(A, hidden, cos, sin)], 2)  # [B, Hkv, C + 1, hd]
        B, H, _, hd = q.shape
        Hkv = keys.shape[1]
        logits = (q.reshape(B, Hkv, H // Hkv, hd) @ keys.transpose(-1, -2)).reshape(B, H, -1) * a.attention_scale(A)
        Tk = st.base_valid.shape[1]
        own = torch.ones_like(st.n_visual, dtype=torch.bool)[:, None]
        allowed = torch.cat([st.base_valid, s.valid[:, Tk:], own], 1)
        visual = torch.cat([st.slot_visual, torch.zeros_like(s.valid[:, Tk:]), ~own], 1)
        return logits, allowed, visual

    def step(self, st: VisionPulseState, state, q_probe, noise, hidden, cos, sin):
        cfg, s = self.config, state.stages[0].store
        Tk = st.base_valid.shape[1]
        logits, allowed, visual = self.scores(st, state, hidden, cos, sin)
        k = step_budget(visual_mass(logits, allowed, visual, cfg.visual_mass_tau), st.n_visual, cfg)
        scores = logits[..., :Tk].mean(1).float().masked_fill(~st.slot_visual, float("-inf"))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # ties: the lower slot first
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(Tk, device=k.device).expand_as(order))
        selected = (rank < k[:, None]) & st.slot_visual
        s.set_prompt_valid(st.base_valid & (~st.slot_visual | selected))
        best = order[:, :st.k_max]
        st.read_index[:, st.text_index.shape[1]:].copy_(best)
        st.read_mask[:, st.text_index.shape[1]:].copy_(selected.gather(1, best))
        B, N = state.visual_valid.shape
        mask = torch.zeros(B, N + 1, dtype=torch.bool, device=k.device)
        mask = mask.scatter(1, torch.where(selected, st.slot_rank, N), True)[:, :N]
        a = st.adapter
        H, hd, D = a.n_heads, a.head_dim, hidden.shape[-1]
        extra = B * 2.0 * D * hd * (H + a.n_kv_heads) + 2.0 * H * hd * allowed.sum()
        return StepTrace(visual_attended=k, active=k, selected_mask=mask), extra

    def finish(self, trace, st, steps: int):
        return None


__all__ = ["VisionPulsePolicy", "VisionPulseState", "KeepEverything", "visual_mass", "step_budget", "check_anchor"]
