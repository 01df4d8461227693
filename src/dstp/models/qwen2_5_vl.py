"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): window-attention ViT, patch merger, Qwen2 LM with
3-axis M-RoPE. Image tokens get (t, h, w) positions; text continues after the image's largest one, and
decoding continues from `max position + 1` (transformers' rope delta).

Vision internals (VisionZip; the ViT has no CLS token), one view per image, one unit per merged LLM token: the
merger's input, and as the stand-in for CLS attention the mean attention each patch receives in the last vision
block (head-mean, averaged over the queries of its attention segment: the whole image when that block attends
globally, as in the released configs, else its window), averaged over the token's patches, as are its patches'
head-mean keys. Computed from the block's own qkv and rotary inputs, captured with a hook."""
from __future__ import annotations

import torch

from dstp.errors import InputError
from dstp.models import hf_compat
from dstp.models.base import Adapter, PreparedInputs, check_image_tokens, scores_by_row
from dstp.models.video import video_layout
from dstp.models.vision import VisionInternals, consecutive_slots, join_views, pad_views, received_attention


def frame_grids(grid: torch.Tensor) -> torch.Tensor:
    """[n, 3] (t, h, w) grids -> one (1, h, w) row per frame (temporal patch): the views VisionZip zips one by one."""
    frames = grid.repeat_interleave(grid[:, 0], dim=0)
    frames[:, 0] = 1
    return frames


class Qwen25VLAdapter(Adapter):
    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_type = "qwen2_5_vl"
    example_id = "Qwen/Qwen2.5-VL-3B-Instruct"
    vision_internals = True
    takes_video = True
    config_fields = ("vision_config", "image_token_id")

    def image_features(self, pixel_values, image_grid_thw, video: bool = False) -> torch.Tensor:
        return hf_compat.pooled_features(self.vision_call(pixel_values, image_grid_thw, video)())

    def vision_call(self, pixel_values, grid, video: bool = False):
        """The model's own image- (or video-) feature call, to run later."""
        model = self.model.model
        if video:
            return lambda: model.get_video_features(pixel_values_videos=pixel_values, video_grid_thw=grid)
        return lambda: model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid)

    def features_and_internals(self, pixel_values, image_grid_thw, internals: bool = True, video: bool = False):
        """(features [n_tokens, D], VisionInternals or None), in placeholder order (the ViT runs in window order)."""
        if not internals:
            return self.image_features(pixel_values, image_grid_thw, video), None
        call = lambda: self.image_features(pixel_values, image_grid_thw, video)  # noqa: E731
        return self.with_internals(call, image_grid_thw, torch.argsort(self.window_index(image_grid_thw)))

    def with_internals(self, vision_call, grid, order=None):
        """(vision_call()'s result, VisionInternals). The ViT has no CLS token: a unit is one merged LLM token (its
        `spatial_merge_unit` patches), its features the merger's input (the last block's output), its key and score
        its patches' mean of the last block's head-mean keys (before rotary) and of the head-mean attention each
        patch receives. `order`: LLM order of the ViT's merged tokens (Qwen2.5-VL's window order), None: same."""
        visual = self.model.model.visual
        block, seen = visual.blocks[-1], {}

        def grab(module, args, kwargs):
            seen.update(x=args[0] if args else kwargs["hidden_states"], cu=kwargs["cu_seqlens"],
                        rope=kwargs["position_embeddings"])

        hooks = [block.register_forward_pre_hook(grab, with_kwargs=True),
                 visual.merger.register_forward_pre_hook(lambda mod, args: seen.update(units=args[0]))]
        try:
            out = vision_call()
        finally:
            for h in hooks:
                h.remove()
        received, keys = self.attention_internals(block, seen["x"], seen["cu"], seen["rope"])
        m, Dv = visual.spatial_merge_unit, seen["units"].shape[-1]
        units = seen["units"].reshape(-1, m * Dv)
        keys, scores = keys.view(-1, m, keys.shape[-1]).mean(1), received.view(-1, m).mean(-1)
        if order is not None:
            units, keys, scores = units[order], keys[order], scores[order]
        counts = (frame_grids(grid).prod(-1) // m).tolist()  # merged tokens per view (image, video frame), in order
        split = lambda t: pad_views(list(torch.split(t, counts)))  # noqa: E731
        vision = VisionInternals(hidden=split(units), keys=split(keys), scores=split(scores),
                                 slot=consecutive_slots(counts, units.device),
                                 project=lambda u: visual.merger(u.reshape(-1, Dv)))
        return out, vision

    @staticmethod
    @torch.no_grad()
    def attention_internals(block, x, cu_seqlens, rope):
        """([S] head-mean attention each token receives, averaged over the queries of its segment; [S, hd] its
        head-mean key before rotary)."""
        attn = block.attn
        S = x.shape[0]
        q, k, _ = attn.qkv(block.norm1(x)).reshape(S, 3, attn.num_heads, -1).float().unbind(1)
        keys = k.mean(1)
        cos, sin = (t.float()[:, None, :] for t in rope)
        q, k = (t * cos + hf_compat.rotate_half(t) * sin for t in (q, k))  # [S, H, hd]
        return received_attention(q, k, cu_seqlens.tolist(), attn.scaling), keys

    def window_index(self, grid) -> torch.Tensor:
        """The ViT's merged-token order (window order), as its forward computes it."""
        return hf_compat.vision_window_index(self.model.model.visual, grid)

    def visual_inputs(self, pixel_values, grid, visual, embeds, internals: bool = True, video: bool = False):
        """(features [n_tokens, D], VisionInternals or None, extras) for `prepare`, of a batch's images (or
        videos) whose placeholders are `visual`."""
        feats, vision = self.features_and_internals(pixel_values, grid, internals, video)
        return feats, vision, {}

    @torch.no_grad()
    def prepare(self, batch, vision_scores: bool = True) -> PreparedInputs:
        """Rows may hold any number of images and videos (their features fill the placeholders in order), zero
        included. Both kinds are visual tokens; a video's keep their temporal M-RoPE positions."""
        cfg = self.model.config
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        image = input_ids == cfg.image_token_id
        video = input_ids == getattr(cfg, "video_token_id", -1)
        visual = image | video
        embeds = self.embed_tokens(input_ids)
        grids, parts, extras = {}, [], {}
        for kind, where, pixels, grid_key in (("image", image, "pixel_values", "image_grid_thw"),
                                              ("video", video, "pixel_values_videos", "video_grid_thw")):
            token_id = cfg.image_token_id if kind == "image" else cfg.video_token_id
            if batch.get(pixels) is None:
                check_image_tokens(input_ids, token_id, 0, kind)
                continue
            if batch.get(grid_key) is None:
                raise InputError(f"{self.family} inputs have {pixels} but no {grid_key}: pass the processor's "
                                 f"whole output")
            grid = grids[kind] = batch[grid_key].to(self.device)
            as_video = {"video": True} if kind == "video" else {}  # a subclass's image-only override keeps working
            feats, vision, more = self.visual_inputs(batch[pixels].to(self.device, self.dtype), grid, where, embeds,
                                                     vision_scores, **as_video)
            check_image_tokens(input_ids, token_id, feats.shape[0], kind)
            embeds = embeds.masked_scatter(where[..., None], feats.to(self.dtype))
            # this kind's visual tokens, by rank among all the batch's visual tokens (placeholder order)
            parts.append((vision, torch.nonzero(where[visual]).flatten()))
            extras = {k: extras[k] + v if k in extras else v for k, v in more.items()}
        vision = join_views(parts) if parts and all(v is not None for v, _ in parts) else None
        scores = None if vision is None else vision.token_scores(int(visual.sum()))
        position_ids, deltas = self.rope_index(input_ids, image, video, grids, batch.get("second_per_grid_ts"), mask)
        layout = None
        if "video" in grids:
            merge = self.model.config.vision_config.spatial_merge_size
            thw = [(t, h // merge, w // merge) for t, h, w in grids["video"].tolist()]
            layout = video_layout(visual, video, thw)
        return PreparedInputs(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            next_position=mask.long().sum(-1) + deltas.reshape(-1),
            visual_mask=visual,
            vision_scores=None if scores is None else scores_by_row(visual, scores),
            extras=extras,
            input_ids=input_ids,
            vision=vision,
            video=layout,
        )

    def rope_index(self, input_ids, image, video, grids, second_per_grid_ts, mask):
        """transformers' own M-RoPE positions: text 0, image 1, video 2 (as the processor's mm_token_type_ids)."""
        extra = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts.to(self.device)}
        return self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=image.int() + 2 * video.int(), image_grid_thw=grids.get("image"),
            video_grid_thw=grids.get("video"), attention_mask=mask.long(), **extra)

    def decode_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[None, :, None].expand(3, -1, 1)
