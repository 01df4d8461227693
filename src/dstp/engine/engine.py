"""The generation engine: prefill with an optional pruning schedule, then one-token decode steps.

Layers [0, P) keep every prompt token in the `full` store. A pruner's schedule P = P_0 < P_1 < ... gives one
stage per prune point: stage s runs layers [P_s, P_s+1) (the last one up to L) on text + its kept visual tokens
only, in a store of its own compacted to them, laid out as  [head | kept prompt | generated tokens]: the head
holds the visual tokens the stage dropped that DSTP may revive (`store` source: all of them, from an unpruned
prefill; `recompute`: those computed so far), read by attention only while revived.
Each stage keeps a subset of the one before; a single-stage pruner has one pruned stage. Without pruning P = L
and there is no pruned stage. Every token keeps its original position id.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from dstp.engine.attention import CAUSAL, UNMASKED, Attention
from dstp.engine.kv_store import GROW_CHUNK, NEVER, KVStore, ScatterView, allowed_keys
from dstp.engine.prune_context import PruneContext, PruneResult, first_true, visual_layout
from dstp.engine.sampling import next_token
from dstp.engine.trace import StepTrace, Trace
from dstp.config import GenerationConfig
from dstp.errors import ConfigError
from dstp.models.base import Adapter, PreparedInputs


@dataclass
class Stage:
    """One pruned stage: layers [P_s, P_s+1), their KV store compacted to text + `kept`."""
    layers: range
    store: KVStore
    kept: torch.Tensor  # [B, Nmax] bool: visual tokens in its prompt slots
    index: torch.Tensor  # [B, Tk] original index of each prompt slot (padding slots point anywhere)
    Tk: int  # prompt slots (from the store's head on), followed by generated tokens


@dataclass
class State:
    prepared: PreparedInputs
    P: int  # first prune point (L: no pruning)
    T: int  # padded prompt length
    cos: torch.Tensor  # [B, T, hd] rotary tables of the prompt, at original positions
    sin: torch.Tensor
    full: KVStore | None  # layers [0, P)
    stages: list[Stage] = field(default_factory=list)  # layers [P, L), one per prune point
    visual_pos: torch.Tensor | None = None  # [B, Nmax] original index of each visual token
    visual_valid: torch.Tensor | None = None  # [B, Nmax]
    kept: torch.Tensor | None = None  # [B, Nmax] bool: the final stage's set S0
    dropped_at: torch.Tensor | None = None  # [B, Nmax] first stage without the token (len(stages): never dropped)
    # recompute: [B, Rmax, D] each reserve token's input to the first stage without it; row of each visual rank
    hidden_at_P: torch.Tensor | None = None
    hidden_index: torch.Tensor | None = None  # [B, Nmax] (-1: not in the reserve)
    R: int = 0  # DSTP: visual tokens one shift may revive per sequence
    step: int = 0
    shift_state: object = None

    @property
    def batch(self) -> int:
        return self.cos.shape[0]

    @property
    def kept_count(self) -> torch.Tensor:
        """[B] visual tokens in the final kept set S0."""
        return self.kept.sum(-1)

    # the last stage (the one holding S0); the whole of [P, L) for a single-stage pruner
    @property
    def pruned(self) -> KVStore | None:
        return self.stages[-1].store if self.stages else None

    @property
    def Tk(self) -> int:
        return self.stages[-1].Tk if self.stages else 0


def prune_points(pruner) -> tuple[int, ...]:
    """The pruner's schedule of prune points: `stage_layers` for a multi-stage pruner, else (layer,)."""
    points = tuple(getattr(pruner, "stage_layers", None) or (pruner.layer,))
    if any(b <= a for a, b in zip(points, points[1:])):
        raise ConfigError(f"pruning stages must come at increasing layers, got {list(points)}")
    return points


