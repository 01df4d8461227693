"""The generation engine: prefill with an optional pruning schedule, then one-token decode steps.

Layers [0, P) keep every prompt token in the `full` store. A pruner's schedule P = P_0 < P_1 < ... gives one
stage per prune point: stage s runs layers [P_s, P_s+1) (the last one up to L) on text + its kept visual tokens
only, in a store of its own compacted to them, laid out as  [reserve | kept prompt | generated tokens]: the reserve
holds the visual tokens the stage dropped that a decode-time policy (DSTP) may revive, read only while revived.
Each stage keeps a subset of the one before; a single-stage pruner has one pruned stage. Without pruning P = L
and there is no pruned stage. Every token keeps its original position id.

A decoding step takes tensors only (the step counter lives on the device) and every shape in it depends on the
stores' capacities alone, so it runs the same way eagerly and under `torch.compile(fullgraph=True)`, and nothing in
it reads a value back to the host. The loop checks for the end of every row once every `stop_check_every` steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from dstp.config import EngineConfig, GenerationConfig
from dstp.engine.attention import CAUSAL, UNMASKED, Attention
from dstp.engine.held_bytes import HeldBytes
from dstp.engine.kv_store import GROW_CHUNK, NEVER, KVStore, allowed_keys
from dstp.engine.layers import run_layers
from dstp.engine.prune_context import PruneContext, PruneResult, first_true, visual_layout
from dstp.engine.sampling import next_token
from dstp.engine.step_compiler import compile_step, mark_static
from dstp.engine.trace import StepTrace, Trace
from dstp.errors import ConfigError
from dstp.models.base import Adapter, PreparedInputs


@dataclass
class Stage:
    """One pruned stage: layers [P_s, P_s+1), their KV store compacted to text + `kept`."""
    layers: range
    store: KVStore
    kept: torch.Tensor  # [B, Nmax] bool: visual tokens in its prompt slots
    index: torch.Tensor  # [B, Tk] original index of each prompt slot (padding slots point anywhere)
    Tk: int  # prompt slots (from the store's front on), followed by generated tokens


@dataclass
class State:
    prepared: PreparedInputs
    P: int  # first prune point (L: no pruning)
    T: int  # padded prompt length
    cos: torch.Tensor  # [B, T, hd] rotary tables of the prompt, at original positions
    sin: torch.Tensor
    full: KVStore | None  # layers [0, P)
    step: torch.Tensor  # [1] long, on the device: decoding steps run so far
    stages: list[Stage] = field(default_factory=list)  # layers [P, L), one per prune point
    visual_pos: torch.Tensor | None = None  # [B, Nmax] original index of each visual token
    visual_valid: torch.Tensor | None = None  # [B, Nmax]
    kept: torch.Tensor | None = None  # [B, Nmax] bool: the final stage's set S0
    dropped_at: torch.Tensor | None = None  # [B, Nmax] first stage without the token (len(stages): never dropped)

    @property
    def batch(self) -> int:
        return self.cos.shape[0]

    @property
    def pruned(self) -> KVStore | None:
        """The last stage's store (the one holding S0); None without pruning."""
        return self.stages[-1].store if self.stages else None

    @property
    def Tk(self) -> int:
        return self.stages[-1].Tk if self.stages else 0

    @property
    def stores(self) -> list[KVStore]:
        return ([self.full] if self.full is not None else []) + [stage.store for stage in self.stages]


@dataclass
class PrefillOutputs:
    """What a decode-time policy may read of the prefill, handed to its `setup` and let go after."""
    probe_input: torch.Tensor | None  # [B, 1, D] the probe layer's input of the last prompt token (P = 0: [B, T, D])
    hidden_at_prune: torch.Tensor | None  # [B, T, D] each token's input to the first stage without it


NO_EXTRAS = MappingProxyType({})  # generated tokens take no per-token extras (DeepStack)


