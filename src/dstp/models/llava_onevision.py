"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP vision tower (no CLS token, every patch
fed to the LLM), LLaVA-NeXT's anyres packing with a Qwen2 LM and 1-D positions. Two differences from LLaVA-NeXT,
both inside transformers' own `get_image_features`, which does the packing:
  * a row with several images gets one view per image (no crops) plus one newline token; a row with one image
    gets the anyres crops (the processor's `batch_num_images` says which);
  * `vision_aspect_ratio` ("anyres_max_9"): an image whose unpadded crop features exceed that many views is
    downsampled (bilinear) before the newlines are added.

Vision internals (VisionZip): one view per crop as LLaVA-NeXT's, one unit per patch. SigLIP has no CLS query, so
a patch's score is the attention it receives at the feature layer (head mean, averaged over its view's queries),
the stand-in dstp uses for Qwen's CLS-less ViT too. A token that the aspect-ratio downsampling blends from several
patches has no unit: VisionZip refuses such an image (one line) instead of merging in a space the model never saw."""
from __future__ import annotations

import torch

from dstp.errors import InputError
from dstp.models.llava_next import LlavaNextAdapter
from dstp.models.vision import received_attention


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    model_type = "llava_onevision"
    example_id = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"

    def vision_kwargs(self, batch) -> dict:
        kwargs = super().vision_kwargs(batch)
        if batch.get("batch_num_images") is not None:  # as the model's forward passes it
            kwargs["batch_num_images"] = batch["batch_num_images"]
        return kwargs

    @staticmethod
    @torch.no_grad()
    def cls_attention(attn, x: torch.Tensor) -> torch.Tensor:
        """[n_views, S] float32: the head-mean attention each patch receives, averaged over its view's queries (SigLIP
        has no CLS token), from the layer's q/k projections of its normed input `x` [n_views, S, D]."""
        n, S, _ = x.shape
        q = attn.q_proj(x).reshape(n * S, attn.num_heads, -1)
        k = attn.k_proj(x).reshape(n * S, attn.num_heads, -1)
        return received_attention(q, k, list(range(0, n * S + 1, S)), attn.scale).view(n, S)

    def unit_slots(self, n_views: int, n_units: int, image_sizes=None, batch_num_images=None) -> torch.Tensor:
        """[views, patches]: the visual token each patch fills, by the model's own packing: a two-channel index map
        (unit id, its square) goes through `pack_image_features`; a token where the two disagree is a blend of
        several patches (aspect-ratio downsampling), which VisionZip refuses."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        if batch_num_images is None:  # as transformers: every image gets its crops
            patched = [True] * len(image_sizes)
        else:  # only a row's only image does
            patched = [n == 1 for n in batch_num_images.tolist() for _ in range(n)]
        per_image = [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                     if crops else 1 for size, crops in zip(image_sizes, patched)]
        ids = torch.arange(1, n_views * n_units + 1, device=self.device, dtype=torch.float64)
        index = torch.stack([ids, ids * ids], -1).view(n_views, n_units, 2)
        packed, _ = self.model.model.pack_image_features(list(torch.split(index, per_image, dim=0)), image_sizes,
                                                         image_newline=ids.new_zeros(2),
                                                         vision_aspect_ratio=cfg.vision_aspect_ratio)
        for image, tokens in enumerate(packed):  # [tokens, 2]: (unit index + 1, its square), zeros on newlines
            if bool(((tokens[:, 1] - tokens[:, 0] ** 2).abs() > 1e-6 * tokens[:, 1].clamp(min=1)).any()):
                h, w = (int(v) for v in image_sizes[image])
                raise InputError(f"llava_onevision cannot give VisionZip the encoder internals of a {w}x{h} image: "
                                 f"the model downsamples its crop features ({cfg.vision_aspect_ratio}), so its tokens "
                                 f"blend several patches; use smaller images or another pruner")
        packed = torch.cat(packed, dim=0)
        unit = packed[:, 0].round().long()
        slot = torch.full((n_views * n_units + 1,), -1, dtype=torch.long, device=self.device)
        slot[unit] = torch.arange(unit.numel(), device=self.device)
        return slot[1:].view(n_views, n_units)
