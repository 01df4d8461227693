"""ShiftBench tokenizer (WordLevel over a small vocabulary) and processor (image + prompt -> inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BatchFeature, PreTrainedTokenizerFast

from dstp.errors import InputError
from dstp.lab.shiftbench.inputs import check_prompt, image_array
from dstp.lab.shiftbench.symbols import cell_name
from dstp.lab.shiftbench.tasks import IMAGE_TOKEN, MAX_HOPS, TASKS

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


def _as_lists(images, text) -> tuple[list, list]:
    """One image per prompt, as lists (a single image or prompt may come bare)."""
    text = [text] if isinstance(text, str) else text
    images = [images] if images is not None and not isinstance(images, (list, tuple)) else images
    if text is not None and not isinstance(text, (list, tuple)):
        raise InputError(f"prompts must be a string or a list of strings, got {type(text).__name__}")
    if not text:
        raise InputError("no prompts given: ShiftBench needs one prompt per image")
    if images is None:
        raise InputError("no images given: every ShiftBench prompt needs its image")
    if len(images) != len(text):
        raise InputError(f"got {len(images)} images but {len(text)} prompts: pass one image per prompt")
    return list(images), list(text)


class ShiftBenchProcessor:
    """Turns images and prompts containing one ``<image>`` into ``input_ids``, ``attention_mask``,
    ``pixel_values``. ``<image>`` expands to G*G image tokens (row-major cells); ``<bos>`` is prepended.
    Prompts outside the testbed's language and images that are not its renders raise `InputError`
    (``inputs.py``); ``max_hops``: the longest walk the model was trained on (None: the vocabulary's h1..h8)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, grid_size: int = 12, cell_pixels: int = 8,
                 max_hops: int | None = None):
        self.tokenizer = tokenizer
        self.grid_size = grid_size
        self.cell_pixels = cell_pixels
        self.max_hops = max_hops
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def build(cls, grid_size: int = 12, cell_pixels: int = 8) -> ShiftBenchProcessor:
        return cls(build_tokenizer(grid_size), grid_size, cell_pixels)

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size * self.grid_size

    def check_prompt(self, prompt, where: str = "prompt") -> None:
        check_prompt(prompt, self.grid_size, self.max_hops, self.tokenizer.get_vocab(), where)

    def expand_prompt(self, prompt: str) -> str:
        self.check_prompt(prompt)
        return "<bos> " + prompt.replace(IMAGE_TOKEN, " ".join([IMAGE_TOKEN] * self.num_image_tokens))

    def check_batch(self, images, text) -> tuple[list, list[str]]:
        """(images as uint8 arrays, prompts), after every check; one image per prompt."""
        images, text = _as_lists(images, text)
        many = len(text) > 1
        for i, t in enumerate(text):
            self.check_prompt(t, f"prompt {i}" if many else "prompt")
        arrays = [image_array(im, self.grid_size, self.cell_pixels, f"image {i}" if many else "image")
                  for i, im in enumerate(images)]
        return arrays, text

    def __call__(self, images=None, text=None, padding_side: str = "left", return_tensors: str = "pt", **kwargs):
        images, text = self.check_batch(images, text)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = padding_side
        try:
            enc = self.tokenizer(
                [self.expand_prompt(t) for t in text], padding=True, return_tensors="pt", add_special_tokens=False
            )
        finally:
            self.tokenizer.padding_side = side
        pixels = images_to_pixels(images)
        return BatchFeature(
            {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": pixels}
        )

    @property
    def chat_template(self) -> str:
        """ShiftBench's chat format in words; `apply_chat_template` renders it (no Jinja template)."""
        return "one user message [image, text]: its items in order, joined by spaces, the image as <image>"

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: str | None = "pt", processor_kwargs=None,
                            **kwargs):
        """transformers' chat format -> ShiftBench inputs. A conversation is one user message whose content holds
        one image and text, e.g. ``[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text",
        "text": "lookup r3c7"}]}]``; it renders as its items in order, the image as ``<image>``, joined by spaces
        (``"<image> lookup r3c7"``, the prompt ``dstp bench`` uses). ShiftBench has no roles or turn markers, so
        ``add_generation_prompt`` adds nothing. ``conversation``: one conversation or a list of them (a batch).
        ``tokenize=False``: the prompt string (a list for a batch); ``tokenize=True``: ``self(images, prompts)``
        left-padded (``processor_kwargs["padding_side"]``), a BatchFeature with ``return_dict`` else its input_ids."""
        single = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(conversation[0], dict)
        batch = [conversation] if single else conversation
        if not isinstance(batch, (list, tuple)) or not batch:
            raise InputError("ShiftBench chat: expected a conversation (a list of messages) or a list of them")
        images, prompts = [], []
        for c, conv in enumerate(batch):
            image, prompt = self._render_conversation(conv, f"ShiftBench chat: conversation {c}")
            images.append(image)
            prompts.append(prompt)
        if not tokenize:
            return prompts[0] if single else prompts
        if return_tensors not in (None, "pt"):
            raise InputError(f"ShiftBench chat: return_tensors={return_tensors!r} is not supported; use 'pt'")
        side = dict(processor_kwargs or {}).get("padding_side", kwargs.get("padding_side", "left"))
        try:
            out = self(images=images, text=prompts, padding_side=side)
        except ValueError as e:
            raise InputError(f"ShiftBench chat: {e}") from None
        return out if return_dict else out["input_ids"]

    def _render_conversation(self, conv, where: str):
        """(image, prompt) of one conversation: exactly one user message with exactly one image."""
        if not isinstance(conv, (list, tuple)) or not conv:
            raise InputError(f"{where} must be a non-empty list of messages")
        for m, message in enumerate(conv):
            role = message.get("role") if isinstance(message, dict) else None
            if role != "user":
                raise InputError(f"{where}, message {m}: role {role!r} is not supported; ShiftBench takes one "
                                 f"'user' message (no system prompt, no earlier turns)")
        if len(conv) != 1:
            raise InputError(f"{where} has {len(conv)} user messages; ShiftBench takes one (no earlier turns)")
        content = conv[0].get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, (list, tuple)):
            raise InputError(f"{where}: content must be a string or a list of items")
        words, images = [], []
        for i, item in enumerate(items):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "image":
                images.append(_load_image(item, f"{where}, item {i}"))
                words.append(IMAGE_TOKEN)
            elif kind == "text" and isinstance(item.get("text"), str):
                if IMAGE_TOKEN in item["text"]:
                    raise InputError(f"{where}, item {i}: the text holds {IMAGE_TOKEN!r}; give the image as an "
                                     f"item {{'type': 'image', 'image': ...}} instead")
                if item["text"].strip():
                    words.append(item["text"].strip())
            else:
                raise InputError(f"{where}, item {i}: expected {{'type': 'image', ...}} or {{'type': 'text', "
                                 f"'text': str}}, got {item!r:.80}")
        if len(images) != 1:
            raise InputError(f"{where} has {len(images)} images; ShiftBench takes exactly one per conversation")
        return images[0], " ".join(words)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        cfg = {"processor_class": type(self).__name__, "grid_size": self.grid_size, "cell_pixels": self.cell_pixels}
        if self.max_hops is not None:
            cfg["max_hops"] = self.max_hops
        (path / PROCESSOR_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> ShiftBenchProcessor:
        path = Path(path)
        cfg = json.loads((path / PROCESSOR_CONFIG).read_text())
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        return cls(tokenizer, cfg["grid_size"], cfg["cell_pixels"], cfg.get("max_hops", trained_max_hops(path)))


def trained_max_hops(path: Path) -> int | None:
    """The longest walk a checkpoint was trained on, from its training record (None if it has none)."""
    record = path / "training_record.json"
    if not record.is_file():
        return None
    return json.loads(record.read_text()).get("config", {}).get("max_hops")


def _load_image(item: dict, where: str):
    """The image of a chat item: a PIL image or HxWx3 array under "image", or a local file path under
    "image", "url" or "path"."""
    source = next((item[k] for k in ("image", "url", "path") if item.get(k) is not None), None)
    if source is None:
        raise InputError(f"{where}: an image item needs the image under 'image' (or 'url'/'path')")
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise InputError(f"{where}: cannot open image {str(source)!r} ({type(e).__name__})") from None
    return source
