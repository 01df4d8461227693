"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP vision tower, MLP projector, Llama LM, 1-D RoPE.

Vision scores (VisionZip): the CLS token's head-mean attention on each patch in the CLIP layer that
produces the vision feature layer, from that layer's q/k projections (captured with a hook on its
input norm, so the tower keeps its own attention implementation)."""
from __future__ import annotations

import torch

from dstp.models.base import Adapter, PreparedInputs, check_image_tokens, scores_by_row, text_positions


class LlavaAdapter(Adapter):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    model_type = "llava"
    example_id = "llava-hf/llava-1.5-7b-hf"

    def image_features(self, pixel_values: torch.Tensor, **vision_kwargs) -> torch.Tensor:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            **vision_kwargs,
        ).pooler_output
        return torch.cat(list(out), dim=0) if not torch.is_tensor(out) else out.flatten(0, 1)

    def features_and_scores(self, pixel_values: torch.Tensor, scores: bool = True, **vision_kwargs):
        """(features [n_tokens, D], CLS-attention vision scores [n_tokens] or None), in placeholder order."""
        if not scores:
            return self.image_features(pixel_values, **vision_kwargs), None
        layer = self.score_layer()
        norm, attn = self.attention_parts(layer)
        seen = {}
        hook = norm.register_forward_hook(lambda mod, args, out: seen.update(x=out))
        try:
            feats = self.image_features(pixel_values, **vision_kwargs)
        finally:
            hook.remove()
        cls = self.cls_attention(attn, seen["x"])
        if self.model.config.vision_feature_select_strategy == "default":
            cls = cls[:, 1:]  # the CLS token itself is not a visual token
        return feats, self.token_scores(cls, **vision_kwargs)

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

    def token_scores(self, patch_scores: torch.Tensor, **vision_kwargs) -> torch.Tensor:
        """[images, patches] -> [n_tokens]: LLaVA's projector keeps one token per patch."""
        return patch_scores.flatten()

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
        q, k = attn.q_proj(x[:, :1]), attn.k_proj(x)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q.view(n, 1, attn.num_heads, -1).transpose(1, 2).float()
        k = k.view(n, S, attn.num_heads, -1).transpose(1, 2).float()
        return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(1)[:, 0]

    @torch.no_grad()
    def prepare(self, batch, vision_scores: bool = True) -> PreparedInputs:
        """Rows may hold any number of images (their features fill the placeholders in order), zero included."""
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        image_token = self.model.config.image_token_id
        visual = input_ids == image_token
        embeds = self.embed_tokens(input_ids)
        scores = None
        if batch.get("pixel_values") is not None:
            feats, scores = self.features_and_scores(batch["pixel_values"].to(self.device), vision_scores,
                                                     **self.vision_kwargs(batch))
            check_image_tokens(input_ids, image_token, feats.shape[0])
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
        )
