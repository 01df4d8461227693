"""InternVL3.5 in transformers' format (`InternVLForConditionalGeneration`): InternViT on each image tile,
pixel shuffle, MLP projector, Qwen3 LM (q/k norm, applied by the base adapter's probes) with 1-D RoPE.
An image may span several tiles: `pixel_values` is `[tiles, 3, H, W]` and every tile fills
`image_seq_length` placeholder tokens, in order."""
from __future__ import annotations

import torch

from dstp.models.llava import LlavaAdapter


class InternVLAdapter(LlavaAdapter):
    """Same feature call and 1-D positions as LLaVA; InternViT has no CLS attention to offer VisionZip."""

    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    model_type = "internvl"
    example_id = "OpenGVLab/InternVL3_5-8B-HF"

    def features_and_scores(self, pixel_values: torch.Tensor):
        return self.image_features(pixel_values), None  # [tiles * tokens per tile, D]
