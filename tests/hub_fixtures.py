"""Hub-shaped test fixtures: one tiny random checkpoint per supported family, in a local Hugging Face hub cache.

Each repo holds what a real checkpoint holds: `config.json` + `generation_config.json` + `model.safetensors`
of a tiny random model, the family's REAL processor classes (image processor, video processor where the
family has one) saved with `save_pretrained`, a small REAL tokenizer built here with the `tokenizers` library
in the family's style (with the family's special tokens), and a chat template in the family's style. Repos are
laid out as `<hub_cache>/models--ORG--NAME/snapshots/<hash>/...` + `refs/main`, so that
`AutoProcessor.from_pretrained("dstp-fixtures/tiny-qwen2.5-vl")` and
`Qwen2_5_VLForConditionalGeneration.from_pretrained(...)` load them offline (`HF_HUB_OFFLINE=1`).

Nothing here is committed: `build_hub_cache` writes the repos at test time (a few seconds, deterministic; a
repo whose snapshot for this file's current content is complete is skipped). The snapshot hash is derived from
this file's source and the transformers version, so editing the builder rebuilds the repos.

Visual tokens per image (tests/test_hub_fixtures.py pins the counts per image size):
- llava: CLIP 24x24, patch 6 -> 16 tokens for every image size (LLaVA-1.5 resizes + centre-crops).
- llava_next: anyres, base view 24x24 (16 tokens) + crops on pinpoints 24x48 / 48x24 / 48x48 / 24x72 / 72x24,
  unpadded, one newline per row: the count depends on the image size.
- qwen2_5_vl, qwen3_vl: dynamic resolution, patch 4, 2x2 merge: one token per 8x8 pixels, the image resized
  to multiples of 8 within [16, 80] tokens.
- internvl: 32x32 tiles of 16 tokens, GotOcr2 crop-to-patches with at most 2 tiles (+ a thumbnail when 2).
- llava_onevision: SigLIP 24x24 views of 16 tokens (no CLS); a row's only image: base view + crops on grids 1x1 to
  4x4, unpadded, one newline per row, downsampled when over 9 views' worth (anyres_max_9); a row with several
  images: one view + one newline each.
- qwen3_vl_moe: as qwen3_vl.

API: FAMILIES, REPO_IDS (family -> id, plus "qwen2_5_vl_sampling": the Qwen2.5-VL repo, same weights, whose
generation_config.json has Qwen2.5-VL-Instruct's sampling defaults), build_hub_cache(hub_cache),
sample_images(n, seed, sizes=None), conversation(images, text, system=None); tests/conftest.py's session
fixture `hub_models` builds the cache offline and returns REPO_IDS. Also here: MODEL_CLASSES (family -> class
name), IMAGE_TOKEN / VIDEO_TOKEN (family -> placeholder token), CHAT_TEMPLATES, never_emitted_ids(tokenizer,
vocab_size) (the LM-head rows zeroed), snapshot_dir(hub_cache, repo_id).

Model: 4 LLM layers, hidden 64, a 2-3 block vision tower of width 32, float32, sdpa, weights N(0, 0.2) from a
per-family seed; the LM-head rows of every special token but eos (and the padded rows past the tokenizer)
are zero. Chat templates: LLaVA-1.5 "USER: <image>\n... ASSISTANT:", LLaVA-NeXT (Mistral) "[INST] <image>\n...
[/INST]" (no generation prompt of its own, as Mistral), Qwen ChatML with <|vision_start|><|image_pad|>
<|vision_end|> (Qwen2.5-VL adds its default system message), InternVL ChatML with "<IMG_CONTEXT>\n" per image
(InternVLProcessor expands its tokenizer's context_image_token into <img> 16 x n_tiles <IMG_CONTEXT> </img>;
the real InternVL-HF templates write <IMG_CONTEXT> too, not <image>).
LLaVA-OneVision (llava-hf style): "<|im_start|>user <image><image>\n<text><|im_end|><|im_start|>assistant\n" (a
message's images first, no newline after <|im_end|>). Qwen3-VL-MoE: Qwen3-VL's template, processor and tokenizer;
each LLM layer a mixture of 8 experts, top 2.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid

import numpy as np

FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "internvl", "llava_onevision", "qwen3_vl_moe")
# fixtures whose own checks (classes, tokenizer, template) live in the family's test file (tests/test_gemma4.py);
# test_chat_hub.py runs them with the others
MORE_FAMILIES = ("gemma4",)

REPO_IDS: dict[str, str] = {
    "llava": "dstp-fixtures/tiny-llava-1.5",
    "llava_next": "dstp-fixtures/tiny-llava-next",
    "qwen2_5_vl": "dstp-fixtures/tiny-qwen2.5-vl",
    "qwen3_vl": "dstp-fixtures/tiny-qwen3-vl",
    "internvl": "dstp-fixtures/tiny-internvl3.5",
    "llava_onevision": "dstp-fixtures/tiny-llava-onevision-qwen2",
    "qwen3_vl_moe": "dstp-fixtures/tiny-qwen3-vl-moe",
    "gemma4": "dstp-fixtures/tiny-gemma-4",
    "qwen2_5_vl_sampling": "dstp-fixtures/tiny-qwen2.5-vl-sampling",
}

# Qwen2.5-VL-Instruct's generation_config.json sampling defaults (the extra repo carries them).
QWEN2_5_VL_SAMPLING = {"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1,
                       "repetition_penalty": 1.05}

WEIGHT_STD = 0.2  # HF-FIXTURES: 0.02-0.08 makes a tiny random model answer the same for every image
SEEDS = {"llava": 11, "llava_next": 12, "qwen2_5_vl": 13, "qwen3_vl": 14, "internvl": 15, "llava_onevision": 16,
         "qwen3_vl_moe": 17, "gemma4": 16}
LLM_LAYERS = 4

# Special tokens per family (in id order, appended after the trained vocabulary).
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
INTERNVL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                    "<video>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
ONEVISION_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]  # llava-hf's added tokens
LLAMA_SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2, as in Llama; "<image>" and "<pad>" come after the vocab

# The token that stands for one image in the rendered chat text, which the processor repeats once per visual
# feature in input_ids (InternVL also wraps each image's run in <img> ... </img>).
IMAGE_TOKEN = {"llava": "<image>", "llava_next": "<image>", "qwen2_5_vl": "<|image_pad|>",
               "qwen3_vl": "<|image_pad|>", "internvl": "<IMG_CONTEXT>", "llava_onevision": "<image>",
               "qwen3_vl_moe": "<|image_pad|>", "gemma4": "<|image|>"}
VIDEO_TOKEN = {"qwen2_5_vl": "<|video_pad|>", "qwen3_vl": "<|video_pad|>", "internvl": "<video>",
               "llava_onevision": "<video>", "qwen3_vl_moe": "<|video_pad|>",
               "gemma4": "<|video|>"}

_CORPUS = """\
The picture shows a red square on the left and a blue circle on the right.
A small green triangle sits above a large yellow rectangle in the middle of the image.
What is in the image? Describe the picture in one sentence.
There are three cats and two dogs playing in the garden near the old house.
The sky is bright and clear, with a few white clouds over the mountains.
Answer the question using a single word or phrase.
How many objects are there? There are four objects: two boxes, one ball and one cup.
The man is holding an umbrella while he walks across the busy street in the rain.
A woman reads a book under a tree; the light comes from the window behind her.
USER: What color is the car? ASSISTANT: The car is black and silver.
[INST] What is shown in this image? [/INST] The image shows a kitchen with a table.
Please look at the chart and tell me which bar is the highest, then explain why.
The path goes from the top left corner to the bottom right corner of the grid.
Row 1, column 2 points to row 7, column 9; follow the arrow and read the next cell.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 24 48 64 100 2025.
Is the door open or closed? The door is closed, and the lights are off.
Yes, no, maybe. Left, right, up, down. First, second, third, last.
You are a helpful assistant. Think step by step, and give a short answer.
This photo was taken at night: the city lights are orange and the river is dark.
A plate of food with rice, beans, a piece of bread and a glass of water.
"""


# ----------------------------------------------------------------------------------------------------------
# small helpers for tests
# ----------------------------------------------------------------------------------------------------------

DEFAULT_SIZES = ((40, 40), (64, 32), (32, 72), (96, 64), (48, 48), (72, 40))


def sample_images(n: int, seed: int, sizes=None):
    """n random RGB PIL images (seeded). sizes: a list of n (width, height); None cycles DEFAULT_SIZES.

    Each image is a grid of random colour cells (about 6 per side) plus mild pixel noise, so that two images
    stay different after any family's resize (pure per-pixel noise averages to grey when downscaled)."""
    from PIL import Image

    if sizes is None:
        sizes = [DEFAULT_SIZES[i % len(DEFAULT_SIZES)] for i in range(n)]
    sizes = [tuple(int(v) for v in s) for s in sizes]
    if len(sizes) != n:
        raise ValueError(f"sample_images: {n} images asked for but {len(sizes)} sizes given")
    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        if w < 1 or h < 1:
            raise ValueError(f"sample_images: bad size {(w, h)}")
        cell = max(2, min(w, h) // 6)
        cells = rng.integers(0, 256, size=(-(-h // cell), -(-w // cell), 3))
        arr = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)[:h, :w]
        arr = arr + rng.integers(-20, 21, size=arr.shape)
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB"))
    return out


def conversation(images, text: str, system: str | None = None) -> list[dict]:
    """One user message (images first, then the text) in transformers' chat format, optionally after a
    system message. `apply_chat_template` rewrites contents in place: pass a copy.deepcopy of this."""
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = [{"type": "image", "image": im} for im in (images or [])]
    content.append({"type": "text", "text": text})
    messages.append({"role": "user", "content": content})
    return messages


# ----------------------------------------------------------------------------------------------------------
# chat templates (written for these fixtures, in each family's style)
# ----------------------------------------------------------------------------------------------------------

# a message's text parts, joined (content may be a plain string or a list of typed parts)
_TEXT_MACRO = (
    "{%- macro text_of(message) -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}"
    "{%- if not loop.first %} {% endif -%}{{- part['text'] -}}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
_IMAGES_MACRO = (
    "{%- macro images_of(message, token) -%}"
    "{%- if message['content'] is not string -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- token -}}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
)

# LLaVA-1.5: "<system> USER: <image>\n<text> ASSISTANT: <answer></s>USER: ... ASSISTANT:"
LLAVA_TEMPLATE = _TEXT_MACRO + _IMAGES_MACRO + (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- text_of(message) + ' ' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- 'USER: ' + images_of(message, '<image>\n') + text_of(message) + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + text_of(message) + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# LLaVA-NeXT (Mistral): "[INST] <system>\n\n<image>\n<text> [/INST] <answer></s>[INST] ... [/INST]"
# (Mistral has no generation prompt of its own: a prompt ending in " [/INST]" is ready to generate.)
LLAVA_NEXT_TEMPLATE = _TEXT_MACRO + _IMAGES_MACRO + (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + text_of(message) + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST] ' + ns.system + images_of(message, '<image>\n') + text_of(message) + ' [/INST]' -}}"
    "{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' + text_of(message) + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _chatml_template(image: str, video: str, default_system: str | None) -> str:
    """Qwen / InternVL ChatML: '<|im_start|>role\\n' + parts in order + '<|im_end|>\\n'."""
    head = ""
    if default_system is not None:
        head = ("{%- if messages and messages[0]['role'] != 'system' -%}"
                "{{- '<|im_start|>system\n" + default_system + "<|im_end|>\n' -}}{%- endif -%}")
    return (
        "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}" + head +
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set image_count.value = image_count.value + 1 -%}"
        "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
        "{{- '" + image + "' -}}"
        "{%- elif part['type'] == 'video' -%}{%- set video_count.value = video_count.value + 1 -%}"
        "{%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}"
        "{{- '" + video + "' -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    )


QWEN2_5_VL_TEMPLATE = _chatml_template("<|vision_start|><|image_pad|><|vision_end|>",
                                       "<|vision_start|><|video_pad|><|vision_end|>",
                                       "You are a helpful assistant.")
QWEN3_VL_TEMPLATE = _chatml_template("<|vision_start|><|image_pad|><|vision_end|>",
                                     "<|vision_start|><|video_pad|><|vision_end|>", None)
# InternVLProcessor expands its tokenizer's context_image_token (<IMG_CONTEXT>) into <img>...</img>.
INTERNVL_TEMPLATE = _chatml_template("<IMG_CONTEXT>\n", "<video>\n", None)

# LLaVA-OneVision (llava-hf): "<|im_start|>role " + every <image>, then every <video>, then "\n" + each text part,
# "<|im_end|>" (no newline after it); the generation prompt "<|im_start|>assistant\n"
LLAVA_ONEVISION_TEMPLATE = _IMAGES_MACRO + (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + ' ' + images_of(message, '<image>') -}}"
    "{%- if message['content'] is string -%}{{- '\n' + message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}{{- '<video>' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- '\n' + part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Gemma 4: "<bos><|turn>system\n...<turn|>\n<|turn>user\n<|image|>text<turn|>\n<|turn>model\n" and, unless
# enable_thinking, an empty thought channel (as google/gemma-4-*-it's template); the assistant role is "model"
GEMMA4_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|video|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<turn|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\n' -}}"
    "{%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}"
    "{%- endif -%}"
)

CHAT_TEMPLATES = {"llava": LLAVA_TEMPLATE, "llava_next": LLAVA_NEXT_TEMPLATE, "qwen2_5_vl": QWEN2_5_VL_TEMPLATE,
                  "qwen3_vl": QWEN3_VL_TEMPLATE, "internvl": INTERNVL_TEMPLATE,
                  "llava_onevision": LLAVA_ONEVISION_TEMPLATE, "qwen3_vl_moe": QWEN3_VL_TEMPLATE,
                  "gemma4": GEMMA4_TEMPLATE}


# ----------------------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------------------

def _corpus_lines():
    return [line for line in _CORPUS.splitlines() if line.strip()]


def _qwen_style_tokenizer(special: list[str], eos: str, pad: str, extra_special, chat_template: str,
                          n_merges: int = 180):
    """Byte-level BPE trained with Qwen2Tokenizer's own pre-tokenizer, rebuilt as Qwen2Tokenizer from vocab +
    merges (HF-FIXTURES: a foreign tokenizers object breaks on reload), special tokens after the vocab."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + n_merges, initial_alphabet=alphabet,
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for s in special:
        vocab[s] = len(vocab)
    t = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=eos,
                       pad_token=pad, extra_special_tokens=extra_special, errors="replace",
                       model_max_length=32768, clean_up_tokenization_spaces=False, split_special_tokens=False)
    t.add_tokens([AddedToken(s, special=True, normalized=False) for s in special], special_tokens=True)
    t.chat_template = chat_template
    return t


def _llama_style_tokenizer(chat_template: str, n_pieces: int = 200):
    """SentencePiece-like BPE (metaspace, byte fallback) as a LlamaTokenizer: <unk> <s> </s>, <0x00>..<0xFF>,
    the trained pieces, then the added special tokens <image> and <pad> (as in llava-hf checkpoints)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, LlamaTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, special_tokens=[], show_progress=False)
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = {s: i for i, s in enumerate(LLAMA_SPECIAL)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    t = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=False,
                       model_max_length=4096, pad_token=None, clean_up_tokenization_spaces=False)
    t.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    t.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    t.chat_template = chat_template
    return t


# google/gemma-4-*'s tokenizer_config.json: these names for these tokens (the processor reads them)
GEMMA4_SPECIAL = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                  "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
                  "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>",
                  "eoc_token": "<channel|>", "think_token": "<|think|>"}


def _gemma_tokenizer(chat_template: str, n_pieces: int = 200):
    """GemmaTokenizer (SentencePiece-style BPE with byte fallback, spaces as \u2581): <pad> <eos> <bos> <unk>
    <mask> (ids 0-4, as in Gemma), <0x00>..<0xFF>, the trained pieces, then Gemma 4's turn, image, audio and
    video tokens."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import AddedToken, GemmaTokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, special_tokens=[], show_progress=False)
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = {s: i for i, s in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    t = GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=dict(GEMMA4_SPECIAL),
                       padding_side="left", add_bos_token=False, model_max_length=4096)
    t.add_tokens([AddedToken(s, special=True, normalized=False)
                  for s in [*GEMMA4_SPECIAL.values(), "<|video|>"]], special_tokens=True)
    t.chat_template = chat_template
    return t


def _tokenizer(family: str):
    if family == "gemma4":
        return _gemma_tokenizer(CHAT_TEMPLATES[family])
    if family == "llava" or family == "llava_next":
        return _llama_style_tokenizer(CHAT_TEMPLATES[family])
    if family in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        return _qwen_style_tokenizer(QWEN_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>",
                                     extra_special=QWEN_SPECIAL[1:], chat_template=CHAT_TEMPLATES[family])
    if family == "internvl":
        extra = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
        return _qwen_style_tokenizer(INTERNVL_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>",
                                     extra_special=extra, chat_template=CHAT_TEMPLATES[family])
    if family == "llava_onevision":
        return _qwen_style_tokenizer(ONEVISION_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>",
                                     extra_special=ONEVISION_SPECIAL[1:], chat_template=CHAT_TEMPLATES[family])
    raise KeyError(family)


# ----------------------------------------------------------------------------------------------------------
# processors
# ----------------------------------------------------------------------------------------------------------

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLAVA_IMAGE, LLAVA_PATCH = 24, 6                     # 4x4 patches (+ CLS, dropped): 16 tokens a view
LLAVA_NEXT_PINPOINTS = [[24, 48], [48, 24], [48, 48], [24, 72], [72, 24]]   # (height, width)
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2      # one token per 8x8 pixels
QWEN_MIN_TOKENS, QWEN_MAX_TOKENS = 16, 80
INTERNVL_TILE, INTERNVL_PATCH, INTERNVL_MAX_TILES = 32, 4, 2   # 8x8 patches, pixel shuffle 0.5: 16 a tile
INTERNVL_TILE_TOKENS = (INTERNVL_TILE // INTERNVL_PATCH) ** 2 // 4
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
ONEVISION_VIEW, ONEVISION_PATCH = 24, 6              # SigLIP 4x4 patches, no CLS: 16 tokens a view
# crop grids 1x1 to 4x4 of 24-pixel views, as the real 1x1 to 6x6 of 384; anyres_max_9 (the real value) downsamples
# the unpadded crop features of the largest grids (over 9 views' worth)
ONEVISION_PINPOINTS = [[ONEVISION_VIEW * h, ONEVISION_VIEW * w] for h in (1, 2, 3, 4) for w in (1, 2, 3, 4)]
ONEVISION_ASPECT = "anyres_max_9"


GEMMA4_PATCH, GEMMA4_POOL, GEMMA4_MAX_TOKENS = 4, 2, 70  # at most 70 soft tokens an image (the smallest budget)


def _processor(family: str, tokenizer):
    import transformers as tf

    template = CHAT_TEMPLATES[family]
    if family == "gemma4":
        geom = dict(patch_size=GEMMA4_PATCH, pooling_kernel_size=GEMMA4_POOL, max_soft_tokens=GEMMA4_MAX_TOKENS)
        return tf.Gemma4Processor(feature_extractor=tf.Gemma4AudioFeatureExtractor(),
                                  image_processor=tf.Gemma4ImageProcessor(**geom),
                                  video_processor=tf.Gemma4VideoProcessor(**geom), tokenizer=tokenizer,
                                  image_seq_length=GEMMA4_MAX_TOKENS, chat_template=template)
    if family == "llava":
        ip = tf.CLIPImageProcessor(size={"shortest_edge": LLAVA_IMAGE},
                                   crop_size={"height": LLAVA_IMAGE, "width": LLAVA_IMAGE},
                                   do_center_crop=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)
        return tf.LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=LLAVA_PATCH,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=template)
    if family == "llava_next":
        ip = tf.LlavaNextImageProcessor(size={"shortest_edge": LLAVA_IMAGE},
                                        crop_size={"height": LLAVA_IMAGE, "width": LLAVA_IMAGE},
                                        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, do_pad=True,
                                        image_mean=CLIP_MEAN, image_std=CLIP_STD)
        return tf.LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=LLAVA_PATCH,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                     chat_template=template)
    if family == "llava_onevision":
        view = {"height": ONEVISION_VIEW, "width": ONEVISION_VIEW}
        ip = tf.LlavaOnevisionImageProcessor(size=view, image_grid_pinpoints=ONEVISION_PINPOINTS, do_pad=True,
                                             image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
        vp = tf.LlavaOnevisionVideoProcessor(size=view, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
        return tf.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp,
                                          num_image_tokens=(ONEVISION_VIEW // ONEVISION_PATCH) ** 2,
                                          vision_feature_select_strategy="full", vision_aspect_ratio=ONEVISION_ASPECT,
                                          chat_template=template)
    if family in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        px = (QWEN_PATCH * QWEN_MERGE) ** 2
        # size=, never min_pixels=/max_pixels= (HF-FIXTURES: those overwrite the class default for everyone)
        geom = dict(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
        ip = tf.Qwen2VLImageProcessor(size={"shortest_edge": QWEN_MIN_TOKENS * px,
                                            "longest_edge": QWEN_MAX_TOKENS * px}, **geom)
        if family == "qwen2_5_vl":
            vp = tf.Qwen2VLVideoProcessor(size={"shortest_edge": QWEN_MIN_TOKENS * px,
                                                "longest_edge": QWEN_MAX_TOKENS * px},
                                          cap_pixels_per_frame=True, max_video_tokens=QWEN_MAX_TOKENS, **geom)
            return tf.Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp,
                                          chat_template=template)
        # Qwen3-VL's video budget is over all frames (t * h * w); cap it per frame explicitly
        vp = tf.Qwen3VLVideoProcessor(size={"shortest_edge": 2 * QWEN_MIN_TOKENS * px,
                                            "longest_edge": 8 * QWEN_MAX_TOKENS * px},
                                      cap_pixels_per_frame=True, max_video_tokens=QWEN_MAX_TOKENS,
                                      min_frames=2, max_frames=16, fps=2, **geom)
        return tf.Qwen3VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp,
                                   chat_template=template)
    if family == "internvl":
        tile = {"height": INTERNVL_TILE, "width": INTERNVL_TILE}
        ip = tf.GotOcr2ImageProcessor(size=tile, crop_to_patches=True, min_patches=1,
                                      max_patches=INTERNVL_MAX_TILES, image_mean=CLIP_MEAN, image_std=CLIP_STD)
        vp = tf.InternVLVideoProcessor(size=tile, image_mean=CLIP_MEAN, image_std=CLIP_STD)
        return tf.InternVLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp,
                                    image_seq_length=INTERNVL_TILE_TOKENS, chat_template=template)
    raise KeyError(family)


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------

def _vocab_size(tokenizer) -> int:
    return -(-len(tokenizer) // 64) * 64


def _ids(tokenizer, tokens):
    out = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    assert all(isinstance(i, int) and i >= 0 for i in out), (tokens, out)
    return out


def _config(family: str, tok):
    import transformers as tf

    V = _vocab_size(tok)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if family in ("llava", "llava_next"):
        bos, eos, pad, image = _ids(tok, ["<s>", "</s>", "<pad>", "<image>"])
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=LLAVA_IMAGE, patch_size=LLAVA_PATCH,
                                     projection_dim=32, hidden_act="quick_gelu")
        text_kw = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=LLM_LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       rope_parameters=rope, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos,
                       pad_token_id=pad)
        common = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_id=image,
                      projector_hidden_act="gelu", tie_word_embeddings=False)
        if family == "llava":
            cfg = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**text_kw),
                                 image_seq_length=(LLAVA_IMAGE // LLAVA_PATCH) ** 2, **common)
        else:
            cfg = tf.LlavaNextConfig(vision_config=vision, text_config=tf.MistralConfig(sliding_window=None,
                                                                                         **text_kw),
                                     image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
                                     image_seq_length=(LLAVA_IMAGE // LLAVA_PATCH) ** 2, **common)
        gen = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    elif family in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        eot, im_end, vs, ve, image, video = _ids(tok, ["<|endoftext|>", "<|im_end|>", "<|vision_start|>",
                                                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
        ids = dict(image_token_id=image, video_token_id=video, vision_start_token_id=vs, vision_end_token_id=ve)
        # HF-FIXTURES: Qwen2.5-VL's bos/eos/pad ids belong in text_config
        text = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=LLM_LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                    bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot, tie_word_embeddings=False)
        if family == "qwen2_5_vl":
            text["rope_parameters"] = dict(rope, mrope_section=[2, 3, 3])
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                          patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                          window_size=2 * QWEN_PATCH * QWEN_MERGE, fullatt_block_indexes=[1], in_channels=3)
            cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        else:
            # head_dim 32: the interleaved M-RoPE sections [6, 5, 5] have the real model's layout; DeepStack
            # from vision blocks 0, 1, 2 into LLM layers 0, 1, 2
            text.update(head_dim=32, rope_parameters=dict(rope, mrope_section=[6, 5, 5], mrope_interleaved=True))
            vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                          patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                          in_channels=3, num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2])
            if family == "qwen3_vl":
                cfg = tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
            else:  # Qwen3-VL-30B-A3B's layout (every layer sparse, 128 experts, top 8), scaled down: 8, top 2
                text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                            mlp_only_layers=[])
                cfg = tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        gen = dict(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    elif family == "internvl":
        eot, im_end, context = _ids(tok, ["<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=INTERNVL_TILE, patch_size=INTERNVL_PATCH)
        text = dict(model_type="qwen3", vocab_size=V, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=LLM_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=2048, rope_parameters=rope, tie_word_embeddings=False,
                    bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot)
        cfg = tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=context,
                                image_seq_length=INTERNVL_TILE_TOKENS, downsample_ratio=0.5,
                                vision_feature_layer=-1, vision_feature_select_strategy="default",
                                tie_word_embeddings=False)
        gen = dict(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    elif family == "llava_onevision":
        eot, im_end, image, video = _ids(tok, ["<|endoftext|>", "<|im_end|>", "<image>", "<video>"])
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=ONEVISION_VIEW, patch_size=ONEVISION_PATCH, vision_use_head=False)
        text = tf.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=LLM_LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                              rope_parameters=rope, tie_word_embeddings=False, bos_token_id=eot, eos_token_id=im_end,
                              pad_token_id=eot)
        cfg = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=image,
                                      video_token_id=video, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", vision_aspect_ratio=ONEVISION_ASPECT,
                                      image_grid_pinpoints=ONEVISION_PINPOINTS, tie_word_embeddings=False)
        gen = dict(bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot)
    elif family == "gemma4":
        pad, eos, bos, turn_end = _ids(tok, ["<pad>", "<eos>", "<bos>", "<turn|>"])
        ids = dict(zip(("image_token_id", "boi_token_id", "eoi_token_id", "audio_token_id", "boa_token_id",
                        "eoa_token_index", "video_token_id"),
                       _ids(tok, ["<|image|>", "<|image>", "<image|>", "<|audio|>", "<|audio>", "<audio|>",
                                  "<|video|>"])))
        # the released layout (google/gemma-4-31B-it) at a tiny width: five sliding layers to one global one with
        # its own head size and K/V heads (keys are values), proportional partial rotary there, soft-capped
        # logits, images attended both ways at sliding layers; a window of 8 tokens, shorter than every prompt
        text = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                    num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
                    final_logit_softcapping=30.0, use_bidirectional_attention="vision",
                    hidden_size_per_layer_input=0, num_kv_shared_layers=0, vocab_size_per_layer_input=V,
                    max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=pad, eos_token_id=eos,
                    bos_token_id=bos,
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                        "rope_theta": 1000000.0}})
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=8, patch_size=GEMMA4_PATCH, pooling_kernel_size=GEMMA4_POOL,
                      position_embedding_size=64)
        cfg = tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=None, tie_word_embeddings=False,
                              **ids)
        gen = dict(bos_token_id=bos, eos_token_id=[eos, turn_end], pad_token_id=pad)
    else:
        raise KeyError(family)
    return cfg, gen


MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                  "qwen3_vl": "Qwen3VLForConditionalGeneration", "internvl": "InternVLForConditionalGeneration",
                  "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                  "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
                  "gemma4": "Gemma4ForConditionalGeneration"}


def _randomize(model, seed: int):
    """Deterministic weights: matrices N(0, WEIGHT_STD); biases N(0, 0.02); constant vectors (norm weights,
    layer scales) keep their value + N(0, 0.02); other vectors (CLS, image newline) N(0, WEIGHT_STD)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise * WEIGHT_STD)
            elif name.endswith("bias"):
                p.copy_(noise * 0.02)
            elif p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.copy_(p + noise * 0.02)
            else:
                p.copy_(noise * WEIGHT_STD)
    return model


