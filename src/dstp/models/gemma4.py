"""Gemma 4 (`Gemma4ForConditionalGeneration`): a ViT with 2-D rotary and spatial pooling, an RMS-normed linear
embedder, and the Gemma 4 LM: sliding-window layers (five to one global layer in the released configs).

Kept exactly as transformers computes it (its own modules run; the adapter only routes):
- embeddings scaled by sqrt(hidden_size) (the LM's `embed_tokens`); image, video and audio placeholder ids embed
  as the pad token (image ones before the image features replace them, generated ones for good);
- RMSNorm in Gemma 4's form, q/k norms, the value norm and query scaling 1.0 (`self_attn.scaling`): the layers'
  own modules, and the probes (`query`/`key`) apply the same q/k norms;
- rotary per layer type: sliding layers (theta 10k, `head_dim`) and global layers ("proportional", theta 1M,
  `global_head_dim`, partial rotary): `rotary` returns both tables side by side and each layer takes its own;
- global layers' own K/V head count and size (`num_global_key_value_heads`, `global_head_dim`; keys are values
  with `attention_k_eq_v`, inside the module): the KV store holds each layer's shape;
- final logit soft-capping, cap * tanh(logits / cap);
- sliding layers attend within the window and, inside an image, both ways (transformers' `create_masks_for_vision_
  model`: AND(window, OR(causal, same image))): `PreparedInputs.attention_blocks`; global layers are causal.

Refused in one line, before any model work: per-layer embeddings (`hidden_size_per_layer_input` > 0) and K/V shared
across layers (`num_kv_shared_layers` > 0), the E2B/E4B checkpoints' features, which dstp's engine does not drive;
`use_bidirectional_attention="all"`; audio and video inputs.

Vision internals (VisionZip; the ViT has no CLS token), one view per image, one unit per pooled LLM token (its k x k
patches): the embedder's input (the tower's pooled output), and as the stand-in for CLS attention the mean attention
its patches receive in the last encoder layer (head mean, over the image's patches), as for Qwen; its key is its
patches' mean head-mean key (before rotary). Computed from that layer's own q/k norms and rotary, hooked."""
from __future__ import annotations

import torch

from dstp.errors import InputError, UnsupportedModelError
from dstp.models import hf_compat
from dstp.models.base import Adapter, PreparedInputs, check_image_tokens, scores_by_row, text_positions
from dstp.models.vision import VisionInternals, consecutive_slots, pad_views, received_attention


def unsupported_feature(text_config: dict) -> str | None:
    """What of a Gemma 4 text config dstp's engine cannot run, as a phrase, or None."""
    if text_config.get("hidden_size_per_layer_input"):
        return "per-layer embeddings (hidden_size_per_layer_input > 0, as in Gemma 4 E2B/E4B)"
    if text_config.get("num_kv_shared_layers"):
        return "K/V shared across layers (num_kv_shared_layers > 0, as in Gemma 4 E2B/E4B)"
    if text_config.get("use_bidirectional_attention") not in (None, "vision"):
        return f"use_bidirectional_attention={text_config['use_bidirectional_attention']!r}"
    return None


def image_blocks(visual: torch.Tensor) -> torch.Tensor:
    """[B, T] long: each run of consecutive image tokens is one block (0, 1, ... per row), -1 elsewhere (as
    transformers' `get_block_sequence_ids_for_mask`)."""
    starts = visual.clone()
    starts[:, 1:] &= ~visual[:, :-1]
    return torch.where(visual, starts.long().cumsum(-1) - 1, -1)


