"""A reference for pruning a hybrid LLM (Qwen3.5): the model's own decoder layers with transformers' own cache
(`DynamicCache`: K/V for full-attention layers, conv + recurrent state for linear-attention ones, transformers'
chunked prefill and recurrent decoding), where layers >= K run on a physically shortened sequence.

Layers [0, K) run on the whole prompt; each row's kept tokens (text and the kept visual tokens) are gathered,
left-padded, and layers [K, L) run on them alone, in their own cache; each generated token then runs through both
parts. Nothing of dstp's engine is used: only its prepared inputs (embeddings with the image features, M-RoPE
positions), which tests/test_qwen3_5.py checks against `generate()` separately. Masks are built here in the
simplest form: causal over valid keys (a padding query sees itself), the 2-D padding mask for linear layers."""
from __future__ import annotations

import inspect

import torch


def _cache_kwarg(layer) -> str:
    params = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _masks(valid_keys: torch.Tensor, n_new: int, prefill_valid: torch.Tensor | None):
    """(4-D bool mask [B, 1, n_new, S] for full attention, 2-D mask for linear attention or None)."""
    B, S = valid_keys.shape
    q = torch.arange(S - n_new, S)
    k = torch.arange(S)
    allowed = valid_keys[:, None, :] & (k[None, None, :] <= q[None, :, None])
    allowed |= k[None, None, :] == q[None, :, None]
    return allowed[:, None], (prefill_valid if n_new > 1 else None)


class _Part:
    """Layers `layers` of the model with their own DynamicCache and key validity."""

    def __init__(self, model, layers: range):
        from transformers import DynamicCache

        self.model, self.layers = model, layers
        self.lm = model.model.language_model
        self.cache = DynamicCache(config=model.config.get_text_config())
        self.valid = None

    def run(self, h, position_ids, valid_new: torch.Tensor):
        self.valid = valid_new if self.valid is None else torch.cat([self.valid, valid_new], 1)
        full, linear = _masks(self.valid, h.shape[1], valid_new)
        pe = self.lm.rotary_emb(h, position_ids)
        types = self.model.config.get_text_config().layer_types
        for i in self.layers:
            layer = self.lm.layers[i]
            mask = linear if types[i] == "linear_attention" else full
            out = layer(h, position_embeddings=pe, attention_mask=mask, use_cache=True,
                        **{_cache_kwarg(layer): self.cache})
            h = out[0] if isinstance(out, tuple) else out
        return h


@torch.no_grad()
def shortened_generate(model, prepared, schedule, new_tokens: int):
    """Greedy tokens [B, n] and logits [B, n, V] (float32) of a pruning schedule [(K, kept_visual), ...]: from
    layer K on (up to the next K), row b holds its text and the visual tokens `kept_visual[b]` (ranks among its
    visual tokens) only, each token's hidden state carried over from the stage before."""
    h, mask, pos = prepared.inputs_embeds, prepared.attention_mask, prepared.position_ids
    B, T, D = h.shape
    L = len(model.model.language_model.layers)
    bounds = [K for K, _ in schedule] + [L]
    head = _Part(model, range(0, bounds[0]))
    stages = [_Part(model, range(a, b)) for a, b in zip(bounds, bounds[1:])]
    if bounds[0] > 0:
        h = head.run(h, pos, mask)
    for stage, (_, kept_visual) in zip(stages, schedule):
        keep = mask & ~prepared.visual_mask
        for b, ranks in enumerate(kept_visual):
            keep[b, torch.nonzero(prepared.visual_mask[b]).flatten()[ranks]] = True
        Tk = int(keep.sum(-1).max())
        idx = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)[:, T - Tk:]  # kept in order, padding first
        kvalid = keep.gather(1, idx)
        gathered = h.gather(1, idx[..., None].expand(-1, -1, D))
        hk = stage.run(torch.where(kvalid[..., None], gathered, torch.zeros_like(gathered)),
                       pos.gather(2, idx[None].expand(pos.shape[0], -1, -1)), kvalid)
        h = h.scatter(1, idx[..., None].expand(-1, -1, D), torch.where(kvalid[..., None], hk, gathered))
    lm = model.model.language_model
    tokens, logits = [], []
    step_logits = model.lm_head(lm.norm(hk[:, -1:]))[:, -1].float()
    ones = torch.ones(B, 1, dtype=torch.bool)
    for t in range(new_tokens):
        logits.append(step_logits)
        tok = step_logits.argmax(-1)
        tokens.append(tok)
        if t == new_tokens - 1:
            break
        x = lm.embed_tokens(tok[:, None])
        p = (prepared.next_position + t)[None, :, None].expand(3, -1, 1)
        for part in ([head] if bounds[0] > 0 else []) + stages:
            x = part.run(x, p, ones)
        step_logits = model.lm_head(lm.norm(x))[:, -1].float()
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@torch.no_grad()
def store_source_generate(model, prepared, P: int, attended, new_tokens: int):
    """DSTP's `store` source on a hybrid LLM: an unpruned prefill (every layer, every token, transformers' cache),
    then decoding step t attends, in the full-attention layers >= P, to the prompt positions `attended[t]` [B, T]
    (text, the kept visual tokens and those revived at that step) and the generated tokens; layers < P attend to
    everything, and the linear-attention layers carry the unpruned prompt's state. Greedy tokens and logits."""
    from transformers import DynamicCache

    h, mask, pos = prepared.inputs_embeds, prepared.attention_mask, prepared.position_ids
    B = h.shape[0]
    lm = model.model.language_model
    types = model.config.get_text_config().layer_types
    cache = DynamicCache(config=model.config.get_text_config())

    def run(x, p, lower_keys, upper_keys, prefill_valid):
        pe = lm.rotary_emb(x, p)
        lower, linear = _masks(lower_keys, x.shape[1], prefill_valid)
        upper, _ = _masks(upper_keys, x.shape[1], prefill_valid)
        for i, layer in enumerate(lm.layers):
            m = linear if types[i] == "linear_attention" else (lower if i < P else upper)
            out = layer(x, position_embeddings=pe, attention_mask=m, use_cache=True, **{_cache_kwarg(layer): cache})
            x = out[0] if isinstance(out, tuple) else out
        return model.lm_head(lm.norm(x[:, -1:]))[:, -1].float()

    step_logits = run(h, pos, mask, mask, mask)
    tokens, logits = [], []
    generated = torch.zeros(B, 0, dtype=torch.bool)
    for t in range(new_tokens):
        logits.append(step_logits)
        tok = step_logits.argmax(-1)
        tokens.append(tok)
        if t == new_tokens - 1:
            break
        generated = torch.cat([generated, torch.ones(B, 1, dtype=torch.bool)], 1)
        p = (prepared.next_position + t)[None, :, None].expand(3, -1, 1)
        step_logits = run(lm.embed_tokens(tok[:, None]), p, torch.cat([mask, generated], 1),
                          torch.cat([attended[t], generated], 1), None)
    return torch.stack(tokens, 1), torch.stack(logits, 1)
