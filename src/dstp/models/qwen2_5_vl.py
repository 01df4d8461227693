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
from dstp.models.vision import VisionInternals, consecutive_slots, pad_views, received_attention


class Qwen25VLAdapter(Adapter):
    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_type = "qwen2_5_vl"
    example_id = "Qwen/Qwen2.5-VL-3B-Instruct"
    vision_internals = True
    config_fields = ("vision_config", "image_token_id")

    def image_features(self, pixel_values, image_grid_thw) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        return hf_compat.pooled_features(out)

    def features_and_internals(self, pixel_values, image_grid_thw, internals: bool = True):
        """(features [n_tokens, D], VisionInternals or None), in placeholder order (the ViT runs in window order)."""
        call = lambda: self.image_features(pixel_values, image_grid_thw)  # noqa: E731
        if not internals:
            return call(), None
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
        counts = (grid.prod(-1) // m).tolist()  # merged tokens per image, in placeholder order
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

    def visual_inputs(self, pixel_values, grid, visual, embeds, internals: bool = True):
        """(features [n_tokens, D], VisionInternals or None, extras) for `prepare`."""
        feats, vision = self.features_and_internals(pixel_values, grid, internals)
        return feats, vision, {}

    @torch.no_grad()
    def prepare(self, batch, vision_scores: bool = True) -> PreparedInputs:
        """Rows may hold any number of images (their features fill the placeholders in order), zero included."""
        cfg = self.model.config
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        visual = input_ids == cfg.image_token_id
        embeds = self.embed_tokens(input_ids)
        grid, scores, vision, extras = None, None, None, {}
        if batch.get("pixel_values") is not None:
            if batch.get("image_grid_thw") is None:
                raise InputError(f"{self.family} inputs have pixel_values but no image_grid_thw: pass the "
                                 f"processor's whole output")
            grid = batch["image_grid_thw"].to(self.device)
            feats, vision, extras = self.visual_inputs(batch["pixel_values"].to(self.device, self.dtype), grid,
                                                       visual, embeds, vision_scores)
            check_image_tokens(input_ids, cfg.image_token_id, feats.shape[0])
            scores = None if vision is None else vision.token_scores(feats.shape[0])
            embeds = embeds.masked_scatter(visual[..., None], feats.to(self.dtype))
        else:
            check_image_tokens(input_ids, cfg.image_token_id, 0)
        position_ids, deltas = self.rope_index(input_ids, visual, grid, mask)
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
        )

    def rope_index(self, input_ids, visual, grid, mask):
        return self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=visual.int(), image_grid_thw=grid, attention_mask=mask.long()
        )

    def decode_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[None, :, None].expand(3, -1, 1)
