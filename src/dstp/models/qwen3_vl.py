"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): ViT with DeepStack mergers, Qwen3 LM (q/k norm) with
interleaved 3-axis M-RoPE. Positions and rope deltas come from transformers' `get_rope_index`, as in
Qwen2.5-VL; the text rotary embedding already interleaves the t/h/w frequencies into cos/sin `[B, T, hd]`.

DeepStack: the vision tower also returns features from a few intermediate blocks; transformers adds the
i-th of them to the hidden states at the visual positions after LLM layer i. We keep them in prompt-index
space (`extras["deepstack"]` `[n, B, T, D]`, zero off the visual positions) and add them in `after_layer`
to whichever visual tokens are present, found by their original prompt index."""
from __future__ import annotations

import torch

from dstp.models import hf_compat
from dstp.models.base import check_image_tokens
from dstp.models.qwen2_5_vl import Qwen25VLAdapter


class Qwen3VLAdapter(Qwen25VLAdapter):
    family = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    model_type = "qwen3_vl"
    example_id = "Qwen/Qwen3-VL-4B-Instruct"
    config_fields = ("vision_config", "text_config", "image_token_id")

    def visual_inputs(self, pixel_values, grid, visual, embeds, internals: bool = True, video: bool = False):
        # vision internals as for Qwen2.5-VL (no window reordering: every Qwen3-VL ViT block attends over the whole
        # image); the DeepStack mergers read other blocks and are left as they are
        call = self.vision_call(pixel_values, grid, video)
        out, vision = self.with_internals(call, grid) if internals else (call(), None)
        feats = hf_compat.pooled_features(out)
        check_image_tokens(visual.long(), 1, feats.shape[0])
        layers = hf_compat.deepstack_features(out)
        deepstack = embeds.new_zeros(len(layers), *embeds.shape)
        if layers:
            deepstack[:, visual] = torch.stack(layers).to(embeds.dtype)
        return feats, vision, {"deepstack": deepstack}

    def after_layer(self, layer_idx, hidden, token_index, prepared_extras):
        deepstack = prepared_extras.get("deepstack")
        if token_index is None or deepstack is None or layer_idx >= deepstack.shape[0]:
            return hidden  # generated tokens (token_index None) get no DeepStack features
        present = token_index >= 0
        index = token_index.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1])
        feats = deepstack[layer_idx].gather(1, index)
        return hidden + torch.where(present[..., None], feats, 0.0)