def never_emitted_ids(tok, vocab_size: int) -> list[int]:
    """Rows of the LM head zeroed: every special token except the eos tokens, and the unused padded rows."""
    eos = {"<|im_end|>", "</s>", "<eos>", "<turn|>"}
    ids = [tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens + list(tok.get_added_vocab())
           if t not in eos]
    return sorted({i for i in ids if i is not None and i >= 0} | set(range(len(tok), vocab_size)))


def _model(family: str, tok, seed: int):
    import torch
    import transformers as tf

    cfg, gen = _config(family, tok)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(tf, MODEL_CLASSES[family])(cfg)
    _randomize(model, seed)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[never_emitted_ids(tok, head.shape[0])] = 0.0
    model.generation_config = tf.GenerationConfig(**gen)
    return model.eval(), gen


# ----------------------------------------------------------------------------------------------------------
# the hub cache
# ----------------------------------------------------------------------------------------------------------

def _source_digest() -> str:
    import transformers

    h = hashlib.sha1(pathlib.Path(__file__).read_bytes())
    h.update(transformers.__version__.encode())
    return h.hexdigest()


def _snapshot_hash(repo_id: str) -> str:
    return hashlib.sha1(f"{repo_id}\n{_source_digest()}".encode()).hexdigest()


def _repo_folder(hub_cache: pathlib.Path, repo_id: str) -> pathlib.Path:
    return pathlib.Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))


