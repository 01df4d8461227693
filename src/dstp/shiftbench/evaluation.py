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


@torch.no_grad()
def _teacher_forced_attentions(model, processor, samples):
    """Eager-attention forward pass over prompt + target + <eos>: (batch, attentions per layer)."""
    texts = [f"{s.prompt} {s.target} <eos>" for s in samples]
    batch = processor([s.image for s in samples], texts, padding_side="left")
    embeds, visual_mask = model.embed_multimodal(batch["input_ids"], batch["pixel_values"])
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    lm_config = model.language_model.config
    previous = lm_config._attn_implementation
    lm_config._attn_implementation = "eager"
    try:
        out = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, output_attentions=True)
    finally:
        lm_config._attn_implementation = previous
    return batch, visual_mask, out.attentions


def lookup_attention_profile(model, processor, task: str = "walk", n: int = 64, seed: int = 4242, hops=None) -> dict:
    """Where the model reads the image: for every target token that must read a cell
    (``Sample.token_reads``), the attention of the position that predicts it (the token before it,
    teacher forced) on that cell's visual token, per layer: head mean and the best head's mean.
    ``uniform`` is the mass one visual token would get under uniform attention over the sequence."""
    samples = generate_samples(task, n, seed, grid_size=processor.grid_size, hops=hops)
    model.eval()
    batch, visual_mask, attentions = _teacher_forced_attentions(model, processor, samples)
    seq_len = batch["input_ids"].shape[1]
    rows, queries, keys = [], [], []
    for b, s in enumerate(samples):
        visual_pos = visual_mask[b].nonzero().squeeze(-1)
        n_target = len(s.target.split()) + 1  # + <eos>
        first = seq_len - n_target  # position of target token 0
        for j, reads in enumerate(s.token_reads):
            for cell in reads:
                rows.append(b)
                queries.append(first + j - 1)
                keys.append(int(visual_pos[cell]))
    rows, queries, keys = map(torch.tensor, (rows, queries, keys))
    head_mean, best_head = [], []
    for attn in attentions:  # [B, H, T, T]
        mass = attn[rows, :, queries, keys]  # [reads, H]
        head_mean.append(round(mass.mean().item(), 4))
        best_head.append(round(mass.mean(0).max().item(), 4))
    return {"task": task, "reads": len(rows), "head_mean": head_mean, "best_head": best_head, "uniform": round(1 / seq_len, 4)}


def prefill_recall(model, processor, task: str, retention: float, layer: int, n: int = 200, seed: int = 4343, hops=None) -> dict:
    """FastV-style check against the oracle: keep the top ceil(retention * N) visual tokens by the
    head-mean attention of the last prompt token at ``layer`` (FastV's K - 1) and report how many
    of the cells the answer needs (``Sample.cells_needed``) survive: mean recall and the fraction
    of samples that keep all of them."""
    samples = generate_samples(task, n, seed, grid_size=processor.grid_size, hops=hops)
    model.eval()
    batch = processor([s.image for s in samples], [s.prompt for s in samples], padding_side="left")
    embeds, visual_mask = model.embed_multimodal(batch["input_ids"], batch["pixel_values"])
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    lm_config = model.language_model.config
    previous = lm_config._attn_implementation
    lm_config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, output_attentions=True)
    finally:
        lm_config._attn_implementation = previous
    attn = out.attentions[layer][:, :, -1].mean(1)  # [B, T]
    n_visual = processor.num_image_tokens
    k = max(1, int(-(-retention * n_visual // 1)))
    recall, complete = [], []
    for b, s in enumerate(samples):
        scores = attn[b][visual_mask[b]]
        kept = set(scores.topk(k).indices.tolist())
        hit = [c in kept for c in s.cells_needed]
        recall.append(sum(hit) / len(hit))
        complete.append(all(hit))
    return {"task": task, "retention": retention, "layer": layer, "k": k, "recall": sum(recall) / n, "all_kept": sum(complete) / n}