class Gemma4Adapter(Adapter):
    family = "gemma4"
    architectures = ("Gemma4ForConditionalGeneration",)
    model_type = "gemma4"
    example_id = "google/gemma-4-31B-it"
    config_fields = ("vision_config", "text_config", "image_token_id")
    vision_internals = True

    @classmethod
    def check_config(cls, config: dict):
        text = config.get("text_config") or {}
        feature = unsupported_feature(text if isinstance(text, dict) else text.to_dict())
        if feature is not None:
            raise UnsupportedModelError(f"dstp's Gemma 4 adapter does not support {feature}")

    def __init__(self, model, processor=None):
        self.check_config({"text_config": model.config.get_text_config().to_dict()})
        super().__init__(model, processor)
        types = self.text_config.layer_types
        self._types = sorted(set(types))  # the order of the tables `rotary` puts side by side
        widths = [self._attn(types.index(t)).head_dim for t in self._types]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        self._span = {t: (s, s + w) for t, s, w in zip(self._types, starts, widths)}

    # -- per-layer shapes and rotary -------------------------------------------------------------
    @property
    def head_dim(self) -> float:
        """The mean head size over the layers (FLOP counts; each layer's own is `kv_head_dim`)."""
        return sum(map(self.kv_head_dim, range(self.n_layers))) / self.n_layers

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads(0)

    def kv_head_dim(self, layer_idx: int) -> int:
        return self._attn(layer_idx).head_dim

    def kv_heads(self, layer_idx: int) -> int:
        return self._attn(layer_idx).k_proj.out_features // self.kv_head_dim(layer_idx)

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
        tables = [self.language_model.rotary_emb(x, position_ids, t) for t in self._types]
        return torch.cat([c for c, _ in tables], -1), torch.cat([s for _, s in tables], -1)

    def layer_rotary(self, layer_idx: int, cos, sin):
        a, b = self._span[self.text_config.layer_types[layer_idx]]
        return cos[..., a:b], sin[..., a:b]

    def run_layer(self, layer_idx: int, hidden, attention, cos, sin, cache):
        return hf_compat.call_decoder_layer(self.layers[layer_idx], hidden, attention,
                                            self.layer_rotary(layer_idx, cos, sin), cache, shared_kv_states={})

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled embeddings; image, video and audio placeholder ids embed as the pad token, wherever they occur
        (generated ones too), as transformers' forward does."""
        cfg = self.model.config
        placeholders = torch.tensor([i for i in (cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id)
                                     if i is not None], device=input_ids.device)
        ids = torch.where(torch.isin(input_ids, placeholders), self.text_config.pad_token_id, input_ids)
        return self.language_model.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        cap = self.text_config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # -- vision internals (VisionZip) --------------------------------------------------------------
    def features_and_internals(self, pixel_values, position_ids, internals: bool = True):
        """(features [n_tokens, D], VisionInternals or None), in placeholder order."""
        mm = self.model.model
        call = lambda: mm.get_image_features(pixel_values, position_ids)  # noqa: E731
        if not internals:
            return hf_compat.pooled_features(call()), None
        layer = mm.vision_tower.encoder.layers[-1]
        attn, seen = layer.self_attn, {}
        hooks = [layer.register_forward_pre_hook(lambda m, a, kw: seen.update(rope=kw["position_embeddings"]),
                                                 with_kwargs=True),
                 attn.q_norm.register_forward_hook(lambda m, a, out: seen.update(q=out)),
                 attn.k_norm.register_forward_hook(lambda m, a, out: seen.update(k=out))]
        try:
            out = call()
        finally:
            for h in hooks:
                h.remove()
        counts = [int(f.shape[0]) for f in out.pooler_output]  # pooled tokens per image
        valid = (position_ids != -1).all(-1)  # [n, P] real patches
        cos, sin = seen["rope"]
        q, k = (hf_compat.gemma4_vision_rope(seen[x], cos, sin, position_ids) for x in ("q", "k"))
        bounds = [0] + valid.sum(-1).cumsum(0).tolist()
        received = received_attention(q[valid], k[valid], bounds, attn.scaling)  # [real patches]
        keys = seen["k"][valid].float().mean(1)  # [real patches, hd]
        unit = self.patch_units(position_ids)[valid]
        split = lambda t: list(torch.split(t, [b - a for a, b in zip(bounds, bounds[1:])]))  # noqa: E731
        scores, unit_keys = [], []
        for n, u, r, kk in zip(counts, split(unit), split(received), split(keys)):
            size = torch.zeros(n, device=u.device).index_add_(0, u, torch.ones_like(r))
            scores.append(torch.zeros(n, device=u.device).index_add_(0, u, r) / size)
            unit_keys.append(torch.zeros(n, kk.shape[-1], device=u.device).index_add_(0, u, kk) / size[:, None])
        vision = VisionInternals(hidden=pad_views(list(torch.split(out.last_hidden_state, counts))),
                                 keys=pad_views(unit_keys), scores=pad_views(scores),
                                 slot=consecutive_slots(counts, pixel_values.device), project=mm.embed_vision)
        return hf_compat.pooled_features(out), vision

    def patch_units(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[n, P] the pooled token each patch is averaged into (its k x k cell, row-major over the image), as the
        tower's pooler groups them."""
        k = self.model.config.vision_config.pooling_kernel_size
        pos = position_ids.clamp(min=0)
        width = pos[..., 0].max(-1, keepdim=True).values + 1
        return pos[..., 0] // k + (width // k) * (pos[..., 1] // k)

    # -- inputs ------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, batch, vision_scores: bool = True) -> PreparedInputs:
        """Rows may hold any number of images (their features fill the placeholders in order), zero included."""
        for key, what in (("pixel_values_videos", "video"), ("input_features", "audio")):
            if batch.get(key) is not None:
                raise InputError(f"dstp's Gemma 4 adapter takes images only; these inputs hold {what} ({key})")
        cfg = self.model.config
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        visual = input_ids == cfg.image_token_id
        embeds = self.embed_tokens(input_ids)
        scores = vision = None
        if batch.get("pixel_values") is not None:
            if batch.get("image_position_ids") is None:
                raise InputError("gemma4 inputs have pixel_values but no image_position_ids: pass the processor's "
                                 "whole output")
            feats, vision = self.features_and_internals(batch["pixel_values"].to(self.device, self.dtype),
                                                        batch["image_position_ids"].to(self.device), vision_scores)
            check_image_tokens(input_ids, cfg.image_token_id, feats.shape[0])
            scores = None if vision is None else vision.token_scores(feats.shape[0])
            embeds = embeds.masked_scatter(visual[..., None], feats.to(embeds.dtype))
        else:
            check_image_tokens(input_ids, cfg.image_token_id, 0)
        bidirectional = self.text_config.use_bidirectional_attention == "vision"
        return PreparedInputs(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=text_positions(mask),
            next_position=mask.long().sum(-1),
            visual_mask=visual,
            vision_scores=None if scores is None else scores_by_row(visual, scores),
            input_ids=input_ids,
            vision=vision,
            attention_blocks=image_blocks(visual) if bidirectional and bool(visual.any()) else None,
        )
