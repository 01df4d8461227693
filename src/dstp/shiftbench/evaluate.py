"""Greedy decoding and exact-answer accuracy on fresh ShiftBench samples."""

from __future__ import annotations

from collections import defaultdict

import torch

from dstp.shiftbench.tasks import check_answer, generate_samples


@torch.no_grad()
def greedy_generate(model, processor, samples, max_new_tokens: int | None = None, batch_size: int = 250) -> list[str]:
    """Plain greedy decoding with the HF KV cache (left padding, positions = cumsum(mask) - 1)."""
    if max_new_tokens is None:
        max_new_tokens = max(2 * s.hops for s in samples) + 8 if samples else 0
    eos = processor.tokenizer.eos_token_id
    texts = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = processor([s.image for s in chunk], [s.prompt for s in chunk], padding_side="left")
        embeds, _ = model.embed_multimodal(batch["input_ids"], batch["pixel_values"])
        mask = batch["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        past, last_pos = out.past_key_values, pos[:, -1:]
        logits = model.lm_head(out.last_hidden_state[:, -1])
        done = torch.zeros(len(chunk), dtype=torch.bool)
        generated = []
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            generated.append(nxt)
            done |= nxt == eos
            if bool(done.all()):
                break
            embeds, _ = model.embed_multimodal(nxt[:, None])
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last_pos = last_pos + 1
            out = model.language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=last_pos, past_key_values=past, use_cache=True
            )
            past = out.past_key_values
            logits = model.lm_head(out.last_hidden_state[:, -1])
        ids = torch.stack(generated, dim=1).tolist()
        texts += [processor.decode(row[: row.index(eos)] if eos in row else row) for row in ids]
    return texts


def evaluate(model, processor, task: str, n: int, seed: int, generate_fn=None, hops=None, grid_size: int | None = None):
    """Exact-answer accuracy on ``n`` fresh samples: {"accuracy", "n", "by_hops": {h: acc}}.

    ``generate_fn(samples) -> list[str]`` replaces the default greedy decoder (e.g. the dstp engine).
    """
    grid = grid_size or processor.grid_size
    samples = generate_samples(task, n, seed, grid_size=grid, hops=hops)
    was_training = model.training
    model.eval()
    try:
        texts = generate_fn(samples) if generate_fn is not None else greedy_generate(model, processor, samples)
    finally:
        model.train(was_training)
    hits = defaultdict(list)
    for s, t in zip(samples, texts):
        hits[s.hops].append(check_answer(s, t))
    total = [h for v in hits.values() for h in v]
    result = {"task": task, "n": len(total), "accuracy": sum(total) / max(len(total), 1)}
    if task == "walk":
        result["by_hops"] = {h: sum(v) / len(v) for h, v in sorted(hits.items())}
    return result
