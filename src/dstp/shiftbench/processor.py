"""ShiftBench tokenizer (WordLevel over a small vocabulary) and processor (image + prompt -> inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BatchFeature, PreTrainedTokenizerFast

from dstp.shiftbench.symbols import cell_name
from dstp.shiftbench.tasks import IMAGE_TOKEN, MAX_HOPS, TASKS

SPECIALS = ("<pad>", "<bos>", "<eos>", IMAGE_TOKEN)
PROCESSOR_CONFIG = "shiftbench_processor.json"


def vocabulary(grid_size: int) -> list[str]:
    """All words, specials first; cell tokens ``r{r}c{c}`` last, in cell-index order."""
    words = list(SPECIALS) + list(TASKS) + [f"h{h}" for h in range(1, MAX_HOPS + 1)]
    words += ["=", "same", "diff"]
    words += [cell_name(r, c) for r in range(grid_size) for c in range(grid_size)]
    return words


def build_tokenizer(grid_size: int) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary(grid_size))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<pad>"
    )


def cell_token_ids(tokenizer, grid_size: int) -> list[int]:
    """Token id of each cell, in cell-index order (r * G + c)."""
    return tokenizer.convert_tokens_to_ids([cell_name(r, c) for r in range(grid_size) for c in range(grid_size)])


def images_to_pixels(images) -> torch.Tensor:
    """list of HxWx3 uint8 images (numpy or PIL) -> float [B, 3, H, W] in [0, 1]."""
    arrays = [np.asarray(im, dtype=np.uint8)[..., :3] for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


class ShiftBenchProcessor:
    """Turns images and prompts containing one ``<image>`` into ``input_ids``, ``attention_mask``,
    ``pixel_values``. ``<image>`` expands to G*G image tokens (row-major cells); ``<bos>`` is prepended."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, grid_size: int = 12, cell_pixels: int = 8):
        self.tokenizer = tokenizer
        self.grid_size = grid_size
        self.cell_pixels = cell_pixels
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def build(cls, grid_size: int = 12, cell_pixels: int = 8) -> ShiftBenchProcessor:
        return cls(build_tokenizer(grid_size), grid_size, cell_pixels)

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size * self.grid_size

    def expand_prompt(self, prompt: str) -> str:
        if prompt.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"a ShiftBench prompt needs exactly one {IMAGE_TOKEN}, got {prompt!r}")
        return "<bos> " + prompt.replace(IMAGE_TOKEN, " ".join([IMAGE_TOKEN] * self.num_image_tokens))

    def __call__(self, images=None, text=None, padding_side: str = "left", return_tensors: str = "pt", **kwargs):
        if isinstance(text, str):
            text = [text]
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is None or len(images) != len(text):
            raise ValueError("ShiftBenchProcessor needs one image per prompt")
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = padding_side
        try:
            enc = self.tokenizer(
                [self.expand_prompt(t) for t in text], padding=True, return_tensors="pt", add_special_tokens=False
            )
        finally:
            self.tokenizer.padding_side = side
        pixels = images_to_pixels(images)
        want = self.grid_size * self.cell_pixels
        if pixels.shape[-2:] != (want, want):
            raise ValueError(f"images must be {want}x{want} pixels, got {tuple(pixels.shape[-2:])}")
        return BatchFeature(
            {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": pixels}
        )

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        cfg = {"processor_class": type(self).__name__, "grid_size": self.grid_size, "cell_pixels": self.cell_pixels}
        (path / PROCESSOR_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> ShiftBenchProcessor:
        path = Path(path)
        cfg = json.loads((path / PROCESSOR_CONFIG).read_text())
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        return cls(tokenizer, cfg["grid_size"], cfg["cell_pixels"])
