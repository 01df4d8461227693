"""One image's kept visual tokens, chosen by a dstp pruner, and the positions that travel with them.

vLLM runs the vision encoder per image, apart from the prompt, so each image is pruned on its own: the pruner
sees a row holding that image's N visual tokens and nothing else, and keeps k = ceil(retention * N) of them. For
a request with one image this is the row dstp's engine prunes (batch 1); dstp's engine prunes all images of a
row together, so for several images per request the two differ (docs/vllm.md).

Kept tokens keep their original positions. vLLM only learns which tokens were kept when the encoder has run,
after it laid out the request's positions, so each kept embedding carries its position relative to the image's
first visual token in POSITION_CHANNELS extra channels (three axes, (t, h, w) for M-RoPE and (i, i, i) for 1-D
RoPE, each as two base-128 digits so that bfloat16 holds them exactly); the model strips them before the LLM and
adds them to the image's base position. A merged token (visionzip) sits at the position of the token it replaces,
as in dstp's engine. Nothing here imports vLLM.
"""
from __future__ import annotations

import torch

from dstp.engine.prune_context import PruneContext
from dstp.models.base import PreparedInputs
from dstp.pruners.cdpruner import instruction_mask

DIGIT = 128  # every integer below 256 is exact in bfloat16 and float16
POSITION_CHANNELS = 6  # 3 axes x 2 digits: relative positions up to DIGIT**2 - 1 = 16383 per axis


def keep(pruner, seed: int, embeddings: torch.Tensor, instruction: torch.Tensor | None = None,
         vision=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sorted indices [k] of the visual tokens `pruner` keeps from one image's embeddings [N, D] (the LLM's input
    embeddings of those tokens), their merged rows [k, D] or None where the pruner only selects).

    The pruner sees one row: the image's N visual tokens, then `instruction` [T, D] (the LLM's input embeddings of
    the prompt's text after its last image, for pruners that condition on it: cdpruner), with its generator seeded
    from `seed` as dstp's engine seeds it; `vision` (a `dstp.models.vision.VisionInternals` of one view) is the
    encoder's internals for pruners that merge in the encoder's space (visionzip)."""
    n, device = embeddings.shape[0], embeddings.device
    text = embeddings[:0] if instruction is None else instruction.to(device, embeddings.dtype)
    row = torch.cat([embeddings, text])[None]
    T = row.shape[1]
    visual = torch.zeros(1, T, dtype=torch.bool, device=device)
    visual[0, :n] = True
    prepared = PreparedInputs(inputs_embeds=row, attention_mask=torch.ones_like(visual),
                              position_ids=torch.arange(T, device=device)[None],
                              next_position=torch.tensor([T], device=device), visual_mask=visual, vision=vision)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ctx = PruneContext(None, prepared, 0, row, gen=generator)
    result = pruner.select(ctx)
    index = result.kept[0].nonzero()[:, 0]
    merged = None if result.hidden is None else result.hidden[0, index].to(embeddings.dtype)
    return index, merged


def instruction_ids(prompt: list[int], image_token: int) -> list[int]:
    """A request's instruction, as dstp's cdpruner takes it from a row: the prompt's token ids after its last
    image placeholder, or all its text where none follows (vLLM's prompt before placeholder expansion: one
    placeholder per image, which does not change what follows the last)."""
    ids = torch.tensor(prompt, dtype=torch.long)[None]
    return ids[instruction_mask(ids == image_token, torch.ones_like(ids, dtype=torch.bool))].tolist()


def encode_positions(relative: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[k, 3] non-negative integer positions -> [k, POSITION_CHANNELS] channels of `dtype`."""
    if relative.numel() and (int(relative.min()) < 0 or int(relative.max()) >= DIGIT * DIGIT):
        raise ValueError(f"relative positions must be in [0, {DIGIT * DIGIT}), got {int(relative.min())}.."
                         f"{int(relative.max())}")
    high, low = relative // DIGIT, relative % DIGIT
    return torch.cat([high, low], dim=-1).to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """[k, POSITION_CHANNELS] -> [k, 3] long."""
    digits = channels.float().round().long()
    return digits[:, :3] * DIGIT + digits[:, 3:]


def grid_positions(index: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
    """(t, h, w) of raster indices `index` [k] in a (t, h, w) grid of visual tokens (M-RoPE layout), [k, 3]."""
    _, h, w = grid_thw
    return torch.stack([index // (h * w), (index // w) % h, index % w], dim=-1)


def line_positions(index: torch.Tensor) -> torch.Tensor:
    """(i, i, i) for 1-D RoPE run as M-RoPE with three identical rows, [k, 3]."""
    return index[:, None].expand(-1, 3)
