"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): anyres. Each image is a base view plus a grid
of crops chosen from `image_grid_pinpoints` by its size; the crops' features are unpadded to the image's aspect
ratio and a newline embedding ends every row, so the number of visual tokens differs per image. The LM and its
1-D positions are LLaVA's; transformers' own `get_image_features` does the packing.

Vision internals: one view per crop (base view first), as LLaVA's per image; each patch's slot comes from the
model's own packing, so patches cut by unpadding fill no visual token and newline tokens have no unit."""
from __future__ import annotations

import torch

from dstp.errors import InputError
from dstp.models.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    model_type = "llava_next"
    example_id = "llava-hf/llava-v1.6-mistral-7b-hf"
    config_fields = LlavaAdapter.config_fields + ("image_grid_pinpoints",)

    def vision_kwargs(self, batch) -> dict:
        if batch.get("image_sizes") is None:
            raise InputError("llava_next inputs need image_sizes (from the processor) to lay out the anyres crops")
        return {"image_sizes": batch["image_sizes"].to(self.device)}

    def unit_slots(self, n_views: int, n_units: int, image_sizes=None) -> torch.Tensor:
        """[crops, patches]: the visual token each crop patch fills, by the model's own anyres packing (unpadding
        included): an index map goes through `pack_image_features`; patches cut by unpadding fill none (-1)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        per_image = [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                     for size in image_sizes]
        ids = torch.arange(1, n_views * n_units + 1, device=self.device, dtype=torch.float64)
        crops = torch.split(ids.view(n_views, n_units, 1), per_image, dim=0)
        packed, _ = self.model.model.pack_image_features(list(crops), image_sizes,
                                                         cfg.vision_feature_select_strategy,
                                                         image_newline=ids.new_zeros(1))
        packed = torch.cat(packed, dim=0).flatten().long()  # unit index + 1 per visual token, 0 on newlines
        slot = torch.full((n_views * n_units + 1,), -1, dtype=torch.long, device=self.device)
        slot[packed] = torch.arange(packed.numel(), device=self.device)
        return slot[1:].view(n_views, n_units)
