"""InternVL3.5 in transformers' format (`InternVLForConditionalGeneration`): InternViT on each image tile,
pixel shuffle, MLP projector, Qwen3 LM (q/k norm, applied by the base adapter's probes) with 1-D RoPE.
An image may span several tiles: `pixel_values` is `[tiles, 3, H, W]` and every tile fills
`image_seq_length` placeholder tokens, in order."""
from __future__ import annotations

import torch

from dstp.models.llava import LlavaAdapter


class InternVLAdapter(LlavaAdapter):
    """Same feature call, 1-D positions and VisionZip scores as LLaVA: InternViT's CLS attention at the
    feature layer, here averaged over the patches that pixel shuffle folds into each LLM token."""

    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    model_type = "internvl"
    example_id = "OpenGVLab/InternVL3_5-8B-HF"

    def vision_layers(self):
        return self.model.model.vision_tower.encoder.layer

    @staticmethod
    def attention_parts(layer):
        return layer.layernorm_before, layer.attention

    def token_scores(self, patch_scores: torch.Tensor, **vision_kwargs) -> torch.Tensor:
        """[tiles, patches] -> [tiles * tokens per tile], by the model's own pixel shuffle."""
        side = int(patch_scores.shape[1] ** 0.5)
        grid = patch_scores.reshape(patch_scores.shape[0], side, side, 1)
        groups = self.model.model.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio)
        return groups.mean(-1).flatten()
