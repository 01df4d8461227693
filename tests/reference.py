"""An independent reference for pruned generation: the whole sequence, no KV cache, per-layer masks.

Layers >= P may not attend to dropped visual tokens; every token keeps its original position. This
shares nothing with the engine but the adapter's `prepare`, `rotary` and decoder layers (themselves
checked against transformers' generate()); the layers attend through transformers' own SDPA path, with a mask."""
from __future__ import annotations

import torch


def hf_layer(layer, h, mask, cos, sin):
    """A decoder layer on the whole sequence through transformers' own attention path (no dstp Attention: SDPA),
    with the boolean mask [B, 1, n, n]."""
    out = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def masked_reference_logits(adapter, prepared, P: int, dropped: torch.Tensor, steps: int):
    """Greedy logits [B, steps, V]. `dropped` [B, T] marks visual tokens removed from layers >= P. Sliding-window
    layers (the adapter's `sliding_window`) see only the keys within their window (sequence index)."""
    h0 = prepared.inputs_embeds
    B, T, _ = h0.shape
    valid = prepared.attention_mask
    pos = prepared.position_ids
    logits_out, tokens = [], []
    for t in range(steps):
        if tokens:
            new = torch.stack(tokens, 1)
            h = torch.cat([h0, adapter.embed_tokens(new)], 1)
            extra = prepared.next_position[:, None] + torch.arange(len(tokens))
            if pos.dim() == 3:
                extra = extra[None].expand(3, -1, -1)
            p = torch.cat([pos, extra], -1)
        else:
            h, p = h0, pos
        n = h.shape[1]
        v = torch.cat([valid, torch.ones(B, n - T, dtype=torch.bool)], 1)
        d = torch.cat([dropped, torch.zeros(B, n - T, dtype=torch.bool)], 1)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        base = causal[None] & v[:, None, :]
        base |= torch.eye(n, dtype=torch.bool)[None]
        pruned_mask = base & ~d[:, None, :]
        index_diff = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # query index - key index
        cos, sin = adapter.rotary(h, p)
        index = torch.arange(n).expand(B, n)
        index = torch.where(index < T, index, -1)
        for i, layer in enumerate(adapter.layers):
            m = (base if i < P else pruned_mask)[:, None]
            window = adapter.sliding_window(i)
            if window is not None:  # a sliding layer: keys within the window by sequence index, as transformers'
                m = m & (index_diff < window)
            h = hf_layer(layer, h, m, cos, sin)
            h = adapter.after_layer(i, h, index, prepared.extras)
        lg = adapter.lm_head(adapter.final_norm(h[:, -1:]))[:, -1].float()
        logits_out.append(lg)
        tokens.append(lg.argmax(-1))
    return torch.stack(logits_out, 1)
