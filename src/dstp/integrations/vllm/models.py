"""vLLM model classes that run a dstp pruner on each image before the LLM (the only module that imports vLLM's
model code; `register()` names these classes by string, so vLLM imports this module when it builds a model).

Each class is vLLM's own class for its architecture with four methods wrapped; without a `dstp` key in
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
"""
from __future__ import annotations

import dataclasses
import re

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
from vllm.multimodal.inputs import PlaceholderRange
from vllm.multimodal.processing import PromptReplacement

from dstp.integrations.vllm.selection import (POSITION_CHANNELS, decode_positions, encode_positions, grid_positions,
                                              keep, line_positions)
from dstp.integrations.vllm.settings import from_hf_config


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
    """Processor mixin: image placeholders shrink from N to k; videos and text are left as they are."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = from_hf_config(self.info.get_hf_config())
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
        self._dstp_pending = None  # (is_multimodal, relative positions) from embed_input_ids for the next forward

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
    def _dstp_select(self, embeddings: torch.Tensor, relative) -> torch.Tensor:
        """[N, W] -> [k, W + POSITION_CHANNELS]: the kept rows, each with its relative position appended."""
        index = keep(self._dstp_pruner, self._dstp.retention, self._dstp.prune.seed, self._dstp_features(embeddings))
        channels = encode_positions(relative(index.cpu()), embeddings.dtype).to(embeddings.device)
        return torch.cat([embeddings[index], channels], dim=-1)

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
        out = super()._process_image_input(image_input)
        if self._dstp is None:
            return out
        return [self._dstp_select(e, line_positions) for e in out]

    def _dstp_full_positions(self, input_tokens, mm_features):
        return torch.arange(len(input_tokens)).expand(3, -1).clone(), 0

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self._dstp is None:  # vLLM runs LLaVA with 1-D positions then (engine_checks adds M-RoPE only with dstp)
            raise RuntimeError("LLaVA has no M-RoPE positions without the dstp plugin's configuration")
        return super().get_mrope_input_positions(input_tokens, mm_features)


class _QwenPrunedImages(_PrunedImages):
    def _dstp_n_visual(self, feature) -> int:
        t, h, w = (int(v) for v in feature.data["image_grid_thw"].data.tolist())
        return t * h * w // self.visual.spatial_merge_size ** 2

    def _process_image_input(self, image_input):
        out = super()._process_image_input(image_input)
        if self._dstp is None:
            return out
        merge = self.visual.spatial_merge_size
        grids = [(t, h // merge, w // merge) for t, h, w in image_input["image_grid_thw"].tolist()]
        return tuple(self._dstp_select(e, lambda index, g=g: grid_positions(index, g)) for e, g in zip(out, grids))

    def _dstp_full_positions(self, input_tokens, mm_features):  # vLLM's own (past _PrunedImages' wrapper)
        return super(_PrunedImages, self).get_mrope_input_positions(input_tokens, mm_features)


@MULTIMODAL_REGISTRY.register_processor(DstpQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class DstpQwen2_5_VLForConditionalGeneration(_QwenPrunedImages, Qwen2_5_VLForConditionalGeneration):
    def _dstp_width(self) -> int:
        return self.config.vision_config.out_hidden_size


@MULTIMODAL_REGISTRY.register_processor(DstpQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class DstpQwen3VLForConditionalGeneration(_QwenPrunedImages, Qwen3VLForConditionalGeneration):
    def _dstp_width(self) -> int:  # main embedding + DeepStack levels, concatenated per token (vLLM's layout)
        return self.visual_dim + (self.multiscale_dim if self.use_deepstack else 0)

    def _dstp_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings[:, :self.visual_dim]  # what the LLM's input holds (dstp prunes on the same)
