"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP vision tower, MLP projector, Llama LM, 1-D RoPE."""
from __future__ import annotations

import torch

from dstp.errors import InputError
from dstp.models.base import Adapter, PreparedInputs, check_image_tokens


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions that skip left padding, as transformers' generate() builds them."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(~attention_mask, 0)


class LlavaAdapter(Adapter):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    model_type = "llava"
    example_id = "llava-hf/llava-1.5-7b-hf"

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output
        return torch.cat(list(out), dim=0) if not torch.is_tensor(out) else out.flatten(0, 1)

    def prepare(self, batch) -> PreparedInputs:
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        if "pixel_values" not in batch or batch["pixel_values"] is None:
            raise InputError("LLaVA inputs have no pixel_values: pass an image with every prompt")
        feats = self.image_features(batch["pixel_values"].to(self.device))
        image_token = self.model.config.image_token_id
        check_image_tokens(input_ids, image_token, feats.shape[0])
        visual = input_ids == image_token
        embeds = self.embed_tokens(input_ids)
        embeds = embeds.masked_scatter(visual[..., None], feats.to(embeds.dtype))
        return PreparedInputs(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=text_positions(mask),
            next_position=mask.long().sum(-1),
            visual_mask=visual,
        )