_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "processor_config.json", "chat_template.jinja")


def _snapshot_is_complete(snapshot: pathlib.Path) -> bool:
    return all((snapshot / name).is_file() for name in _REQUIRED_FILES)


def repo_is_complete(hub_cache: pathlib.Path, repo_id: str) -> bool:
    """refs/main names this builder version's snapshot, and the snapshot holds every file."""
    folder = _repo_folder(hub_cache, repo_id)
    ref = folder / "refs" / "main"
    h = _snapshot_hash(repo_id)
    return ref.is_file() and ref.read_text().strip() == h and _snapshot_is_complete(folder / "snapshots" / h)


def _write_repo(directory: pathlib.Path, family: str, sampling: bool) -> None:
    tok = _tokenizer(family)
    proc = _processor(family, tok)
    model, gen = _model(family, tok, SEEDS[family])
    if sampling:
        import transformers as tf

        model.generation_config = tf.GenerationConfig(**gen, **QWEN2_5_VL_SAMPLING)
    from transformers.utils import logging as tf_logging

    bar = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()  # "Writing model shards" once per repo
    try:
        model.save_pretrained(directory)
        proc.save_pretrained(directory)
    finally:
        if bar:
            tf_logging.enable_progress_bar()
    name = _repo_name(family, sampling)
    (directory / "README.md").write_text(
        f"# {name}\n\nTiny random-weight {MODEL_CLASSES[family]} built by dstp's tests/hub_fixtures.py for "
        "tests only (random weights, a tokenizer trained on a few sentences). Not a real model.\n")


