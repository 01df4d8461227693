"""Greedy decoding and exact-answer accuracy on fresh ShiftBench samples."""

from __future__ import annotations

from collections import defaultdict

import torch

from dstp.config import check_retention
from dstp.errors import ConfigError
from dstp.lab.shiftbench.symbols import parse_cell_name
from dstp.lab.shiftbench.tasks import check_answer, generate_samples

PRUNED_METHODS = ("fastv", "random", "prompt_oracle")


def _check_n(n: int) -> None:
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")


def _check_layer(model, layer: int, lowest: int = 0) -> None:
    layers = len(model.language_model.layers)
    if not lowest <= layer < layers:
        raise ConfigError(f"layer {layer} is outside {lowest}..{layers - 1} (the model has {layers} layers)")


def _banned_ids(processor) -> torch.Tensor:
    """Tokens greedy decoding never emits: <image> (it has no pixels), <bos>, <pad>."""
    tok = processor.tokenizer
    return torch.tensor([processor.image_token_id, tok.bos_token_id, tok.pad_token_id])


@torch.no_grad()
def greedy_generate(model, processor, samples, max_new_tokens: int | None = None, batch_size: int = 250) -> list[str]:
    """Plain greedy decoding with the HF KV cache (left padding, positions = cumsum(mask) - 1).
    <image>, <bos> and <pad> are never emitted."""
    if max_new_tokens is None:
        max_new_tokens = max(2 * s.hops for s in samples) + 8 if samples else 0
    eos = processor.tokenizer.eos_token_id
    banned = _banned_ids(processor)
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
            nxt = logits.index_fill(-1, banned, float("-inf")).argmax(-1)
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
    _check_n(n)
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
    _, visual_mask, attentions = _prompt_attentions(model, batch)
    return batch, visual_mask, attentions


def lookup_attention_profile(model, processor, task: str = "walk", n: int = 64, seed: int = 4242, hops=None) -> dict:
    """Where the model reads the image: for every target token that must read a cell
    (``Sample.token_reads``), the attention of the position that predicts it (the token before it,
    teacher forced) on that cell's visual token, per layer: head mean and the best head's mean.
    ``uniform`` is the mass one visual token would get under uniform attention over the sequence."""
    _check_n(n)
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
    _check_n(n)
    check_retention(retention)
    _check_layer(model, layer)
    samples = generate_samples(task, n, seed, grid_size=processor.grid_size, hops=hops)
    model.eval()
    batch = processor([s.image for s in samples], [s.prompt for s in samples], padding_side="left")
    with torch.no_grad():
        _, visual_mask, attentions = _prompt_attentions(model, batch)
    attn = attentions[layer][:, :, -1].mean(1)  # [B, T]
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


def _layer_stack(model, embeds, pos, masks):
    """Run the decoder layers with one additive 4-D mask per layer; logits of every position."""
    lm = model.language_model
    position_embeddings = lm.rotary_emb(embeds, pos)
    hidden = embeds
    for layer, mask in zip(lm.layers, masks):
        out = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=position_embeddings)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(lm.norm(hidden))


@torch.no_grad()
def pruned_accuracy(model, processor, task: str, retention: float, prune_layer: int, method: str = "fastv", n: int = 100, seed: int = 4545, hops=None) -> float:
    """Exact-answer accuracy when visual tokens are pruned once at prefill (a small simulation for
    the model card, not the dstp engine): from layer ``prune_layer`` on, only the kept visual
    tokens can be attended, by prompt and generated tokens alike. ``method``: ``fastv`` keeps the
    top-k by the last prompt token's head-mean attention at layer ``prune_layer - 1``;
    ``random`` keeps a random k; ``prompt_oracle`` keeps the cells the prompt names, then random
    ones (what a pruner that knew the question's cells could keep at prefill). Greedy, no cache (every step recomputes the sequence)."""
    _check_n(n)
    check_retention(retention)
    if method not in PRUNED_METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(PRUNED_METHODS)}")
    _check_layer(model, prune_layer, lowest=1 if method == "fastv" else 0)
    samples = generate_samples(task, n, seed, grid_size=processor.grid_size, hops=hops)
    model.eval()
    batch = processor([s.image for s in samples], [s.prompt for s in samples], padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    _, visual_mask = model.embed_multimodal(ids, batch["pixel_values"])
    n_visual = processor.num_image_tokens
    k = max(1, int(-(-retention * n_visual // 1)))
    if method == "fastv":
        _, _, attentions = _prompt_attentions(model, batch)
        scores = attentions[prune_layer - 1][:, :, -1].mean(1)  # [B, T]
        scores = scores.masked_fill(~visual_mask, -1.0)
        keep_pos = scores.topk(k, dim=-1).indices
    elif method == "random":
        gen = torch.Generator().manual_seed(seed)
        keep_pos = torch.stack([row.nonzero().squeeze(-1)[torch.randperm(n_visual, generator=gen)[:k]] for row in visual_mask])
    else:  # prompt_oracle: the cells the prompt names, then random ones up to k
        gen = torch.Generator().manual_seed(seed)
        rows = []
        for row, s in zip(visual_mask, samples):
            named = [r * processor.grid_size + c for r, c in filter(None, map(parse_cell_name, s.prompt.split()))]
            rest = [int(i) for i in torch.randperm(n_visual, generator=gen) if int(i) not in named]
            rows.append(row.nonzero().squeeze(-1)[torch.tensor((named + rest)[:k])])
        keep_pos = torch.stack(rows)
    dropped = visual_mask.clone()
    dropped.scatter_(1, keep_pos, False)  # visual tokens that are pruned
    eos = processor.tokenizer.eos_token_id
    max_new = max(s.hops for s in samples) + 4 if task == "walk" else 8
    pixels = batch["pixel_values"]
    generated = torch.empty(len(samples), 0, dtype=torch.long)
    done = torch.zeros(len(samples), dtype=torch.bool)
    neg = torch.finfo(torch.float32).min
    for _ in range(max_new):
        full_ids = torch.cat([ids, generated], 1)
        full_mask = torch.cat([mask, torch.ones_like(generated)], 1)
        t = full_ids.shape[1]
        drop = torch.cat([dropped, torch.zeros_like(generated, dtype=torch.bool)], 1)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        base = causal[None] & full_mask.bool()[:, None, :]
        pruned = base & ~drop[:, None, :]
        masks = [
            torch.zeros(base.shape).masked_fill(~(pruned if i >= prune_layer else base), neg)[:, None]
            for i in range(len(model.language_model.layers))
        ]
        embeds, _ = model.embed_multimodal(full_ids, pixels)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = _layer_stack(model, embeds, pos, masks)[:, -1]
        nxt = logits.index_fill(-1, _banned_ids(processor), float("-inf")).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        done |= nxt == eos
        generated = torch.cat([generated, nxt[:, None]], 1)
        if bool(done.all()):
            break
    texts = []
    for row in generated.tolist():
        texts.append(processor.decode(row[: row.index(eos)] if eos in row else row))
    return sum(check_answer(s, t) for s, t in zip(samples, texts)) / len(samples)


def _prompt_attentions(model, batch):
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
    return embeds, visual_mask, out.attentions
