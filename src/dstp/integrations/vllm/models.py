"""vLLM model classes that run a dstp pruner on each image before the LLM (the only module that imports vLLM's
model code; `register()` names these classes by string, so vLLM imports this module when it builds a model).

Each class is vLLM's own class for its architecture with a few methods wrapped; without a `dstp` key in
`hf_overrides` every wrapper hands straight to vLLM's method, so the class serves as vLLM's would.
With one (`settings.py`):

- the processor emits k = ceil(retention * N) placeholder tokens per image instead of N, so the request's
  prompt, its KV cache and every attention over it are N - k tokens shorter;
- `_process_image_input` (the vision encoder + projector, vLLM's) yields the image's N embeddings, the dstp pruner
  keeps k of them (`selection.keep`), and each kept embedding carries its position relative to the image's first
  visual token in `selection.POSITION_CHANNELS` extra channels;
- `get_mrope_input_positions` lays out the request's positions as if all N tokens were there (text after an
  image keeps its original position; generated tokens continue from the unpruned length through vLLM's
  M-RoPE delta), the k placeholder slots at the image's first position;
- `embed_input_ids` strips the channels, and `forward` adds them to the placeholder slots' positions before the
  LLM runs, so each kept token sits at its original position: 1-D for LLaVA (run as M-RoPE with three identical
  rows, see `engine_checks.py`), (t, h, w) for Qwen2.5-VL and Qwen3-VL (DeepStack features travel with the kept
  rows).

VisionZip (merging) reads the vision tower's internals through hooks (`_dstp_zip_inputs`); CDPruner's instruction
reaches the model as a per-image field that the processor adds and mixes into the image's hash
(`_KeptPlaceholders`, `embed_multimodal`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import threading

import torch

from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo,
                                              _build_llava_or_pixtral_hf_info, _build_llava_or_pixtral_hf_processor)
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, PlaceholderRange
from vllm.multimodal.processing import PromptReplacement

from dstp.integrations.vllm.selection import (POSITION_CHANNELS, decode_positions, encode_positions, grid_positions,
                                              instruction_ids, keep, line_positions)
from dstp.integrations.vllm.settings import fail, from_hf_config
from dstp.models.vision import VisionInternals, cls_attention, received_attention

INSTRUCTION = "dstp_instruction"  # per-image field: the token ids of its request's instruction (cdpruner)


# ---------------------------------------------------------------------------------------------------------------
# processors: k placeholders per image
# ---------------------------------------------------------------------------------------------------------------

def _fewer_placeholders(update, settings):
    """The same image replacement with only the first k of its N (identical) placeholder tokens."""
    original = update.content

    def replacement(item_idx: int):
        ids = original(item_idx) if callable(original) else original
        if not (isinstance(ids, list) and ids and all(t == ids[0] for t in ids)):
            raise RuntimeError(f"dstp vLLM plugin: expected an image replacement of identical placeholder tokens, "
                               f"got {type(ids).__name__}")
        return ids[:settings.kept(len(ids))]

    return PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)


class _KeptPlaceholders:
    """Processor mixin: image placeholders shrink from N to k; videos and text are left as they are.

    For a pruner that conditions on the prompt (cdpruner) each image also carries its request's instruction (the
    prompt's token ids after its last image, `selection.instruction_ids`) as a field of its own, and the
    instruction is part of the image's hash: vLLM caches processed images and encoder outputs by that hash, and
    the same image under another prompt keeps other tokens."""

    _dstp_request = threading.local()  # the instruction of the request being processed (apply -> its callees)

    def _dstp_settings(self):
        return from_hf_config(self.info.get_hf_config())

    def apply(self, inputs, *args, **kwargs):
        settings = self._dstp_settings()
        if settings is None or not settings.conditional:
            return super().apply(inputs, *args, **kwargs)
        cfg = self.info.get_hf_config()
        image_token = getattr(cfg, "image_token_id", None)
        image_token = getattr(cfg, "image_token_index", None) if image_token is None else image_token
        self._dstp_request.instruction = instruction_ids(list(inputs.prompt), image_token)
        try:
            return super().apply(inputs, *args, **kwargs)
        finally:
            self._dstp_request.instruction = None

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        instruction = getattr(self._dstp_request, "instruction", None)
        if instruction is None or not hashes.get("image"):
            return hashes
        tag = hashlib.sha256(repr(instruction).encode()).hexdigest()[:32]
        return {**hashes, "image": [f"{h}-dstp-{tag}" for h in hashes["image"]]}

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        instruction = getattr(self._dstp_request, "instruction", None)
        n = mm_items.get_count("image", strict=False)
        if instruction is not None and n:
            out[INSTRUCTION] = torch.tensor([instruction] * n, dtype=torch.long).reshape(n, len(instruction))
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)
        if INSTRUCTION not in hf_inputs:
            return config
        return {**config, INSTRUCTION: MultiModalFieldConfig.batched("image", keep_on_cpu=True)}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = self._dstp_settings()
        if settings is None:
            return updates
        return [_fewer_placeholders(u, settings) if u.modality == "image" else u for u in updates]


class DstpLlavaProcessor(_KeptPlaceholders, LlavaMultiModalProcessor):
    pass


class DstpQwen2_5_VLProcessor(_KeptPlaceholders, Qwen2_5_VLMultiModalProcessor):
    pass


class DstpQwen3VLProcessor(_KeptPlaceholders, Qwen3VLMultiModalProcessor):
    pass


def _llava_processor(info, dummy_inputs, **kwargs):
    """vLLM's LLaVA factory, with the LLaVA-1.5 processor replaced (Pixtral-HF configs keep vLLM's own)."""
    if type(info) is LlavaProcessingInfo:
        return DstpLlavaProcessor(info, dummy_inputs, **kwargs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# models: the pruner on each image, kept tokens at their original positions
# ---------------------------------------------------------------------------------------------------------------

class _PrunedImages:
    """Model mixin. A subclass says how wide a visual embedding is (`_dstp_width`), which channels the pruner
    reads (`_dstp_features`), how many visual tokens an image has (`_dstp_n_visual`), each kept token's relative
    position (`_dstp_relative`), and the unpruned layout's positions (`_dstp_full_positions`)."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._dstp = from_hf_config(vllm_config.model_config.hf_config)
        self._dstp_pruner = None
        if self._dstp is not None:
            self._dstp_pruner = self._dstp.pruner(vllm_config.model_config.hf_text_config.num_hidden_layers)
            if self._dstp.method == "visionzip" and (vllm_config.parallel_config.tensor_parallel_size > 1
                                                     or getattr(self, "use_data_parallel", False)):
                raise fail("visionzip reads every head of the vision encoder's attention and every patch of an "
                           "image; with tensor parallelism or a data-parallel encoder (mm_encoder_tp_mode 'data') "
                           "one process sees only part of them (tensor_parallel_size must be 1)")
        self._dstp_pending = None  # (is_multimodal, relative positions) from embed_input_ids for the next forward
        self._dstp_instructions = None  # per image of the current embed_multimodal call: instruction ids (cdpruner)

    # -- subclass hooks -----------------------------------------------------------------------------------------
    def _dstp_width(self) -> int:
        raise NotImplementedError

    def _dstp_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings

    def _dstp_n_visual(self, feature) -> int:
        raise NotImplementedError

    def _dstp_full_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    # -- encoder side -------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs):
        instructions = kwargs.pop(INSTRUCTION, None)
        self._dstp_instructions = None if instructions is None else list(instructions)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._dstp_instructions = None

    def _dstp_instruction(self, image: int) -> torch.Tensor | None:
        """The LLM's input embeddings [T, D] of image `image`'s instruction, for pruners that condition on it."""
        if not self._dstp.conditional:
            return None
        if self._dstp_instructions is None:
            raise RuntimeError(f"dstp vLLM plugin: {self._dstp.method} needs each image's instruction, which this "
                               f"batch of images lacks")
        ids = self._dstp_instructions[image].reshape(-1).to(self._dstp_device())
        return self.get_language_model().embed_input_ids(ids)

    def _dstp_device(self) -> torch.device:
        return next(self.parameters()).device

    def _dstp_select(self, embeddings: torch.Tensor, relative, image: int, vision=None) -> torch.Tensor:
        """[N, W] -> [k, W + POSITION_CHANNELS]: the kept (or merged) rows, each with its relative position
        appended. `image`: the image's index in this call (its instruction); `vision`: its encoder internals."""
        index, merged = keep(self._dstp_pruner, self._dstp.prune.seed,
                             self._dstp_features(embeddings), self._dstp_instruction(image), vision)
        rows = embeddings[index]
        if merged is not None:  # merged tokens replace the LLM-input part (Qwen3-VL: DeepStack stays the target's)
            rows = torch.cat([merged, rows[:, merged.shape[-1]:]], dim=-1)
        channels = encode_positions(relative(index.cpu()), embeddings.dtype).to(embeddings.device)
        return torch.cat([rows, channels], dim=-1)

    # -- LLM side -----------------------------------------------------------------------------------------------
    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        if self._dstp is None or multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        width = self._dstp_width()
        stripped, relative = [], []
        for e in multimodal_embeddings:
            if e.shape[-1] == width + POSITION_CHANNELS:  # a pruned image
                stripped.append(e[:, :width])
                relative.append(decode_positions(e[:, width:]))
            else:  # a video (not pruned): its positions are already the original ones
                stripped.append(e)
                relative.append(torch.zeros(e.shape[0], 3, dtype=torch.long, device=e.device))
        self._dstp_pending = (is_multimodal, torch.cat(relative))
        return super().embed_input_ids(input_ids, stripped, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._dstp_pending = self._dstp_pending, None
        if pending is not None:
            is_multimodal, relative = pending
            slots = is_multimodal.to(positions.device).nonzero()[:, 0]
            positions = positions.clone()
            positions[:, slots] += relative.to(positions.device).T
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        if self._dstp is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        # the unpruned layout: each image's k placeholders stand for its N visual tokens
        expanded, features, images = [], [], []  # images: (offset, k, N) of each pruned image, in the prompt
        cursor, shift = 0, 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, length = f.mm_position.offset, f.mm_position.length
            expanded.extend(input_tokens[cursor:offset])
            if f.modality == "image":
                n = self._dstp_n_visual(f)
                expanded.extend([input_tokens[offset]] * n)
                images.append((offset, length, n))
                features.append(dataclasses.replace(f, mm_position=PlaceholderRange(offset=offset + shift, length=n)))
                shift += n - length
            else:
                expanded.extend(input_tokens[offset:offset + length])
                features.append(dataclasses.replace(
                    f, mm_position=dataclasses.replace(f.mm_position, offset=offset + shift)))
            cursor = offset + length
        expanded.extend(input_tokens[cursor:])
        full, delta = self._dstp_full_positions(expanded, features)
        # each pruned-layout token's index in the unpruned layout; an image's k slots all take its first token's
        full_index = torch.arange(len(input_tokens))
        shift = 0
        for offset, k, n in images:
            full_index[offset:offset + k] = offset + shift
            full_index[offset + k:] += n - k
            shift += n - k
        return full[:, full_index], int(delta + shift)


# transformers 5 saves LLaVA's CLIP tower without its `vision_model.` level; vLLM's CLIP expects it
_TRANSFORMERS5_LLAVA = WeightsMapper(orig_to_new_regex={
    re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model."})


@MULTIMODAL_REGISTRY.register_processor(_llava_processor, info=_build_llava_or_pixtral_hf_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class DstpLlavaForConditionalGeneration(_PrunedImages, LlavaForConditionalGeneration, SupportsMRoPE):
    hf_to_vllm_mapper = _TRANSFORMERS5_LLAVA | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def _dstp_width(self) -> int:
        return self.config.text_config.hidden_size

    def _dstp_n_visual(self, feature) -> int:
        vision = self.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n + 1 if self.config.vision_feature_select_strategy == "full" else n

    def _process_image_input(self, image_input):
        if self._dstp is None:
            return super()._process_image_input(image_input)
        if self._dstp.method == "visionzip":
            return [self._dstp_select(e, line_positions, i, vision=v)
                    for i, (e, v) in enumerate(self._dstp_zip_inputs(image_input))]
        return [self._dstp_select(e, line_positions, i) for i, e in enumerate(super()._process_image_input(image_input))]

    def _dstp_zip_inputs(self, image_input):
        """Per image: (its N embeddings [N, D], its VisionInternals), as dstp's LLaVA adapter computes them: the
        feature layer's output (vLLM builds the tower up to it) before the projector, its CLS row, and that layer's
        CLS attention (head mean) and head-mean keys from its q/k projections of its normed input (a hook)."""
        if image_input["type"] != "pixel_values":
            raise RuntimeError("dstp vLLM plugin: visionzip needs the image's pixels, not precomputed embeddings")
        layer = self.vision_tower.vision_model.encoder.layers[-1]
        seen = {}
        hook = layer.layer_norm1.register_forward_hook(lambda mod, args, out: seen.update(x=out))
        try:
            feats = self.vision_tower(image_input["pixel_values"], feature_select_strategy="full")  # CLS first
        finally:
            hook.remove()
        attn = layer.self_attn
        q, k, _ = attn.qkv_proj(seen["x"])[0].chunk(3, dim=-1)
        n, S, _ = k.shape
        heads = k.reshape(n, S, attn.num_heads_per_partition, attn.head_dim)
        scores = cls_attention(q[:, 0].reshape(n, attn.num_heads_per_partition, attn.head_dim), heads, attn.scale)
        keys, units = heads.mean(2), feats[:, 1:]
        embeddings = self.multi_modal_projector(units)
        slot = torch.arange(S - 1, device=units.device)[None]
        for i in range(n):
            yield embeddings[i], VisionInternals(hidden=units[i:i + 1], keys=keys[i:i + 1, 1:],
                                                 scores=scores[i:i + 1, 1:], slot=slot,
                                                 project=self.multi_modal_projector, cls=feats[i:i + 1, 0])

    def _dstp_full_positions(self, input_tokens, mm_features):
        return torch.arange(len(input_tokens)).expand(3, -1).clone(), 0

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self._dstp is None:  # vLLM runs LLaVA with 1-D positions then (engine_checks adds M-RoPE only with dstp)
            raise RuntimeError("LLaVA has no M-RoPE positions without the dstp plugin's configuration")
        return super().get_mrope_input_positions(input_tokens, mm_features)


@contextlib.contextmanager
def _calls_recorded(modules: dict, seen: dict):
    """Records each module's call arguments, `seen[name] = (args, kwargs)`, while the block runs. vLLM's compilable
    ViT modules (`support_torch_compile`) call `self.forward` directly, which skips module hooks, so the
    instances' own `forward` is wrapped for the duration (their class is left alone)."""
    for name, module in modules.items():
        def record(*args, _name=name, _forward=module.forward, **kwargs):
            seen[_name] = (args, kwargs)
            return _forward(*args, **kwargs)
        module.forward = record
    try:
        yield
    finally:
        for module in modules.values():
            del module.forward


class _QwenPrunedImages(_PrunedImages):
    def _dstp_n_visual(self, feature) -> int:
        t, h, w = (int(v) for v in feature.data["image_grid_thw"].data.tolist())
        return t * h * w // self.visual.spatial_merge_size ** 2

    def _process_image_input(self, image_input):
        if self._dstp is None:
            return super()._process_image_input(image_input)
        merge = self.visual.spatial_merge_size
        grids = [(t, h // merge, w // merge) for t, h, w in image_input["image_grid_thw"].tolist()]
        if self._dstp.method == "visionzip":
            pairs = list(self._dstp_zip_inputs(image_input))
        else:
            pairs = [(e, None) for e in super()._process_image_input(image_input)]
        return tuple(self._dstp_select(e, lambda index, g=g: grid_positions(index, g), i, vision=v)
                     for i, ((e, v), g) in enumerate(zip(pairs, grids)))

    def _dstp_unit_order(self, grid_thw: list[list[int]]) -> torch.Tensor | None:
        """LLM order of the merger's input rows (merged tokens), None when the ViT keeps raster order."""
        return None

    def _dstp_zip_inputs(self, image_input):
        """Per image: (vLLM's embeddings of it [N, W], its VisionInternals), as dstp's Qwen adapters compute them
        (no CLS token): a unit is one merged token, its features the merger's input, its score the mean
        attention its patches receive in the last ViT block (head mean, over the queries of the block's attention
        segment) and its key its patches' mean head-mean key before rotary, from that block's own qkv and rotary
        inputs (its call recorded, so the tower runs as vLLM runs it)."""
        if image_input["type"] != "pixel_values":
            raise RuntimeError("dstp vLLM plugin: visionzip needs the image's pixels, not precomputed embeddings")
        visual, seen = self.visual, {}
        block = visual.blocks[-1]
        with _calls_recorded({"block": block, "merger": visual.merger}, seen):
            out = super()._process_image_input(image_input)
        if "block" not in seen or "merger" not in seen:
            raise RuntimeError("dstp vLLM plugin: visionzip could not read the vision tower's last block (vLLM "
                               "compiled the encoder: turn compile_mm_encoder off)")
        (x,), meta = seen["block"]  # x [S, 1, D] in the ViT's order; meta: cu_seqlens, rotary cos / sin, ...
        attn = block.attn
        qkv, _ = attn.qkv(block.norm1(x))  # [S, 1, 3 * H * hd]
        S, H, hd = qkv.shape[0], attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
        q, k, _ = qkv.reshape(S, 3, H, hd).unbind(1)
        keys = k.float().mean(1)
        q, k = attn.apply_rotary_emb(torch.stack([q, k]).contiguous(), meta["rotary_pos_emb_cos"],
                                     meta["rotary_pos_emb_sin"]).unbind(0)
        received = received_attention(q, k, meta["cu_seqlens"].tolist(), hd ** -0.5)
        (merger_input,), _ = seen["merger"]
        m, width = visual.spatial_merge_unit, merger_input.shape[-1]
        units = merger_input.reshape(-1, m * width)
        keys, scores = keys.view(-1, m, hd).mean(1), received.view(-1, m).mean(-1)
        grid_thw = image_input["image_grid_thw"].tolist()
        order = self._dstp_unit_order(grid_thw)
        if order is not None:
            order = order.to(units.device)
            units, keys, scores = units[order], keys[order], scores[order]
        counts = [t * h * w // m for t, h, w in grid_thw]
        project = lambda u: visual.merger(u.reshape(-1, width))  # noqa: E731
        for e, u, kk, sc in zip(out, units.split(counts), keys.split(counts), scores.split(counts)):
            yield e, VisionInternals(hidden=u[None], keys=kk[None], scores=sc[None],
                                     slot=torch.arange(u.shape[0], device=u.device)[None], project=project)

    def _dstp_full_positions(self, input_tokens, mm_features):  # vLLM's own (past _PrunedImages' wrapper)
        return super(_PrunedImages, self).get_mrope_input_positions(input_tokens, mm_features)


@MULTIMODAL_REGISTRY.register_processor(DstpQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class DstpQwen2_5_VLForConditionalGeneration(_QwenPrunedImages, Qwen2_5_VLForConditionalGeneration):
    def _dstp_width(self) -> int:
        return self.config.vision_config.out_hidden_size

    def _dstp_unit_order(self, grid_thw):  # the ViT runs its merged tokens in window order
        return self.visual.prepare_encoder_metadata(grid_thw)["reverse_indices"]


@MULTIMODAL_REGISTRY.register_processor(DstpQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class DstpQwen3VLForConditionalGeneration(_QwenPrunedImages, Qwen3VLForConditionalGeneration):
    def _dstp_width(self) -> int:  # main embedding + DeepStack levels, concatenated per token (vLLM's layout)
        return self.visual_dim + (self.multiscale_dim if self.use_deepstack else 0)

    def _dstp_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings[:, :self.visual_dim]  # what the LLM's input holds (dstp prunes on the same)