def _repo_name(family: str, sampling: bool) -> str:
    return REPO_IDS["qwen2_5_vl_sampling" if sampling else family]


def _build_repo(hub_cache: pathlib.Path, family: str, sampling: bool = False) -> None:
    repo_id = _repo_name(family, sampling)
    if repo_is_complete(hub_cache, repo_id):
        return
    folder = _repo_folder(hub_cache, repo_id)
    h = _snapshot_hash(repo_id)
    snapshots = folder / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    final = snapshots / h
    if not _snapshot_is_complete(final):
        # written aside, then renamed into place whole: a snapshot folder is complete or absent, even with
        # several processes (pytest-xdist workers) building the same cache at once
        tmp = folder / f".tmp-{h[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            _write_repo(tmp, family, sampling)
            if not _snapshot_is_complete(final):
                if final.exists():  # damaged (files deleted by hand)
                    shutil.rmtree(final, ignore_errors=True)
                try:
                    os.rename(tmp, final)
                except OSError:  # another process renamed its copy first
                    if not _snapshot_is_complete(final):
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in snapshots.iterdir():  # snapshots of older builder versions
        if old.name != h:
            shutil.rmtree(old, ignore_errors=True)
    (folder / "refs").mkdir(exist_ok=True)
    ref_tmp = folder / "refs" / f".main-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ref_tmp.write_text(h)
    os.replace(ref_tmp, folder / "refs" / "main")


def build_hub_cache(hub_cache: pathlib.Path) -> dict[str, str]:
    """Write every fixture repo into hub_cache (the HF_HUB_CACHE folder, e.g. $HF_HOME/hub); repos already
    complete for this builder version are skipped. Returns REPO_IDS."""
    hub_cache = pathlib.Path(hub_cache)
    hub_cache.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES + MORE_FAMILIES:
        _build_repo(hub_cache, family)
    _build_repo(hub_cache, "qwen2_5_vl", sampling=True)
    return dict(REPO_IDS)


def snapshot_dir(hub_cache: pathlib.Path, repo_id: str) -> pathlib.Path:
    """The snapshot folder of a built repo (what from_pretrained(repo_id) reads)."""
    folder = _repo_folder(hub_cache, repo_id)
    return folder / "snapshots" / (folder / "refs" / "main").read_text().strip()
