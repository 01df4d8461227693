"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): ViT with DeepStack mergers, Qwen3 LM (q/k norm) with
interleaved 3-axis M-RoPE. Positions and rope deltas come from transformers' `get_rope_index`, as in
Qwen2.5-VL; the text rotary embedding already interleaves the t/h/w frequencies into cos/sin `[B, T, hd]`.

DeepStack: the vision tower also returns features from a few intermediate blocks; transformers adds the
i-th of them to the hidden states at the visual positions after LLM layer i. We keep them in prompt-index
space (`extras["deepstack"]` `[n, B, T, D]`, zero off the visual positions) and add them in `after_layer`
to whichever visual tokens are present, found by their original prompt index."""
from __future__ import annotations

import torch

from dstp.errors import InputError
from dstp.models.base import PreparedInputs, check_image_tokens
from dstp.models.qwen2_5_vl import Qwen25VLAdapter


class Qwen3VLAdapter(Qwen25VLAdapter):
    family = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    model_type = "qwen3_vl"
    example_id = "Qwen/Qwen3-VL-4B-Instruct"

    @torch.no_grad()
    def prepare(self, batch) -> PreparedInputs:
        cfg = self.model.config
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        if batch.get("pixel_values") is None or batch.get("image_grid_thw") is None:
            raise InputError("Qwen3-VL inputs need pixel_values and image_grid_thw: pass an image with every prompt")
        grid = batch["image_grid_thw"].to(self.device)
        out = self.model.model.get_image_features(pixel_values=batch["pixel_values"].to(self.device, self.dtype),
                                                  image_grid_thw=grid)
        feats = torch.cat(list(out.pooler_output), dim=0).to(self.dtype)
        check_image_tokens(input_ids, cfg.image_token_id, feats.shape[0])
        visual = input_ids == cfg.image_token_id
        embeds = self.embed_tokens(input_ids).masked_scatter(visual[..., None], feats)
        deepstack = embeds.new_zeros(len(out.deepstack_features), *embeds.shape)
        if len(out.deepstack_features):
            deepstack[:, visual] = torch.stack(list(out.deepstack_features)).to(self.dtype)
        position_ids, deltas = self.rope_index(input_ids, visual, grid, mask)
        return PreparedInputs(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            next_position=mask.long().sum(-1) + deltas.reshape(-1),
            visual_mask=visual,
            extras={"deepstack": deepstack},
        )

    def after_layer(self, layer_idx, hidden, token_index, prepared_extras):
        deepstack = prepared_extras.get("deepstack")
        if token_index is None or deepstack is None or layer_idx >= deepstack.shape[0]:
            return hidden  # generated tokens (token_index None) get no DeepStack features
        present = token_index >= 0
        index = token_index.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1])
        feats = deepstack[layer_idx].gather(1, index)
        return hidden + torch.where(present[..., None], feats, 0.0)
