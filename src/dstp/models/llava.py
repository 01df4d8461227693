"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP vision tower, MLP projector, Llama LM, 1-D RoPE.

Vision internals (VisionZip, `features_and_internals`): per image, the CLIP layer that produces the vision feature
layer gives each patch's CLS attention (head mean) and head-mean key, the projector's input gives its features,
and the feature layer's CLS row is kept for VisionZip to feed to the LLM; `vision_scores` is the CLS attention."""
from __future__ import annotations

import torch

from dstp.models import hf_compat
from dstp.models.base import Adapter, PreparedInputs, check_image_tokens, scores_by_row, text_positions
from dstp.models.vision import VisionInternals, cls_attention, consecutive_slots, head_mean_keys


class LlavaAdapter(Adapter):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    model_type = "llava"
    example_id = "llava-hf/llava-1.5-7b-hf"
    vision_internals = True
    config_fields = ("vision_config", ("image_token_index", "image_token_id"), "vision_feature_layer",
                     "vision_feature_select_strategy")

    def vision_call(self, pixel_values: torch.Tensor, **vision_kwargs):
        """transformers' own image-feature call (its output keeps the tower's hidden states)."""
        cfg = self.model.config
        return self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            **vision_kwargs,
        )

    @staticmethod
    def flat_features(out) -> torch.Tensor:
        return hf_compat.pooled_features(out)

    def image_features(self, pixel_values: torch.Tensor, **vision_kwargs) -> torch.Tensor:
        return self.flat_features(self.vision_call(pixel_values, **vision_kwargs))

    @property
    def projector(self):
        return self.model.model.multi_modal_projector

    def features_and_internals(self, pixel_values: torch.Tensor, internals: bool = True, **vision_kwargs):
        """(features [n_tokens, D], VisionInternals or None), in placeholder order. One view per image (LLaVA-NeXT:
        per crop), one unit per patch: the projector's input, the feature layer's head-mean keys and CLS attention
        (from that layer's q/k projections of its normed input, captured with a hook so the tower keeps its own
        attention implementation), and the CLS token's features, which the LLM does not see."""
        if not internals:
            return self.image_features(pixel_values, **vision_kwargs), None
        norm, attn = self.attention_parts(self.score_layer())
        seen = {}
        hooks = [norm.register_forward_hook(lambda mod, args, out: seen.update(x=out)),
                 self.projector.register_forward_pre_hook(lambda mod, args: seen.update(units=args[0]))]
        try:
            out = self.vision_call(pixel_values, **vision_kwargs)
        finally:
            for h in hooks:
                h.remove()
        scores, keys = self.cls_attention(attn, seen["x"]), head_mean_keys(attn, seen["x"])
        units = seen["units"]  # [views, units, U]
        scores, keys = self.unit_layout(scores[..., None])[..., 0], self.unit_layout(keys)
        slot = self.unit_slots(units.shape[0], units.shape[1], **vision_kwargs)
        vision = VisionInternals(hidden=units, keys=keys, scores=scores.float(), slot=slot, project=self.projector,
                                 cls=self.cls_features(out))
        return self.flat_features(out), vision

    def unit_layout(self, per_token: torch.Tensor) -> torch.Tensor:
        """[views, S, ...] per encoder token -> per unit: the patches (the CLS token is not a visual token)."""
        return per_token[:, 1:] if self.model.config.vision_feature_select_strategy == "default" else per_token

    def unit_slots(self, n_views: int, n_units: int, **vision_kwargs) -> torch.Tensor:
        """[views, units]: LLaVA's image tokens are its patches, image after image."""
        return consecutive_slots([n_units] * n_views, self.device)

    def cls_features(self, out) -> torch.Tensor | None:
        """[views, U] the CLS token at the feature layer(s), as the projector would read it; None when the
        select strategy already feeds it to the LLM."""
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "default" or out.hidden_states is None:
            return None
        layers = [cfg.vision_feature_layer] if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer
        return torch.cat([out.hidden_states[i][:, 0] for i in layers], dim=-1)

    def vision_kwargs(self, batch) -> dict:
        """Extra processor outputs the vision call needs (none for LLaVA-1.5)."""
        return {}

    def vision_layers(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    @staticmethod
    def attention_parts(layer):
        """(the norm whose output the layer's attention reads, the attention module) of a CLIP layer."""
        return layer.layer_norm1, layer.self_attn

    def score_layer(self):
        """The vision layer whose output is the vision feature layer (the last one when several are used)."""
        layers = self.vision_layers()
        fl = self.model.config.vision_feature_layer
        fl = fl if isinstance(fl, int) else fl[-1]
        return layers[max(fl % (len(layers) + 1) - 1, 0)]  # hidden_states[j] is layer j-1's output

    @staticmethod
    @torch.no_grad()
    def cls_attention(attn, x: torch.Tensor) -> torch.Tensor:
        """Head-mean softmax attention [n_images, S] of the CLS query on every token, from the layer's
        q/k projections of its normed input `x` [n_images, S, D] (vision attention has no mask). InternViT's
        optional q/k RMSNorm runs over all heads before they are split, as here."""
        n, S, _ = x.shape
        q, k = attn.q_proj(x[:, 0]), attn.k_proj(x)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return cls_attention(q.view(n, attn.num_heads, -1), k.view(n, S, attn.num_heads, -1), attn.scale)

    @torch.no_grad()
    def prepare(self, batch, vision_scores: bool = True) -> PreparedInputs:
        """Rows may hold any number of images (their features fill the placeholders in order), zero included."""
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        image_token = self.model.config.image_token_id
        visual = input_ids == image_token
        embeds = self.embed_tokens(input_ids)
        scores = vision = None
        if batch.get("pixel_values") is not None:
            feats, vision = self.features_and_internals(batch["pixel_values"].to(self.device), vision_scores,
                                                        **self.vision_kwargs(batch))
            check_image_tokens(input_ids, image_token, feats.shape[0])
            scores = None if vision is None else vision.token_scores(feats.shape[0])
            embeds = embeds.masked_scatter(visual[..., None], feats.to(embeds.dtype))
        else:
            check_image_tokens(input_ids, image_token, 0)
        return PreparedInputs(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=text_positions(mask),
            next_position=mask.long().sum(-1),
            visual_mask=visual,
            vision_scores=None if scores is None else scores_by_row(visual, scores),
            input_ids=input_ids,
            vision=vision,
        )
