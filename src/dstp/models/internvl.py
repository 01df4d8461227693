"""InternVL3.5 in transformers' format (`InternVLForConditionalGeneration`): InternViT on each image tile,
pixel shuffle, MLP projector, Qwen3 LM (q/k norm, applied by the base adapter's probes) with 1-D RoPE.
An image may span several tiles: `pixel_values` is `[tiles, 3, H, W]` and every tile fills
`image_seq_length` placeholder tokens, in order."""
from __future__ import annotations

import torch

from dstp.models.llava import LlavaAdapter


class InternVLAdapter(LlavaAdapter):
    """Same feature call, 1-D positions and vision internals as LLaVA, one view per tile: a unit is one LLM token,
    the pixel-shuffled group of patches the projector reads; its CLS attention and key are its patches' mean."""

    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    model_type = "internvl"
    example_id = "OpenGVLab/InternVL3_5-8B-HF"
    config_fields = ("vision_config", "text_config", ("image_token_id", "image_token_index"), "downsample_ratio")

    def vision_layers(self):
        return self.model.model.vision_tower.encoder.layer

    @staticmethod
    def attention_parts(layer):
        return layer.layernorm_before, layer.attention

    def unit_layout(self, per_token: torch.Tensor) -> torch.Tensor:
        """[tiles, 1 + patches, C] -> [tiles, tokens per tile, C]: CLS dropped, then each LLM token's patches (the
        model's own pixel shuffle groups them) averaged."""
        patches = per_token[:, 1:]
        side = int(patches.shape[1] ** 0.5)
        grid = patches.reshape(patches.shape[0], side, side, -1)
        groups = self.model.model.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio)
        C = patches.shape[-1]
        return groups.reshape(patches.shape[0], -1, groups.shape[-1] // C, C).mean(2)

    def cls_features(self, out):
        return None  # the projector reads pixel-shuffled groups of patches: InternViT's CLS has no place there
