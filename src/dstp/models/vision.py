"""What a merging pruner before the LLM (VisionZip) reads from the vision encoder, in the encoder's space
before the projector, and how the adapters lay it out.

A *view* is what the encoder sees at once: an image (LLaVA-1.5, Qwen), an anyres crop (LLaVA-NeXT) or a tile
(InternVL). A *unit* is what becomes one LLM token: a patch, or for Qwen / InternVL the 2x2 group of patches that
the merger / pixel shuffle folds into one token. Every unit names the visual token it fills by its `slot`: its
index among all the batch's visual tokens in placeholder order (row 0's first), -1 when it fills none (padding of
a smaller view, a LLaVA-NeXT patch cut by unpadding)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class VisionInternals:
    hidden: torch.Tensor  # [V, S, U] each unit's features as the projector reads them
    keys: torch.Tensor  # [V, S, dk] head-mean keys of the feature layer (a unit's patches averaged)
    scores: torch.Tensor  # [V, S] float32: CLS attention of the feature layer (head mean), or the family's stand-in
    slot: torch.Tensor  # [V, S] long: the visual token each unit fills, -1 for none
    project: Callable[[torch.Tensor], torch.Tensor]  # [n, U] -> [n, D]: the model's projector (merger)
    cls: torch.Tensor | None = None  # [V, U] the CLS token's features where the encoder has one the LLM does not see

    @property
    def valid(self) -> torch.Tensor:
        return self.slot >= 0

    def token_scores(self, n_tokens: int) -> torch.Tensor:
        """[n_tokens] the score of the unit filling each visual token (0 where none does: LLaVA-NeXT newlines)."""
        flat = torch.zeros(n_tokens, dtype=torch.float32, device=self.scores.device)
        return flat.index_put_((self.slot[self.valid],), self.scores[self.valid].float())


def pad_views(rows: list[torch.Tensor], fill=0) -> torch.Tensor:
    """Per-view tensors [S_v, ...] -> [V, max S_v, ...], padded with `fill`."""
    S = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), S, *rows[0].shape[1:]), fill)
    for v, r in enumerate(rows):
        out[v, : r.shape[0]] = r
    return out


def consecutive_slots(counts: list[int], device) -> torch.Tensor:
    """[V, max count] slots of views whose units fill consecutive visual tokens, view after view (-1 padding)."""
    starts = torch.tensor([0] + counts[:-1], device=device).cumsum(0)
    return pad_views([s + torch.arange(n, device=device) for s, n in zip(starts.tolist(), counts)], fill=-1)


def head_mean_keys(attn, x: torch.Tensor) -> torch.Tensor:
    """[n, S, hd]: a ViT attention module's keys of its normed input `x` [n, S, D], averaged over heads
    (InternViT's optional k RMSNorm runs over all heads before they are split, as in the model)."""
    k = attn.k_proj(x)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    n, S, _ = x.shape
    return k.view(n, S, attn.num_heads, -1).mean(2)


QUERY_CHUNK = 1024  # query rows per softmax block when scoring (bounds memory on large images)


@torch.no_grad()
def received_attention(q: torch.Tensor, k: torch.Tensor, bounds: list[int], scale: float) -> torch.Tensor:
    """[S] float32: the softmax attention each token receives, averaged over heads and over the queries of its
    segment (`bounds`: segment starts and the end, as cu_seqlens), from rotated q and k [S, H, hd]."""
    q, k = q.float(), k.float()
    out = torch.zeros(q.shape[0], device=q.device)
    for s, e in zip(bounds[:-1], bounds[1:]):
        keys = k[s:e].transpose(0, 1)  # [H, n, hd]
        for c in range(s, e, QUERY_CHUNK):
            qc = q[c:min(c + QUERY_CHUNK, e)].transpose(0, 1)
            out[s:e] += torch.softmax(qc @ keys.transpose(1, 2) * scale, dim=-1).sum((0, 1))
        out[s:e] /= q.shape[1] * (e - s)
    return out


@torch.no_grad()
def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[n, S] float32: head-mean softmax attention of the CLS query q [n, H, hd] on every token k [n, S, H, hd]."""
    scores = torch.einsum("nhd,nshd->nhs", q.float(), k.float()) * scale
    return torch.softmax(scores, dim=-1).mean(1)


def join_views(parts: list[tuple[VisionInternals, torch.Tensor]]) -> VisionInternals:
    """One VisionInternals from several calls of the same encoder (a batch's images, then its videos): each part's
    units name their token by `slot_map[slot]` (`slot_map`: the part's own visual token order -> the batch's)."""
    first = parts[0][0]
    S = max(v.slot.shape[1] for v, _ in parts)
    pad = lambda t, fill=0: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, S - t.shape[1]), value=fill)  # noqa: E731
    slots = [pad(torch.where(v.valid, m[v.slot.clamp(min=0)], -1), -1) for v, m in parts]
    return VisionInternals(hidden=torch.cat([pad(v.hidden) for v, _ in parts]),
                           keys=torch.cat([pad(v.keys) for v, _ in parts]),
                           scores=torch.cat([pad(v.scores) for v, _ in parts]), slot=torch.cat(slots),
                           project=first.project,
                           cls=None if first.cls is None else torch.cat([v.cls for v, _ in parts]))
