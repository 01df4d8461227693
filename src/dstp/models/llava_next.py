"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): anyres. Each image is a base view plus a grid
of crops chosen from `image_grid_pinpoints` by its size; the crops' features are unpadded to the image's aspect
ratio and a newline embedding ends every row, so the number of visual tokens differs per image. The LM and its
1-D positions are LLaVA's; transformers' own `get_image_features` does the packing."""
from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from dstp.errors import InputError
from dstp.models.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    model_type = "llava_next"
    example_id = "llava-hf/llava-v1.6-mistral-7b-hf"

    def vision_kwargs(self, batch) -> dict:
        if batch.get("image_sizes") is None:
            raise InputError("llava_next inputs need image_sizes (from the processor) to lay out the anyres crops")
        return {"image_sizes": batch["image_sizes"].to(self.device)}

    def token_scores(self, patch_scores: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """[crops, patches] CLS attention -> one score per visual token, laid out by the model's own anyres
        packing (unpadding included); the newline tokens score 0."""
        cfg = self.model.config
        per_image = [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                     for size in image_sizes]
        crops = torch.split(patch_scores[..., None], per_image, dim=0)
        newline = patch_scores.new_zeros(1)
        packed, _ = self.model.model.pack_image_features(list(crops), image_sizes,
                                                         cfg.vision_feature_select_strategy, image_newline=newline)
        return torch.cat(packed, dim=0).flatten()
