"""The hub-shaped Qwen3.5 fixture: a tiny random `Qwen3_5ForConditionalGeneration` saved with Qwen3.5's real
classes (`Qwen3VLProcessor`, `Qwen2VLImageProcessor`, `Qwen3VLVideoProcessor`, `Qwen3_5Tokenizer`), loaded by id
offline like the families of tests/hub_fixtures.py (same cache, same atomic snapshot writing).

What makes it Qwen3.5 and not Qwen3-VL: the LLM is hybrid, 8 layers whose every fourth (3 and 7) is full
attention and the rest Gated DeltaNet linear attention (the published configs' `full_attention_interval` 4);
its attention has the output gate (q_proj twice as wide), q/k norms and partial rotary (a quarter of head_dim,
interleaved M-RoPE); no DeepStack. The tokenizer carries Qwen3.5's special tokens (ChatML, vision, tool and
<think> tokens) and the chat template opens a <think> block after the generation prompt (enable_thinking=False
writes an empty one), as the published Qwen3.5 templates do.

HF-FIXTURES: with random weights the linear-attention layers forget within a few tokens; their decay is made
slow (A_log) so that answers depend on the image. Builds only where transformers has Qwen3.5 (5.17 and later)."""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import uuid

import hub_fixtures as H

FAMILY = "qwen3_5"
REPO_ID = "dstp-fixtures/tiny-qwen3.5"
MODEL_CLASS = "Qwen3_5ForConditionalGeneration"
SEED = 16
LAYERS = 8
LAYER_TYPES = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(LAYERS)]
SPECIAL = H.QWEN_SPECIAL  # ChatML and vision tokens, as Qwen2.5-VL / Qwen3-VL
NON_SPECIAL = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

_CONTENT = (
    "{%- macro render(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)
# ChatML; an assistant turn's reasoning before </think> is dropped from history; the generation prompt opens a
# <think> block (closed empty when enable_thinking is false)
CHAT_TEMPLATE = _CONTENT + (
    "{%- for message in messages -%}"
    "{%- set content = render(message['content']) -%}"
    "{%- if message['role'] == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}"
    "{%- else -%}{{- '<think>\n' -}}{%- endif -%}{%- endif -%}"
)


def available() -> bool:
    import transformers

    return hasattr(transformers, MODEL_CLASS)


def _tokenizer():
    """Byte-level BPE (Qwen's pre-tokenizer) as Qwen3_5Tokenizer, from vocab + merges; special tokens after it."""
    from transformers import AddedToken, Qwen3_5Tokenizer

    base = H._qwen_style_tokenizer(SPECIAL, eos="<|im_end|>", pad="<|endoftext|>", extra_special=SPECIAL[1:],
                                   chat_template=CHAT_TEMPLATE)
    vocab = {t: i for t, i in base.get_vocab().items() if i < len(base) - len(SPECIAL)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in base._merges] \
        if hasattr(base, "_merges") else None
    t = Qwen3_5Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", extra_special_tokens=SPECIAL[1:], model_max_length=32768)
    t.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL], special_tokens=True)
    t.add_tokens([AddedToken(s, special=False, normalized=False) for s in NON_SPECIAL])
    t.chat_template = CHAT_TEMPLATE
    return t


def _processor(tok):
    import transformers as tf

    px = (H.QWEN_PATCH * H.QWEN_MERGE) ** 2
    geom = dict(patch_size=H.QWEN_PATCH, merge_size=H.QWEN_MERGE, temporal_patch_size=H.QWEN_TEMPORAL)
    ip = tf.Qwen2VLImageProcessor(size={"shortest_edge": H.QWEN_MIN_TOKENS * px,
                                        "longest_edge": H.QWEN_MAX_TOKENS * px}, **geom)
    vp = tf.Qwen3VLVideoProcessor(size={"shortest_edge": 2 * H.QWEN_MIN_TOKENS * px,
                                        "longest_edge": 8 * H.QWEN_MAX_TOKENS * px},
                                  cap_pixels_per_frame=True, max_video_tokens=H.QWEN_MAX_TOKENS,
                                  min_frames=2, max_frames=16, fps=2, **geom)
    return tf.Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=CHAT_TEMPLATE)


def _model(tok):
    import torch
    import transformers as tf

    eot, im_end, vs, ve, image, video = H._ids(tok, ["<|endoftext|>", "<|im_end|>", "<|vision_start|>",
                                                     "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    # head_dim 64 with a quarter rotated: 8 frequency pairs, interleaved M-RoPE sections [3, 3, 2]
    text = dict(vocab_size=H._vocab_size(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                layer_types=LAYER_TYPES, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4, max_position_embeddings=2048, partial_rotary_factor=0.25,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2],
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.25},
                bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot, tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                  patch_size=H.QWEN_PATCH, spatial_merge_size=H.QWEN_MERGE, temporal_patch_size=H.QWEN_TEMPORAL,
                  in_channels=3, num_position_embeddings=64)
    cfg = tf.Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                           vision_start_token_id=vs, vision_end_token_id=ve, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    model = H._randomize(getattr(tf, MODEL_CLASS)(cfg), SEED)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "linear_attn"):  # slow decay (HF-FIXTURES): exp(A_log) in [0.005, 0.05]
                A = torch.empty(layer.linear_attn.A_log.shape).uniform_(0.005, 0.05, generator=g)
                layer.linear_attn.A_log.copy_(A.log())
        head = model.get_output_embeddings().weight
        head[H.never_emitted_ids(tok, head.shape[0])] = 0.0
        head[H._ids(tok, NON_SPECIAL)] = 0.0
    gen = dict(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    model.generation_config = tf.GenerationConfig(**gen)
    return model.eval()


def _write_repo(directory: pathlib.Path) -> None:
    from transformers.utils import logging as tf_logging

    tok = _tokenizer()
    proc, model = _processor(tok), _model(tok)
    bar = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
        proc.save_pretrained(directory)
    finally:
        if bar:
            tf_logging.enable_progress_bar()
    (directory / "README.md").write_text(f"# {REPO_ID}\n\nTiny random-weight {MODEL_CLASS} built by dstp's "
                                         "tests/hub_fixture_qwen3_5.py for tests only. Not a real model.\n")


def _snapshot_hash() -> str:
    """From this file, hub_fixtures.py (whose helpers build the tokenizer and weights) and transformers' version."""
    return hashlib.sha1((REPO_ID + H._source_digest()).encode() + pathlib.Path(__file__).read_bytes()).hexdigest()


def build(hub_cache: pathlib.Path) -> str:
    """Write the repo into hub_cache (skipped when this builder version's snapshot is complete); returns its id."""
    folder = H._repo_folder(hub_cache, REPO_ID)
    h = _snapshot_hash()
    ref = folder / "refs" / "main"
    if ref.is_file() and ref.read_text().strip() == h and H._snapshot_is_complete(folder / "snapshots" / h):
        return REPO_ID
    snapshots = folder / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    final = snapshots / h
    if not H._snapshot_is_complete(final):
        tmp = folder / f".tmp-{h[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            _write_repo(tmp)
            if not H._snapshot_is_complete(final):
                shutil.rmtree(final, ignore_errors=True)
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not H._snapshot_is_complete(final):
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (folder / "refs").mkdir(exist_ok=True)
    ref_tmp = folder / "refs" / f".main-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ref_tmp.write_text(h)
    os.replace(ref_tmp, folder / "refs" / "main")
    return REPO_ID
