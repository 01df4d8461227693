"""InternVL3.5 in transformers' format (`InternVLForConditionalGeneration`): InternViT on each image tile,
pixel shuffle, MLP projector, Qwen3 LM (q/k norm, applied by the base adapter's probes) with 1-D RoPE.
An image may span several tiles: `pixel_values` is `[tiles, 3, H, W]` and every tile fills
`image_seq_length` placeholder tokens, in order."""
from __future__ import annotations

import torch

from dstp.errors import InputError
from dstp.models.base import Adapter, PreparedInputs, check_image_tokens, text_positions


class InternVLAdapter(Adapter):
    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    model_type = "internvl"
    example_id = "OpenGVLab/InternVL3_5-8B-HF"

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output  # [tiles, tokens per tile, D]
        return out.flatten(0, 1)

    @torch.no_grad()
    def prepare(self, batch) -> PreparedInputs:
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        if batch.get("pixel_values") is None:
            raise InputError("InternVL inputs have no pixel_values: pass an image with every prompt")
        feats = self.image_features(batch["pixel_values"].to(self.device))
        image_token = self.model.config.image_token_id
        check_image_tokens(input_ids, image_token, feats.shape[0])
        visual = input_ids == image_token
        embeds = self.embed_tokens(input_ids).masked_scatter(visual[..., None], feats.to(self.dtype))
        return PreparedInputs(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=text_positions(mask),
            next_position=mask.long().sum(-1),
            visual_mask=visual,
        )
