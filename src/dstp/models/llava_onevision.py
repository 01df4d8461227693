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
patches has no unit: VisionZip refuses such an image (one line) instead of merging in a space the model never saw.

Video (transformers' `get_video_features`): every input frame is one SigLIP view (no crops), its projected
features pooled 2x2 (bilinear) to ceil(g/2)^2 tokens in raster order, frame after frame, and one newline token
ends each video. The newline belongs to no frame (`VideoLayout` marks it off video, as an image token). A pooled
token blends up to four patches, so VisionZip on a video is refused (one line), as for a downsampled image."""
from __future__ import annotations

import dataclasses
import math

import torch

from dstp.errors import InputError
from dstp.models import hf_compat
from dstp.models.base import check_image_tokens
from dstp.models.llava_next import LlavaNextAdapter
from dstp.models.video import video_layout
from dstp.models.vision import received_attention


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    model_type = "llava_onevision"
    example_id = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    takes_video = True

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

    # -- video ----------------------------------------------------------------------------------------------------
    @property
    def frame_grid(self) -> tuple[int, int]:
        """(h, w) pooled tokens of one video frame: the view's patch grid halved, rounded up (`apply_pooling`)."""
        v = self.model.config.vision_config
        side = math.ceil(v.image_size // v.patch_size / 2)
        return side, side

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """[n_videos * (frames * h * w + 1), D] in placeholder order: transformers' own video-feature call."""
        cfg = self.model.config
        model = self.model.model
        out = model.get_video_features(pixel_values_videos.to(self.dtype),
                                       vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                       return_dict=True)
        h, w = self.frame_grid
        return hf_compat.video_features_with_newline(out, model.image_newline, pixel_values_videos.shape[1] * h * w)

    def render_chat(self, conversations):
        frames = [len(item["video"]) for conv in conversations for message in conv
                  if isinstance(message.get("content"), list) for item in message["content"]
                  if item.get("type") == "video" and not isinstance(item.get("video"), (str, type(None)))]
        if len(set(frames)) > 1:  # a file's frames are known once decoded: the processor's own error is one line too
            raise InputError(f"{self.family}'s processor stacks a batch's videos into one tensor, and these have "
                             f"different frame counts {frames}: pass clips of one length, or one clip per call")
        return super().render_chat(conversations)

    @torch.no_grad()
    def prepare(self, batch, vision_scores: bool = True):
        """LLaVA-NeXT's images (anyres crops), then each video's pooled frames and newline at its placeholders."""
        cfg = self.model.config
        pixels = batch.get("pixel_values_videos")
        video_id = getattr(cfg, "video_token_id", None)
        if pixels is None:
            if video_id is not None:
                check_image_tokens(batch["input_ids"], video_id, 0, "video")
            return super().prepare(batch, vision_scores)
        if vision_scores:
            raise InputError(f"{self.family} cannot give VisionZip the encoder internals of a video: the model pools "
                             f"each frame's features 2x2 (bilinear), so a video token blends several patches; use "
                             f"another pruner")
        prepared = super().prepare({k: v for k, v in batch.items() if k != "pixel_values_videos"}, False)
        video = prepared.input_ids == video_id
        feats = self.video_features(pixels.to(self.device))
        check_image_tokens(prepared.input_ids, video_id, feats.shape[0], "video")
        n_videos, n_frames = pixels.shape[:2]
        h, w = self.frame_grid
        # each video's last placeholder is its newline: on no frame
        rows, cols = torch.nonzero(video, as_tuple=True)
        ends = torch.arange(1, n_videos + 1, device=self.device) * (n_frames * h * w + 1) - 1
        frames = video.clone()
        frames[rows[ends], cols[ends]] = False
        visual = prepared.visual_mask | video
        return dataclasses.replace(
            prepared,
            inputs_embeds=prepared.inputs_embeds.masked_scatter(video[..., None], feats.to(self.dtype)),
            visual_mask=visual,
            video=video_layout(visual, frames, [(n_frames, h, w)] * n_videos),
        )