def prune_points(pruner) -> tuple[int, ...]:
    """The pruner's schedule of prune points: `stage_layers` for a multi-stage pruner, else (layer,)."""
    points = tuple(getattr(pruner, "stage_layers", None) or (pruner.layer,))
    if any(b <= a for a, b in zip(points, points[1:])):
        raise ConfigError(f"pruning stages must come at increasing layers, got {list(points)}")
    return points


def prefill_attention(store: KVStore, start: int, query_order: torch.Tensor, window: int | None = None,
                      blocks: torch.Tensor | None = None) -> tuple[Attention, int]:
    """How a prefill's queries attend to store slots [0, start + Q), and how many query-key pairs that is (at full
    layers). `window`: the model's sliding window (the variant its sliding layers use is built too, seeing
    `blocks` both ways: `allowed_keys`)."""
    end = start + query_order.shape[1]
    if store.plain_causal(start, query_order):
        n = query_order.shape[1]
        attention, pairs = CAUSAL, query_order.shape[0] * n * (n + 1) // 2  # SDPA's fused causal kernel
        # the queries are every slot, in increasing order: the window binds only if a row spans more than it
        if window is not None and blocks is None and int((query_order[:, -1] - query_order[:, 0]).max()) < window:
            return attention.with_sliding(CAUSAL), pairs
    else:
        mask = store.mask_upto(end, query_order)
        attention, pairs = Attention(mask=mask), int(mask.sum())
    if window is None:
        return attention, pairs
    return attention.with_sliding(Attention(mask=store.mask_upto(end, query_order, window, blocks))), pairs