class Engine:
    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        cfg = adapter.text_config
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.linear_params = adapter.linear_params_per_layer()

    # ---------------------------------------------------------------------------------------------
    def new_store(self, layers: range, batch: int, capacity: int, limit: int | None = None, head: int = 0) -> KVStore:
        """An empty KV store for `layers`, `capacity` front slots per sequence growing up to `limit`, and `head`
        head slots."""
        a = self.adapter
        return KVStore(layers, batch, a.n_kv_heads, a.head_dim, capacity, a.dtype, a.device, limit, head)

    def decode_store(self, layers: range, batch: int, prompt_slots: int, max_new_tokens: int, head: int = 0):
        """A store for prompt slots + generated tokens (after `head` head slots): room for a first chunk of
        generated tokens now, grown by chunks as they come."""
        first = min(max_new_tokens, GROW_CHUNK)
        return self.new_store(layers, batch, prompt_slots + first, prompt_slots + max_new_tokens, head)

    def run_layers(self, layers: range, h, store: KVStore, start: int, query_order, cos, sin, token_index,
                   extras, capture: dict | None = None, rows=None, mask=None):
        """Run decoder `layers` on hidden states h [B, Q, D] whose K/V go to `store` slots start..start+Q-1.
        query_order: original prompt index of each query (causality); token_index: index into the visual
        extras (DeepStack), None for generated tokens; capture: {layer: None} filled with each layer's input;
        rows / mask: restrict the K/V writes to some sequences [B] (or queries [B, Q]) / override the mask.
        Returns (h, attended query-key pairs)."""
        if mask is None and store.plain_causal(start, query_order):
            # exact, and lets SDPA take its fused causal kernel
            n = query_order.shape[1]
            attention, pairs = CAUSAL, torch.tensor(query_order.shape[0] * n * (n + 1) // 2)
        elif mask is None and store.sees_all(start, query_order):
            attention, pairs = UNMASKED, torch.tensor(query_order.shape[0] * (store.used - store.lo))  # decoding
        else:
            attention = Attention(mask=store.mask(query_order) if mask is None else mask)
            pairs = attention.mask.sum()  # a tensor: counting must not sync the host while decoding
        for i in layers:
            if capture is not None and i in capture:
                capture[i] = h
            h = self.adapter.run_layer(i, h, attention, cos, sin, store.view(start, rows))
            h = self.adapter.after_layer(i, h, token_index, extras)
        return h, pairs

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.adapter.lm_head(self.adapter.final_norm(h_last))[:, -1].float()

    def attention_rows(self, layer: int, layer_input: torch.Tensor, query_pos: torch.Tensor, store: KVStore,
                       cos, sin) -> torch.Tensor:
        """Softmax attention [B, H, Q, S] of prompt tokens at `query_pos` [B, Q] (their prompt slots) at `layer`
        of `store`, over the S slots attention reads, from q_proj of the layer's input and the cached (rotated)
        keys."""
        a = self.adapter
        D, hd = layer_input.shape[-1], cos.shape[-1]
        hq = layer_input.gather(1, query_pos[..., None].expand(-1, -1, D))
        cq = cos.gather(1, query_pos[..., None].expand(-1, -1, hd))
        sq = sin.gather(1, query_pos[..., None].expand(-1, -1, hd))
        q = a.query(layer, hq, cq, sq)  # [B, H, Q, hd]
        keys = store.k[store.local(layer)][:, :, store.lo: store.used]
        keys = keys.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
        scores = (q.float() @ keys.float().transpose(-1, -2)) * a.attention_scale(layer)
        order = store.order[:, store.head:].gather(1, query_pos) if store.used > store.head else query_pos
        allowed = store.mask(order)  # [B, 1, Q, used]
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)

    # ---------------------------------------------------------------------------------------------
    def prefill(self, prepared: PreparedInputs, max_new_tokens: int, pruner=None, retention: float = 1.0,
                shift=None, relevant: torch.Tensor | None = None, seed: int = 0):
        a = self.adapter
        L = a.n_layers
        h = prepared.inputs_embeds
        B, T, D = h.shape
        points = prune_points(pruner) if pruner is not None and bool(prepared.visual_mask.any()) else ()
        for p in points:
            if not 0 <= p <= L:
                raise ConfigError(f"prune layer {p} is outside the model: it has {L} layers (valid: 0..{L})")
        P = points[0] if points else L
        order = torch.arange(T, device=h.device).expand(B, T)
        cos, sin = a.rotary(h, prepared.position_ids)
        state = State(prepared=prepared, P=P, T=T, cos=cos, sin=sin, full=None)
        flops = 0.0
        probe = shift.probe_layer(P, L) if shift is not None else None
        capture = {i: None for i in {P - 1, probe} if i is not None and 0 <= i < P}

        if P > 0:
            state.full = self.decode_store(range(0, P), B, T, max_new_tokens)
            state.full.claim(0, order, prepared.attention_mask)
            h, pairs = self.run_layers(range(0, P), h, state.full, 0, order, cos, sin, order,
                                        prepared.extras, capture)
            flops += self.flops(P, int(prepared.attention_mask.sum()), pairs)
        if P == L:
            return state, self._logits(h[:, -1:]), flops

        # ---- the prune points, one stage each ---------------------------------------------------
        gen = torch.Generator(device="cpu").manual_seed(seed)
        vpos, vvalid, _ = visual_layout(prepared.visual_mask)
        state.visual_pos, state.visual_valid = vpos, vvalid
        text = prepared.attention_mask & ~prepared.visual_mask
        store_source = shift is not None and shift.needs_full_kv
        kept = vvalid
        state.dropped_at = torch.full(vpos.shape, len(points), dtype=torch.long, device=h.device)
        # what the stage before the prune point holds: its store, slot layout, layer inputs (P-1 and P), rotary
        store, slot_order, slot_valid, probe_h, stage_h, scos, ssin = (state.full, None, None, capture.get(P - 1),
                                                                       h, cos, sin)
        h_at = h  # [B, T, D] every token's hidden state at the last prune point it reached
        probe_source = None
        for s, Ps in enumerate(points):
            last = s == len(points) - 1
            stop = L if last else points[s + 1]
            ctx = PruneContext(self, prepared, Ps, h_at, retention, store, probe_h, scos, ssin, gen, relevant,
                               stage=s, kept_before=kept, slot_order=slot_order, slot_valid=slot_valid,
                               stage_hidden=stage_h)
            result: PruneResult = pruner.select(ctx)
            new = result.kept & vvalid
            if bool((new & ~kept).any()):
                raise ConfigError(f"pruning stage {s} (layer {Ps}) keeps visual tokens an earlier stage dropped: "
                                  f"each stage must keep a subset of the one before")
            if result.hidden is not None:
                merged = torch.where(new[..., None], result.hidden, ctx.visual_hidden())
                h_at = h_at.scatter(1, vpos[..., None].expand(-1, -1, D), merged)
            if s == 0:
                probe_source = h_at  # P = 0: the probe layer's keys come from the pruner's embeddings
            state.dropped_at = torch.where(kept & ~new, s, state.dropped_at)
            kept = new
            keep_tok = text.scatter(1, vpos, kept | text.gather(1, vpos))
            Tk = int(keep_tok.sum(-1).max())
            # right-aligned compaction: each row's kept tokens in order, padding first
            idx = torch.argsort(keep_tok.to(torch.int8), dim=-1, stable=True)[:, T - Tk:]
            kvalid = keep_tok.gather(1, idx)
            pad_tag = -1 - torch.arange(Tk, device=h.device).expand(B, Tk)  # unique: a pad slot sees itself
            korder = torch.where(kvalid, idx, pad_tag)
            if last:
                state.kept = kept
                state.R = shift.revival_slots(state) if shift is not None else 0
            # store source: the stage's head holds every visual token it dropped (filled by the unpruned run below)
            head = int((vvalid & ~kept).sum(-1).max()) if store_source else 0
            st_store = self.decode_store(range(Ps, stop), B, Tk, max_new_tokens, head)
            st_store.claim(head, korder, kvalid)
            state.stages.append(Stage(range(Ps, stop), st_store, kept, idx, Tk))
            if last and store_source:
                break  # this stage's K/V come from the unpruned prefill below
            hk = h_at.gather(1, idx[..., None].expand(-1, -1, D))
            ck = cos.gather(1, idx[..., None].expand(-1, -1, cos.shape[-1]))
            sk = sin.gather(1, idx[..., None].expand(-1, -1, cos.shape[-1]))
            cap = None if last else {stop - 1: None}
            hk, pairs = self.run_layers(range(Ps, stop), hk, st_store, head, korder, ck, sk,
                                         torch.where(kvalid, idx, -1), prepared.extras, cap)
            flops += self.flops(stop - Ps, int(kvalid.sum()), pairs)
            if last:
                logits = self._logits(hk[:, -1:])
            else:
                back = torch.where(kvalid[..., None], hk, h_at.gather(1, idx[..., None].expand(-1, -1, D)))
                h_at = h_at.scatter(1, idx[..., None].expand(-1, -1, D), back)
                store, slot_order, slot_valid, probe_h, stage_h, scos, ssin = (st_store, korder, kvalid,
                                                                               cap[stop - 1], hk, ck, sk)
        # DSTP's setup needs the probe layer's input of the last prompt token only (P = 0: the first stage's
        # embeddings); what else the stages held is let go before the store source's unpruned run
        probe_in = probe_source if P == 0 else capture[probe][:, -1:].clone() if shift is not None else None
        capture.clear()
        ctx = probe_h = stage_h = store = hk = None  # noqa: F841
        if store_source:
            held = [probe_source]  # handed over, so that no reference here keeps the input alive during the run
            h = h_at = probe_source = None
            logits, f = self._unpruned_from_P(state, held)
            flops += f
        elif shift is not None and state.R > 0:  # what `recompute` starts from, for the reserve only
            reserve = vvalid & ~kept
            rank, held = first_true(reserve, int(reserve.sum(-1).max()))
            state.hidden_at_P = h_at.gather(1, vpos.gather(1, rank)[..., None].expand(-1, -1, D))
            rows = torch.arange(rank.shape[1], device=h.device).expand_as(rank)
            state.hidden_index = torch.full_like(vpos, -1).scatter(1, rank, torch.where(held, rows, -1))
        if shift is not None:
            state.shift_state = shift.setup(self, state, probe_in)
        return state, logits, flops

    def _unpruned_from_P(self, state: State, held: list):
        """`store` source: layers >= P on every prompt token, in the prompt's order, as the unpruned model's
        prefill runs them (the causal kernel without padding); each layer's K/V are scattered into its stage's
        store: the kept tokens' into its prompt slots, every visual token the stage dropped into its head (left
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
        for stage in state.stages:
            slots = self._store_slots(state, stage)
            for i in stage.layers:
                h = a.run_layer(i, h, attention, state.cos, state.sin, ScatterView(stage.store, slots))
                h = a.after_layer(i, h, order, prepared.extras)
        flops = self.flops(a.n_layers - state.P, int(valid.sum()), pairs)
        return self._logits(h[:, -1:]), flops

    @staticmethod
    def _store_slots(state: State, stage: Stage) -> torch.Tensor:
        """`store` source: tag the stage's head with the visual tokens it dropped, and return the slot [B, T] of
        every prompt position in its store (padding positions: distinct padding slots, never read)."""
        s, H = stage.store, stage.store.head
        B, T = state.prepared.attention_mask.shape
        rank, in_head = first_true(state.visual_valid & ~stage.kept, H)
        s.order[:, :H] = torch.where(in_head, state.visual_pos.gather(1, rank), NEVER)
        tags, held = s.order[:, :H + stage.Tk], s.valid[:, :H + stage.Tk].clone()
        held[:, :H] = in_head
        n = H + stage.Tk  # >= T: every real prompt token has a slot, and the longest row has no padding
        slots = torch.full((B, T + 1), -1, dtype=torch.long, device=tags.device)
        slots = slots.scatter(1, torch.where(held, tags, T), torch.arange(n, device=tags.device).expand(B, n))[:, :T]
        pad_pos = torch.argsort((slots >= 0).to(torch.int8), dim=-1, stable=True)  # padding positions first
        pad_slot = torch.argsort(held.to(torch.int8), dim=-1, stable=True)[:, :T]  # padding slots first
        first = torch.arange(T, device=tags.device)[None] < (slots < 0).sum(-1, keepdim=True)
        return slots.scatter(1, pad_pos, torch.where(first, pad_slot, slots.gather(1, pad_pos)))

    # ---------------------------------------------------------------------------------------------
    def decode_step(self, state: State, tokens: torch.Tensor, shift=None):
        """Run one new token per row through every layer; returns logits [B, V], flops, StepTrace."""
        a = self.adapter
        L, P, B = a.n_layers, state.P, state.batch
        h = a.embed_tokens(tokens[:, None])
        pos = state.prepared.next_position + state.step
        cos, sin = a.rotary(h, a.decode_position_ids(pos))
        order = torch.full((B, 1), state.T + state.step, dtype=torch.long, device=h.device)
        ones = torch.ones(B, 1, dtype=torch.bool, device=h.device)
        flops, q_probe = 0.0, None
        probe = shift.probe_layer(P, L) if shift is not None else None
        if probe == 0 and P == 0:
            q_probe = a.query(0, h, cos, sin)
        if P > 0:
            slot = state.full.used
            state.full.claim(slot, order, ones, all_valid=True)
            capture = {probe: None} if probe is not None else None
            h, pairs = self.run_layers(range(0, P), h, state.full, slot, order, cos, sin, None,
                                        state.prepared.extras, capture)
            flops += self.flops(P, B, pairs)
            if probe is not None:
                q_probe = a.query(probe, capture[probe], cos, sin)
        if state.stages:
            # the attended visual set changes only through DSTP, which reports it; otherwise it is S0
            step_trace = shift.step(self, state, q_probe) if shift is not None else \
                StepTrace(visual_attended=state.kept_count)
            for stage in state.stages:
                slot = stage.store.used
                stage.store.claim(slot, order, ones, all_valid=True)
                h, pairs = self.run_layers(stage.layers, h, stage.store, slot, order, cos, sin, None,
                                            state.prepared.extras)
                flops += self.flops(len(stage.layers), B, pairs)
        else:
            step_trace = StepTrace(visual_attended=state.prepared.n_visual)
        state.step += 1
        return self._logits(h), flops, step_trace

    # ---------------------------------------------------------------------------------------------
    def flops(self, n_layers: int, n_tokens: int, attn_pairs: int) -> float:
        """Analytic FLOPs: 2 * weights per token per layer, plus QK^T and PV (4 * H * hd per
        query-key pair per layer). `attn_pairs` counts allowed (query, key) pairs for one layer."""
        a = self.adapter
        return n_layers * (2.0 * self.linear_params * n_tokens + 4.0 * a.n_heads * a.head_dim * attn_pairs)

    def lm_head_flops(self, n_tokens: int) -> float:
        return 2.0 * self.hidden_size * self.vocab_size * n_tokens

    @staticmethod
    def held_bytes(state: State) -> dict[str, int]:
        """Every buffer the generation state holds, as allocated (a KV store's capacity, not its used slots; one
        storage once however many views of it are held), by what it is for: `kv` (the stores of layers < P and
        of every pruned stage, their heads left out), the pruned stores' heads (DSTP's reserve: `reserve` for the
        store source, every dropped token; `dstp_cache` for recompute, the revived tokens computed so far),
        `hidden_at_P`, `dstp_keys` (probe-layer keys, kept only for a pruner before the LLM), `dstp` (DSTP's other
        per-sequence state, its step history included), `inputs` (the prepared inputs), `other` (rotary tables,
        kept sets, slot layouts)."""
        seen, out = set(), {}
        st = state.shift_state

        def add(kind, obj):
            if isinstance(obj, torch.Tensor):
                storage = obj.untyped_storage()
                if storage._cdata not in seen:
                    seen.add(storage._cdata)
                    out[kind] = out.get(kind, 0) + storage.nbytes()
            elif isinstance(obj, KVStore):
                head_kind = getattr(st, "head_kind", "reserve")
                for t in (*obj.k, *obj.v, obj.order, obj.valid):
                    storage = t.untyped_storage()
                    if storage._cdata not in seen:
                        seen.add(storage._cdata)
                        head = storage.nbytes() // obj.capacity * obj.head  # the slot axis divides every buffer
                        out[kind] = out.get(kind, 0) + storage.nbytes() - head
                        if st is not None:
                            out[head_kind] = out.get(head_kind, 0) + head
            elif isinstance(obj, (list, tuple)):
                for x in obj:
                    add(kind, x)
            elif isinstance(obj, dict):
                for x in obj.values():
                    add(kind, x)
            elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                for f in dataclasses.fields(obj):
                    add(kind, getattr(obj, f.name))

        add("inputs", state.prepared)
        add("kv", [state.full, *(stage.store for stage in state.stages)])
        add("hidden_at_P", state.hidden_at_P)
        if st is not None:
            add("dstp_keys", st.keys)
            add("dstp", st)
        add("other", state)
        return out

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
    def generate(self, prepared: PreparedInputs, config: GenerationConfig, pruner=None, retention: float = 1.0,
                 shift=None, relevant=None, return_logits: bool = False):
        a = self.adapter
        stop = list(config.stop_token_ids) if config.stop_token_ids is not None else a.eos_token_ids
        stop_t = torch.tensor(stop or [-1], device=a.device)
        gen = torch.Generator(device=a.device).manual_seed(config.seed)
        sync = torch.cuda.synchronize if a.device.type == "cuda" else (lambda: None)
        self.check_context(prepared, config.max_new_tokens)
        if not bool(prepared.visual_mask.any()):
            pruner, shift = None, None  # no image in the batch: nothing to prune or revive

        t0 = time.perf_counter()
        state, logits, flops = self.prefill(prepared, config.max_new_tokens, pruner, retention, shift, relevant,
                                            seed=getattr(pruner, "seed", 0))
        B = state.batch
        seen = self.seen_tokens(prepared, logits.shape[-1]) if config.repetition_penalty != 1.0 else None
        prefill_flops = flops + self.lm_head_flops(B)
        sync()
        t1 = time.perf_counter()
        kept_lists = lambda kept: [torch.nonzero(kept[b]).flatten().tolist() for b in range(B)]
        trace = Trace(n_visual=prepared.n_visual.tolist(), prune_layer=state.P,
                      kept=[[] for _ in range(B)] if state.kept is None else kept_lists(state.kept),
                      stages=[(stage.layers.start, kept_lists(stage.kept)) for stage in state.stages])
        trace.prefill_flops = prefill_flops
        tokens, all_logits = [], []
        finished = torch.zeros(B, dtype=torch.bool, device=a.device)
        lengths = torch.zeros(B, dtype=torch.long, device=a.device)
        for t in range(config.max_new_tokens):
            if return_logits:
                all_logits.append(logits)
            tok = next_token(logits, config, seen, gen)
            tok = torch.where(finished, torch.full_like(tok, a.pad_token_id), tok)
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            tokens.append(tok)
            lengths += (~finished).long()
            finished |= torch.isin(tok, stop_t)
            if t == config.max_new_tokens - 1 or bool(finished.all()):
                break
            logits, f, step_trace = self.decode_step(state, tok, shift)
            trace.decode_flops += f + self.lm_head_flops(B)
            trace.steps.append(step_trace)
        sync()
        t2 = time.perf_counter()
        trace.prefill_seconds, trace.decode_seconds = t1 - t0, t2 - t1
        # buffers only grow during a generation, so what the state holds at its end is its peak
        trace.memory_bytes = self.held_bytes(state)
        trace.kv_bytes_peak = sum(n for kind, n in trace.memory_bytes.items() if kind != "inputs")
        trace.new_tokens = lengths.tolist()
        if shift is not None:
            shift.finish(trace, state)
        trace.prefill_flops, trace.decode_flops = float(trace.prefill_flops), float(trace.decode_flops)
        out = torch.stack(tokens, dim=1)
        return GenerationOutput(tokens=out, trace=trace, logits=torch.stack(all_logits, 1) if return_logits else None)


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, n] generated ids (pad after a row stops)
    trace: Trace
    logits: torch.Tensor | None = None  # [B, n, V] float32, when asked for


__all__ = ["Engine", "State", "Stage", "GenerationOutput", "visual_layout", "prune_points"]
