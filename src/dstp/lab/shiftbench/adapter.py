"""dstp's adapter of the ShiftBench testbed model (`ShiftBenchForConditionalGeneration`): a per-cell patch embedder
in front of a Llama decoder, 1-D RoPE. Its own `embed_multimodal` builds the input embeddings.

It lives in the lab, beside the model, and registers itself with the library's adapter registry when imported
(`import dstp.lab.shiftbench` does; `dstp.load` of a ShiftBench checkpoint does it through the `dstp.adapters`
entry point): loading any other model never imports it."""
from __future__ import annotations

import torch

from dstp.errors import InputError
from dstp.lab.shiftbench.modeling import ShiftBenchForConditionalGeneration
from dstp.lab.shiftbench.processor import ShiftBenchProcessor
from dstp.models.base import Adapter, PreparedInputs, scores_by_row, text_positions
from dstp.models.registry import register
from dstp.models.vision import VisionInternals, consecutive_slots, pad_views


class ShiftBenchAdapter(Adapter):
    family = "shiftbench"
    architectures = ("ShiftBenchForConditionalGeneration",)
    model_type = "dstp_shiftbench"
    example_id = "dstp.lab.shiftbench.default_checkpoint_dir()"
    vision_internals = True

    @classmethod
    def model_class(cls, architecture: str):
        return ShiftBenchForConditionalGeneration

    @classmethod
    def load_processor(cls, path, **hub_kwargs):
        try:
            return ShiftBenchProcessor.from_pretrained(path, **hub_kwargs)
        except OSError as e:
            raise InputError(f"cannot load the ShiftBench processor of {str(path)!r}: {e}") from None

    @property
    def language_model(self):
        return self.model.language_model

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        # tokens that name a cell carry that cell's coordinate key, generated ones included; a generated
        # image token (a broken model may emit one) gets its plain word embedding
        image = input_ids == self.model.config.image_token_id
        emb = self.model.embed_multimodal(input_ids.masked_fill(image, self.pad_token_id), None)[0]
        return torch.where(image[..., None], self.language_model.embed_tokens(input_ids), emb)

    def process(self, images: list[list], prompts: list[str]):
        if any(len(entry) != 1 for entry in images):
            raise InputError("a ShiftBench prompt takes exactly one image")
        try:
            return self.processor(images=[entry[0] for entry in images], text=prompts, padding_side="left")
        except ValueError as e:
            raise InputError(str(e)) from None

    @torch.no_grad()
    def prepare(self, batch, vision_scores: bool = True) -> PreparedInputs:
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        pixels = batch.get("pixel_values")
        try:
            embeds, visual = self.model.embed_multimodal(input_ids, None if pixels is None else pixels.to(self.device))
        except ValueError as e:
            raise InputError(f"ShiftBench inputs: {e}") from None
        if not bool(visual.any()):
            raise InputError("ShiftBench prompts need an <image>: no image tokens found")
        vision = self.vision_internals(embeds[visual], visual.sum(-1)) if vision_scores else None
        scores = scores_by_row(visual, vision.token_scores(int(visual.sum()))) if vision_scores else None
        return PreparedInputs(inputs_embeds=embeds, attention_mask=mask, position_ids=text_positions(mask),
                              next_position=mask.long().sum(-1), visual_mask=visual, vision_scores=scores,
                              input_ids=input_ids, vision=vision)

    @staticmethod
    def vision_internals(features: torch.Tensor, per_row: torch.Tensor) -> VisionInternals:
        """The per-cell front end has no attention and no projector: one view per image, a unit per cell whose
        features and key are its visual token itself, the projector the identity, and as the stand-in for CLS
        attention the token's feature norm (query-agnostic saliency, as VisionZip's score is)."""
        counts = [int(n) for n in per_row if n > 0]
        views = pad_views(list(torch.split(features, counts)))
        return VisionInternals(hidden=views, keys=views, scores=views.float().norm(dim=-1),
                               slot=consecutive_slots(counts, features.device), project=lambda x: x)


register(ShiftBenchAdapter)