class Engine:
    def __init__(self, adapter: Adapter, config: EngineConfig | None = None):
        self.adapter = adapter
        self.config = config or EngineConfig()
        cfg = adapter.text_config
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.linear_params = adapter.linear_params_per_layer()
        self.window = adapter.window  # the sliding window of the model's sliding layers, None without any
        step = self.step
        self._step = compile_step(step, self.config, adapter.device) if self.config.compile else step
        self.compiled = self._step is not step  # False: eager (asked for, or the fallback)

    # ---------------------------------------------------------------------------------------------
    def new_store(self, layers: range, batch: int, prompt_slots: int, max_new_tokens: int, reserve: int = 0):
        """A store for prompt slots + generated tokens (after `reserve` reserve slots): room for a first chunk of
        generated tokens now, grown by chunks as they come."""
        a = self.adapter
        first = min(max_new_tokens, GROW_CHUNK)
        return KVStore(layers, batch, [a.kv_heads(i) for i in layers], [a.kv_head_dim(i) for i in layers],
                       prompt_slots + first, a.dtype, a.device, prompt_slots + max_new_tokens, reserve,
                       frozenset(a.linear_layers))

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(h_last)[:, -1].float()

    def attention_rows(self, layer: int, layer_input: torch.Tensor, query_pos: torch.Tensor, store: KVStore,
                       cos, sin) -> torch.Tensor:
        """Softmax attention [B, H, Q, S] of prompt tokens at `query_pos` [B, Q] (their front slots) at `layer`
        of `store` over its S filled slots, from q_proj of the layer's input and the cached (rotated) keys."""
        a = self.adapter
        D, hd = layer_input.shape[-1], cos.shape[-1]
        hq = layer_input.gather(1, query_pos[..., None].expand(-1, -1, D))
        cq = cos.gather(1, query_pos[..., None].expand(-1, -1, hd))
        sq = sin.gather(1, query_pos[..., None].expand(-1, -1, hd))
        q = a.query(layer, hq, cq, sq)  # [B, H, Q, hd]
        keys = store.layer_keys(layer, store.filled)
        keys = keys.repeat_interleave(a.n_heads // keys.shape[1], dim=1)
        scores = (q.float() @ keys.float().transpose(-1, -2)) * a.attention_scale(layer)
        order = store.prompt_tags(store.filled - store.front).gather(1, query_pos)
        allowed = store.mask_upto(store.filled, order, a.sliding_window(layer))  # [B, 1, Q, filled]
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)

    def run_prompt(self, prepared: PreparedInputs, capture) -> tuple[KVStore, torch.Tensor, torch.Tensor, dict]:
        """Every layer on the whole prompt, unpruned, into one store (no room for new tokens): (the store, the rotary
        tables, {layer: its input} for each layer in `capture`). For analysis (RVIS)."""
        h = prepared.inputs_embeds
        B, T, _ = h.shape
        order = torch.arange(T, device=h.device).expand(B, T)
        store = self.new_store(range(0, self.adapter.n_layers), B, T, 0)
        store.claim(0, order, prepared.attention_mask)
        cos, sin = self.adapter.rotary(h, prepared.position_ids)
        attention, _ = prefill_attention(store, 0, order, self.window, prepared.attention_blocks)
        captured = {}
        for i in range(self.adapter.n_layers):
            if i in capture:
                captured[i] = h
            h, _ = run_layers(self.adapter, range(i, i + 1), h, attention, cos, sin, store.prefill_view(0), order,
                              prepared.extras)
        return store, cos, sin, captured

    # -- prefill ----------------------------------------------------------------------------------
    def prefill(self, prepared: PreparedInputs, max_new_tokens: int, pruner=None, shift=None,
                relevant: torch.Tensor | None = None):
        """Returns (state, logits [B, V] of the last prompt token, FLOPs, PrefillOutputs for the decode-time policy
        `shift`)."""
        policy = shift
        a, L = self.adapter, self.adapter.n_layers
        if policy is not None:
            pruner = policy.prefill_pruner(pruner, L)  # the schedule the policy runs on (VisionPulse: its own)
        h = prepared.inputs_embeds
        T = h.shape[1]
        points = prune_points(pruner) if pruner is not None and bool(prepared.visual_mask.any()) else ()
        for p in points:
            if not 0 <= p <= L:
                raise ConfigError(f"prune layer {p} is outside the model: it has {L} layers (valid: 0..{L})")
        P = points[0] if points else L
        cos, sin = a.rotary(h, prepared.position_ids)
        state = State(prepared=prepared, P=P, T=T, cos=cos, sin=sin, full=None,
                      step=torch.zeros(1, dtype=torch.long, device=h.device))
        probe = policy.probe_layer(P, L) if policy is not None else None
        h, flops, captured = self._prefix(state, h, max_new_tokens, probe)
        if P == L:
            return state, self._logits(h[:, -1:]), flops, PrefillOutputs(None, None)
        logits, f, outputs = self._stages(state, h, points, captured, pruner, policy, relevant, max_new_tokens)
        return state, logits, flops + f, outputs

    def start(self, prepared: PreparedInputs, max_new_tokens: int, pruner=None, shift=None, relevant=None):
        """The prefill and the decode-time policy's setup: (state, the policy's state or None, logits, FLOPs)."""
        state, logits, flops, outputs = self.prefill(prepared, max_new_tokens, pruner, shift, relevant)
        pstate = shift.setup(self.adapter, state, outputs) if shift is not None and state.stages else None
        for store in state.stores:
            mark_static(store.buffers() + store.recurrent.buffers())
        return state, pstate, logits, flops

    def _prefix(self, state: State, h, max_new_tokens: int, probe: int | None):
        """Layers [0, P) on every prompt token, into the `full` store. Returns (h at P, FLOPs, the inputs of layers
        P-1 and `probe` as {layer: h})."""
        P, prepared = state.P, state.prepared
        B, T, _ = h.shape
        if P == 0:
            return h, 0.0, {}
        order = torch.arange(T, device=h.device).expand(B, T)
        state.full = self.new_store(range(0, P), B, T, max_new_tokens)
        state.full.claim(0, order, prepared.attention_mask)
        attention, pairs = prefill_attention(state.full, 0, order, self.window, prepared.attention_blocks)
        captured, view = {}, state.full.prefill_view(0)
        for i in range(P):
            if i in (P - 1, probe):
                captured[i] = h
            h, _ = run_layers(self.adapter, range(i, i + 1), h, attention, state.cos, state.sin, view, order,
                              prepared.extras)
        return h, self.flops(P, int(prepared.attention_mask.sum()), pairs), captured

    def _stages(self, state: State, h, points, captured: dict, pruner, policy, relevant, max_new_tokens: int):
        """The prune points, one stage each: each keeps a subset of the visual tokens the stage before kept, in a
        store compacted to them. `store` source: the last stage's K/V come from the unpruned run of layers >= P
        (`_unpruned_from_P`), each stage's reserve holding every visual token it dropped."""
        prepared, L, P = state.prepared, self.adapter.n_layers, state.P
        B, T, D = h.shape
        gen = torch.Generator(device="cpu").manual_seed(getattr(pruner, "seed", 0))
        vpos, vvalid, _ = visual_layout(prepared.visual_mask)
        state.visual_pos, state.visual_valid = vpos, vvalid
        text = prepared.attention_mask & ~prepared.visual_mask
        fills_reserve = policy is not None and policy.fills_reserve
        kept = vvalid
        state.dropped_at = torch.full(vpos.shape, len(points), dtype=torch.long, device=h.device)
        # what the stage before the prune point holds: its store, slot layout, layer inputs (P-1 and P), rotary
        before = dict(store=state.full, slot_order=None, slot_valid=None, probe_hidden=captured.get(P - 1),
                      stage_hidden=h, cos=state.cos, sin=state.sin)
        h_at = h  # [B, T, D] every token's hidden state at the last prune point it reached
        flops, logits = 0.0, None
        for s, Ps in enumerate(points):
            last = s == len(points) - 1
            stop = L if last else points[s + 1]
            ctx = PruneContext(self, prepared, Ps, h_at, gen=gen, relevant=relevant, stage=s, kept_before=kept,
                               **before)
            result: PruneResult = pruner.select(ctx)
            new = result.kept & vvalid
            if bool((new & ~kept).any()):
                raise ConfigError(f"pruning stage {s} (layer {Ps}) keeps visual tokens an earlier stage dropped: "
                                  f"each stage must keep a subset of the one before")
            if result.hidden is not None:
                merged = torch.where(new[..., None], result.hidden, ctx.visual_hidden())
                h_at = h_at.scatter(1, vpos[..., None].expand(-1, -1, D), merged)
            if s == 0:
                first_h_at = h_at  # P = 0: the probe layer's keys come from the first stage's embeddings
            state.dropped_at = torch.where(kept & ~new, s, state.dropped_at)
            kept = new
            keep_tok = text.scatter(1, vpos, kept | text.gather(1, vpos))
            Tk = int(keep_tok.sum(-1).max())
            # right-aligned compaction: each row's kept tokens in order, padding first
            idx = torch.argsort(keep_tok.to(torch.int8), dim=-1, stable=True)[:, T - Tk:]
            kvalid = keep_tok.gather(1, idx)
            pad_tag = -1 - torch.arange(Tk, device=h.device).expand(B, Tk)  # unique: a pad slot sees itself
            korder = torch.where(kvalid, idx, pad_tag)
            dropped = int((vvalid & ~kept).sum(-1).max())
            reserve = policy.reserve_slots(dropped) if policy is not None else 0
            store = self.new_store(range(Ps, stop), B, Tk, max_new_tokens, reserve)
            store.claim(reserve, korder, kvalid)
            state.stages.append(Stage(range(Ps, stop), store, kept, idx, Tk))
            if last:
                state.kept = kept
                if fills_reserve:
                    break  # this stage's K/V come from the unpruned prefill below
            hk = h_at.gather(1, idx[..., None].expand(-1, -1, D))
            ck = state.cos.gather(1, idx[..., None].expand(-1, -1, state.cos.shape[-1]))
            sk = state.sin.gather(1, idx[..., None].expand(-1, -1, state.cos.shape[-1]))
            blocks = prepared.attention_blocks
            attention, pairs = prefill_attention(store, 0, korder, self.window, blocks) if reserve == 0 else \
                (self._masked(store.mask_upto(reserve + Tk, korder), None if self.window is None else
                              store.mask_upto(reserve + Tk, korder, self.window, blocks)), None)
            hk, cap = run_layers(self.adapter, range(Ps, stop), hk, attention, ck, sk,
                                 store.prefill_view(reserve), torch.where(kvalid, idx, -1), prepared.extras,
                                 capture=None if last else stop - 1)
            pairs = pairs if pairs is not None else int(attention.mask.sum())
            flops += self.flops(stop - Ps, int(kvalid.sum()), pairs)
            if last:
                logits = self._logits(hk[:, -1:])
            else:
                back = torch.where(kvalid[..., None], hk, h_at.gather(1, idx[..., None].expand(-1, -1, D)))
                h_at = h_at.scatter(1, idx[..., None].expand(-1, -1, D), back)
                before = dict(store=store, slot_order=korder, slot_valid=kvalid, probe_hidden=cap,
                              stage_hidden=hk, cos=ck, sin=sk)
        if policy is None:
            return logits, flops, PrefillOutputs(None, None)
        probe = policy.probe_layer(P, L)
        probe_input = first_h_at if P == 0 else captured[probe][:, -1:].clone() if probe is not None else None
        ctx = before = captured = None  # let the stages' inputs go before the unpruned run
        if fills_reserve:
            held = [first_h_at]  # the input at P, every merge of the first stage applied
            h = h_at = first_h_at = None
            logits, f = self._unpruned_from_P(state, held)
            flops += f
        return logits, flops, PrefillOutputs(probe_input, h_at)

    def _unpruned_from_P(self, state: State, held: list):
        """`store` source: layers >= P on every prompt token, in the prompt's order, as the unpruned model's
        prefill runs them (the causal kernel without padding); each layer's K/V are scattered into its stage's
        store: the kept tokens' into its prompt slots, every visual token the stage dropped into its reserve (left
        unread until revived). held: [the input at P, [B, T, D]], taken out. Returns the logits and the FLOPs."""
        a, prepared = self.adapter, state.prepared
        h = held.pop()
        B, T, _ = h.shape
        valid = prepared.attention_mask
        attention, pairs = CAUSAL, B * T * (T + 1) // 2
        order = torch.arange(T, device=h.device).expand(B, T)
        if not bool(valid.all()):
            attention = Attention(mask=allowed_keys(order, valid, order))
            pairs = int((attention.mask[:, 0] & valid[:, :, None]).sum())
        if self.window is not None:
            blocks = prepared.attention_blocks
            sliding = CAUSAL if attention.causal and T <= self.window and blocks is None else \
                Attention(mask=allowed_keys(order, valid, order, self.window, blocks))
            attention = attention.with_sliding(sliding)
        for stage in state.stages:
            slots = self._store_slots(state, stage)
            h, _ = run_layers(a, stage.layers, h, attention, state.cos, state.sin,
                              stage.store.scatter_view(slots, prefill_valid=valid), order, prepared.extras)
        flops = self.flops(a.n_layers - state.P, int(valid.sum()), pairs)
        return self._logits(h[:, -1:]), flops

    @staticmethod
    def _store_slots(state: State, stage: Stage) -> torch.Tensor:
        """`store` source: tag the stage's reserve with the visual tokens it dropped (in rank order), and return the
        slot [B, T] of every prompt position in its store (padding positions: distinct padding slots, never read)."""
        s, H = stage.store, stage.store.reserve
        B, T = state.prepared.attention_mask.shape
        rank, in_reserve = first_true(state.visual_valid & ~stage.kept, H)
        s.tag_reserve(torch.where(in_reserve, state.visual_pos.gather(1, rank), NEVER))
        tags = torch.cat([s.reserve_tags(), s.prompt_tags(stage.Tk)], 1)
        held = torch.cat([in_reserve, s.prompt_valid(stage.Tk)], 1)
        n = H + stage.Tk  # >= T: every real prompt token has a slot, and the longest row has no padding
        slots = torch.full((B, T + 1), -1, dtype=torch.long, device=tags.device)
        slots = slots.scatter(1, torch.where(held, tags, T), torch.arange(n, device=tags.device).expand(B, n))[:, :T]
        pad_pos = torch.argsort((slots >= 0).to(torch.int8), dim=-1, stable=True)  # padding positions first
        pad_slot = torch.argsort(held.to(torch.int8), dim=-1, stable=True)[:, :T]  # padding slots first
        first = torch.arange(T, device=tags.device)[None] < (slots < 0).sum(-1, keepdim=True)
        return slots.scatter(1, pad_pos, torch.where(first, pad_slot, slots.gather(1, pad_pos)))

    # -- decoding ---------------------------------------------------------------------------------
    def decode_step(self, state: State, tokens: torch.Tensor, policy=None, pstate=None, noise=None,
                    t_host: int | None = None):
        """One new token per row through every layer; returns logits [B, V], FLOPs (a tensor), StepTrace. Tensor
        work only: runs eagerly or compiled, and never waits on the device. `t_host`: the step's index when the
        caller runs it eagerly (attention then reads the filled slots only; None, compiled: every slot, masked)."""
        a = self.adapter
        L, P, B = a.n_layers, state.P, state.batch
        h = a.embed_tokens(tokens[:, None])
        t = state.step
        cos, sin = a.rotary(h, a.decode_position_ids(state.prepared.next_position + t))
        order = (state.T + t).expand(B, 1)
        flops, q_probe = 0.0, None
        probe = policy.probe_layer(P, L) if policy is not None else None
        if probe == 0 and P == 0:
            q_probe = a.query(0, h, cos, sin)
        if P > 0:
            h, captured = self._decode_layers(state.full, range(0, P), h, t, t_host, order, cos, sin, probe,
                                              state.T, in_order=True)
            flops = flops + self.flops(P, B, state.full.valid.sum())
            if probe is not None:
                q_probe = a.query(probe, captured, cos, sin)
        if state.stages:
            # the attended visual set changes only through the policy, which reports it; otherwise it is S0
            if policy is not None:
                stage_input = (h, cos, sin) if policy.reads_stage_input else ()
                step_trace, extra = policy.step(pstate, state, q_probe, noise, *stage_input)
                flops = flops + extra
            else:
                step_trace = StepTrace(visual_attended=state.kept.sum(-1))
            for stage in state.stages:
                h, _ = self._decode_layers(stage.store, stage.layers, h, t, t_host, order, cos, sin, None, state.T)
                flops = flops + self.flops(len(stage.layers), B, stage.store.valid.sum())
        else:
            step_trace = StepTrace(visual_attended=state.prepared.n_visual)
        state.step.add_(1)
        return self._logits(h), flops, step_trace

    def _decode_layers(self, store: KVStore, layers: range, h, t, t_host, order, cos, sin, capture=None,
                       T: int = 0, in_order: bool = False):
        """`order` [B, 1]: the new token's original index (T + t; T the padded prompt length). `in_order`: slot s
        holds the token of original index s (the store of layers < P)."""
        end = None if t_host is None else store.filled + t_host + 1
        view = store.append(store.filled + t, order, end)
        attention = UNMASKED if store.reads_all(end) else Attention(mask=store.decode_mask(end))
        if self.window is not None:
            # eagerly the host knows whether the window reaches past index 0 yet; compiled, it is always masked
            binds = t_host is None or T + t_host >= self.window
            if not binds:
                sliding = attention
            elif in_order and end is not None:  # the window is the last `window` slots: read only those, as
                first = end - self.window  # transformers' sliding cache holds only them
                sliding = Attention(mask=None if store.dense else store.valid[:, None, None, first:end],
                                    first_key=first)
            else:
                sliding = Attention(mask=store.decode_mask(end, order, self.window))
            attention = attention.with_sliding(sliding)
        return run_layers(self.adapter, layers, h, attention, cos, sin, view, None, NO_EXTRAS, capture)

    @staticmethod
    def _masked(mask: torch.Tensor, sliding_mask: torch.Tensor | None) -> Attention:
        """Attention by `mask`, with the sliding variant by `sliding_mask` when the model has a window."""
        attention = Attention(mask=mask)
        return attention if sliding_mask is None else attention.with_sliding(Attention(mask=sliding_mask))

    def step(self, state: State, logits, finished, lengths, seen, stop_ids, config: GenerationConfig, uniform,
             policy=None, pstate=None, noise=None, t_host: int | None = None):
        """The decoding step the loop runs (eagerly or compiled): the next token from `logits` (sampling
        included), the rows' stop bookkeeping, then that token through the model. All tensors, no host read."""
        tok = next_token(logits, config, seen, uniform)
        tok = torch.where(finished, torch.full_like(tok, self.adapter.pad_token_id), tok)
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        lengths.add_((~finished).long())
        finished.logical_or_(torch.isin(tok, stop_ids))
        logits, flops, step_trace = self.decode_step(state, tok, policy, pstate, noise, t_host)
        return tok, logits, flops, step_trace

    # ---------------------------------------------------------------------------------------------
    def flops(self, n_layers: int, n_tokens, attn_pairs) -> float:
        """Analytic FLOPs: 2 * weights per token per layer, plus QK^T and PV (4 * H * hd per
        query-key pair per layer). `attn_pairs` counts allowed (query, key) pairs for one layer."""
        a = self.adapter
        return n_layers * (2.0 * self.linear_params * n_tokens + 4.0 * a.n_heads * a.head_dim * attn_pairs)

    def lm_head_flops(self, n_tokens: int) -> float:
        return 2.0 * self.hidden_size * self.vocab_size * n_tokens

    @staticmethod
    def held_bytes(state: State, pstate=None) -> dict[str, int]:
        """Every buffer the generation state holds, as allocated (a KV store's capacity, not its used slots; one
        storage once however many views of it are held), by what it is for: `kv` (the stores of layers < P and
        of every pruned stage, their reserves left out), the reserves (what `pstate.reserve_kind` says: DSTP's
        `reserve` for the store source, `dstp_cache` for recompute), what the decode-time policy's state `pstate`
        holds (it reports its own kinds),
        `inputs` (the prepared inputs), `other` (rotary tables, kept sets, slot layouts)."""
        held = HeldBytes()
        held.add("inputs", state.prepared)
        for store in state.stores:
            front, reserve = store.reserve_nbytes()
            if held.claim(store.buffers()):
                held.count("kv", front)
                if store.reserve:
                    held.count(getattr(pstate, "reserve_kind", "reserve"), reserve)
            held.add("kv", store.recurrent.buffers())  # linear-attention layers' state (hybrid LLMs)
        if pstate is not None:
            pstate.held_bytes(held)
        held.add("other", state)
        return held.out

    def check_context(self, prepared: PreparedInputs, max_new_tokens: int):
        """The last generated token must still have a position the model was built for."""
        context = getattr(self.adapter.text_config, "max_position_embeddings", None)
        if context is None:
            return
        start = int(prepared.next_position.max())
        if start + max_new_tokens > context:
            raise ConfigError(f"max_new_tokens={max_new_tokens} does not fit: the prompt ends at position {start} "
                              f"and the model has {context} positions (max_position_embeddings), so at most "
                              f"{max(context - start, 0)} new tokens")

    @staticmethod
    def seen_tokens(prepared: PreparedInputs, vocab: int) -> torch.Tensor:
        """[B, V] bool: tokens in each row's prompt (padding included, as transformers counts them), for the
        repetition penalty."""
        if prepared.input_ids is None:
            raise ConfigError("repetition_penalty needs the prompt's token ids; these inputs carry none")
        ids = prepared.input_ids.clamp(0, vocab - 1)
        return torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prepared: PreparedInputs, config: GenerationConfig, pruner=None, shift=None, relevant=None,
                 return_logits: bool = False):
        a = self.adapter
        stop = list(config.stop_token_ids) if config.stop_token_ids is not None else a.eos_token_ids
        stop_ids = torch.tensor(stop or [-1], device=a.device)
        gen = torch.Generator(device=a.device).manual_seed(config.seed)
        sync = torch.cuda.synchronize if a.device.type == "cuda" else (lambda: None)
        self.check_context(prepared, config.max_new_tokens)
        if not bool(prepared.visual_mask.any()):
            pruner, shift = None, None  # no image in the batch: nothing to prune or revive

        t0 = time.perf_counter()
        state, pstate, logits, flops = self.start(prepared, config.max_new_tokens, pruner, shift, relevant)
        policy = shift if pstate is not None else None
        B = state.batch
        seen = self.seen_tokens(prepared, logits.shape[-1]) if config.repetition_penalty != 1.0 else None
        sync()
        t1 = time.perf_counter()
        kept_lists = lambda kept: [torch.nonzero(kept[b]).flatten().tolist() for b in range(B)]  # noqa: E731
        trace = Trace(n_visual=prepared.n_visual.tolist(), prune_layer=state.P,
                      kept=[[] for _ in range(B)] if state.kept is None else kept_lists(state.kept),
                      stages=[(stage.layers.start, kept_lists(stage.kept)) for stage in state.stages])
        trace.prefill_flops = flops + self.lm_head_flops(B)
        tokens, all_logits, step_flops = [], [], []
        finished = torch.zeros(B, dtype=torch.bool, device=a.device)
        lengths = torch.zeros(B, dtype=torch.long, device=a.device)
        every, compiled = self.config.stop_check_every, self.compiled
        n = config.max_new_tokens
        for t in range(n - 1):
            if return_logits:
                all_logits.append(logits)
            for store in state.stores:  # the host knows how many slots the step writes: no read from the device
                if store.ensure(store.filled + t + 1):
                    mark_static(store.buffers())
            uniform = torch.rand(B, generator=gen, device=a.device) if config.do_sample else None
            noise = policy.noise(pstate) if policy is not None else None
            tok, logits, f, step_trace = self._step(state, logits, finished, lengths, seen, stop_ids, config,
                                                    uniform, policy, pstate, noise, None if compiled else t)
            tokens.append(tok)
            step_flops.append(f)
            trace.steps.append(step_trace)
            if (t + 1) % every == 0 and bool(finished.all()):
                break
        else:  # the last token: no step after it
            if return_logits:
                all_logits.append(logits)
            uniform = torch.rand(B, generator=gen, device=a.device) if config.do_sample else None
            tok = next_token(logits, config, seen, uniform)
            tok = torch.where(finished, torch.full_like(tok, a.pad_token_id), tok)
            lengths += (~finished).long()
            tokens.append(tok)
        sync()
        t2 = time.perf_counter()
        # rows that stopped between two checks ran on: what came after every row's end is cut off
        new = lengths.tolist()
        width = max(new)
        steps = width - 1  # decoding steps the kept tokens needed
        trace.steps = trace.steps[:steps]
        trace.decode_flops = float(sum(step_flops[:steps], torch.zeros(())) +
                                   steps * self.lm_head_flops(B))
        trace.prefill_seconds, trace.decode_seconds = t1 - t0, t2 - t1
        # buffers only grow during a generation, so what the state holds at its end is its peak
        trace.memory_bytes = self.held_bytes(state, pstate)
        trace.kv_bytes_peak = sum(v for kind, v in trace.memory_bytes.items() if kind != "inputs")
        trace.new_tokens = new
        if policy is not None:
            policy.finish(trace, pstate, steps)
        trace.prefill_flops = float(trace.prefill_flops)
        out = torch.stack(tokens[:width], dim=1)
        logits_out = torch.stack(all_logits[:width], 1) if return_logits else None
        return GenerationOutput(tokens=out, trace=trace, logits=logits_out)


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, n] generated ids (pad after a row stops)
    trace: Trace
    logits: torch.Tensor | None = None  # [B, n, V] float32, when asked for


__all__ = ["Engine", "State", "Stage", "GenerationOutput", "PrefillOutputs", "visual_layout", "prune_points"]
