"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): window-attention ViT, patch merger, Qwen2 LM with
3-axis M-RoPE. Image tokens get (t, h, w) positions; text continues after the image's largest one, and
decoding continues from `max position + 1` (transformers' rope delta)."""
from __future__ import annotations

import torch

from dstp.errors import InputError
from dstp.models.base import Adapter, PreparedInputs, check_image_tokens


class Qwen25VLAdapter(Adapter):
    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_type = "qwen2_5_vl"
    example_id = "Qwen/Qwen2.5-VL-3B-Instruct"

    def image_features(self, pixel_values, image_grid_thw) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        feats = out.pooler_output
        return torch.cat(list(feats), dim=0) if not torch.is_tensor(feats) else feats

    def prepare(self, batch) -> PreparedInputs:
        cfg = self.model.config
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        if batch.get("pixel_values") is None or batch.get("image_grid_thw") is None:
            raise InputError("Qwen2.5-VL inputs need pixel_values and image_grid_thw: pass an image with every prompt")
        grid = batch["image_grid_thw"].to(self.device)
        feats = self.image_features(batch["pixel_values"].to(self.device, self.dtype), grid)
        check_image_tokens(input_ids, cfg.image_token_id, feats.shape[0])
        visual = input_ids == cfg.image_token_id
        embeds = self.embed_tokens(input_ids).masked_scatter(visual[..., None], feats.to(self.dtype))
        position_ids, deltas = self.rope_index(input_ids, visual, grid, mask)
        return PreparedInputs(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            next_position=mask.long().sum(-1) + deltas.reshape(-1),
            visual_mask=visual,
        )

    def rope_index(self, input_ids, visual, grid, mask):
        return self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=visual.int(), image_grid_thw=grid, attention_mask=mask.long()
        )

    def decode_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[None, :, None].expand(3, -1, 1)
