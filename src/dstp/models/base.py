"""The adapter interface: the one place that knows a model family's Hugging Face internals.

The engine asks an adapter for four things and nothing else:
  * `prepare(batch)`: input embeddings with the visual features in place, which positions are visual,
    position ids (1-D `[B, T]` or M-RoPE `[3, B, T]`) and the first decode position;
  * the decoder layers, the final norm and the LM head;
  * `rotary(x, position_ids)`: cos/sin `[B, T, head_dim]` for any positions (kept tokens keep theirs);
  * `query(...)` / `key(...)`: one layer's rotated q or k, for the few attention rows pruners need.
Families with extra per-layer inputs (Qwen3-VL's DeepStack) override `after_layer`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from dstp.errors import ConfigError, InputError
from dstp.models import hf_compat
from dstp.models.video import VideoLayout, decode_video
from dstp.models.vision import VisionInternals  # noqa: F401 (the type of PreparedInputs.vision)


@dataclass
class PreparedInputs:
    inputs_embeds: torch.Tensor  # [B, T, D]
    attention_mask: torch.Tensor  # [B, T] bool, False on padding
    position_ids: torch.Tensor  # [B, T] or [3, B, T]
    next_position: torch.Tensor  # [B] long: position id of the first generated token
    visual_mask: torch.Tensor  # [B, T] bool: which positions hold visual tokens
    vision_scores: torch.Tensor | None = None  # [B, Nmax] encoder importance per visual token, if known
    extras: dict = field(default_factory=dict)  # family-specific per-token inputs (e.g. DeepStack)
    input_ids: torch.Tensor | None = None  # [B, T] the prompt's token ids (repetition penalty)
    vision: "VisionInternals | None" = None  # encoder internals before the projector (VisionZip), if asked for
    video: "VideoLayout | None" = None  # where each video token sits in its clip (None: no video in the batch)
    # [B, T] long: the block of each prompt token that sliding-window layers attend to both ways (Gemma 4: each
    # image), -1 outside any; None: causal everywhere
    attention_blocks: torch.Tensor | None = None

    @property
    def n_visual(self) -> torch.Tensor:
        return self.visual_mask.sum(-1)


class Adapter:
    """Base adapter for a decoder-only LM with standard q/k/v projections and RoPE."""

    family: str = "base"
    architectures: tuple[str, ...] = ()
    model_type: str = ""  # config.model_type that selects this adapter
    example_id: str = ""
    vision_internals: bool = False  # prepare(vision_scores=True) fills PreparedInputs.vision (VisionZip)
    takes_video: bool = False  # chat accepts video items; prepare fills PreparedInputs.video
    # keys a checkpoint's config.json must hold for this adapter (a tuple: any one of those names); transformers
    # would fill a missing one with its class default, which is not the checkpoint's
    config_fields: tuple = ()

    def __init__(self, model: nn.Module, processor=None):
        self.model = model.eval()
        self.processor = processor
        # the engine's attention calls are dstp's (engine/attention.py); outside the engine the model keeps SDPA
        hf_compat.use_engine_attention(self.language_model)

    @classmethod
    def model_class(cls, architecture: str):
        """The transformers class to load a checkpoint of this family with."""
        import transformers

        return getattr(transformers, architecture, None)

    @classmethod
    def check_methods(cls, config, pruner=None, policy_config=None):
        """A one-line ConfigError for a pruner or decode-time policy this family cannot run (before any model work).
        Every method runs on a family whose every layer is full attention; VisionPulse's rule (a per-step selection
        among every visual token) is not defined for sliding-window layers, which see none outside their window."""
        if type(policy_config).__name__ == "VisionPulseConfig":
            sliding = [i for i, w in enumerate(layer_windows(config.get_text_config())) if w is not None]
            if sliding:
                raise ConfigError(f"VisionPulse is not supported on {cls.family}: layers {sliding} are sliding-window "
                                  f"layers, where its selection among every visual token is not defined "
                                  f"(docs/visionpulse.md)")

    @classmethod
    def missing_config_field(cls, config: dict) -> str | None:
        """The first of `config_fields` that the raw config dict lacks, as written in messages, or None."""
        for entry in cls.config_fields:
            names = entry if isinstance(entry, tuple) else (entry,)
            if not any(name in config for name in names):
                return " or ".join(repr(n) for n in names)
        return None

    @classmethod
    def check_config(cls, config: dict):
        """Refuse (UnsupportedModelError, one line) a checkpoint whose raw config.json asks for what the adapter
        cannot run; called before the weights load."""

    @classmethod
    def load_processor(cls, path, **hub_kwargs):
        import transformers

        try:
            return transformers.AutoProcessor.from_pretrained(path, **hub_kwargs)
        except (OSError, ValueError, TypeError) as e:
            text = str(e).strip().splitlines()
            raise InputError(f"cannot load the processor of {path!r} (its image processor and tokenizer files): "
                             f"{text[0] if text else type(e).__name__}") from None

    def generation_defaults(self) -> dict:
        """The checkpoint's decoding settings (generation_config.json) that dstp honours."""
        gen = getattr(self.model, "generation_config", None)
        names = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
        return {n: getattr(gen, n) for n in names if getattr(gen, n, None) is not None}

    # -- attribute paths (override per family) ------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.text_config, "eos_token_id", None)
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
        if pad is None:
            eos = self.eos_token_ids
            pad = eos[0] if eos else 0
        return pad

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """Layers whose token mixer is linear attention (a per-row recurrent state, no K/V): none here."""
        return ()

    @property
    def n_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def kv_heads(self, layer_idx: int) -> int:
        """K/V heads of layer `layer_idx` (the same at every layer but in Gemma 4)."""
        return self.n_kv_heads

    def kv_head_dim(self, layer_idx: int) -> int:
        return self.head_dim

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits of the last layer's output (final norm, LM head; Gemma also soft-caps them)."""
        return self.lm_head(self.final_norm(hidden))

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # -- inputs ---------------------------------------------------------------------------------
    def prepare(self, batch, vision_scores: bool = True) -> PreparedInputs:
        """Embed a processed batch. `vision_scores=False` skips the encoder-internals pass that only
        VisionZip reads (`PreparedInputs.vision_scores` and `.vision` are then None)."""
        raise NotImplementedError

    @property
    def image_placeholder(self) -> str | None:
        """The text the processor expands into an image's tokens."""
        return getattr(self.processor, "image_token", None)

    def _processor(self):
        if self.processor is None:
            raise InputError("this model was loaded without a processor; pass processed inputs instead")
        return self.processor

    def process(self, images: list[list], prompts: list[str]):
        """Run the family's HF processor on prompts and each prompt's images (left padding for batched decoding)."""
        processor = self._processor()
        nested = images if any(images) else None
        try:
            return processor(images=nested, text=prompts, return_tensors="pt", padding=True, padding_side="left")
        except (ValueError, TypeError) as e:
            raise InputError(f"the processor rejected the inputs: {str(e).strip().splitlines()[0]}") from None

    def render_chat(self, conversations: list[list[dict]]):
        """Conversations -> processed inputs, through the processor's own chat template."""
        processor = self._processor()
        if getattr(processor, "chat_template", None) is None:
            raise InputError("this model's processor has no chat template: use generate(images, prompts) with "
                             "prompts in the model's own format")
        conversations, metadata = decode_video_files(conversations)
        kwargs = {"padding": True, "padding_side": "left"}
        if metadata:
            kwargs["video_metadata"] = metadata
        try:
            return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt", processor_kwargs=kwargs)
        except (ValueError, TypeError, OSError) as e:
            raise InputError(f"the chat template or processor rejected the conversations: "
                             f"{str(e).strip().splitlines()[0]}") from None

    def decode_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids `[B, 1]` (or `[3, B, 1]`) for one new token per row at `positions` `[B]`."""
        return positions[:, None]

    def sliding_window(self, layer_idx: int) -> int | None:
        """The window of layer `layer_idx` if it is a sliding-window layer (a key at original index k is seen by a
        query at index q when q - window < k <= q, as transformers' `sliding_window_overlay`), else None. From the
        text config: `layer_types[i] == "sliding_attention"` (Qwen2/Qwen3 with `use_sliding_window`, Gemma), or
        every layer when `sliding_window` is set without `layer_types` (Mistral)."""
        return self._layer_windows[layer_idx]

    @cached_property
    def _layer_windows(self) -> tuple:
        return layer_windows(self.text_config, self.n_layers)

    @cached_property
    def window(self) -> int | None:
        """The sliding window of the model's sliding layers (one size per model), None if it has none."""
        sizes = {w for w in map(self.sliding_window, range(self.n_layers)) if w is not None}
        if len(sizes) > 1:
            raise InputError(f"this model's sliding-window layers use several window sizes {sorted(sizes)}; dstp "
                             f"supports one per model")
        return sizes.pop() if sizes else None

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self.language_model.rotary_emb(x, position_ids)

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, token_index: torch.Tensor, prepared_extras: dict):
        """Hook after a decoder layer; `token_index` [B, Tq] gives each query's original prompt index (-1 for
        padding), or is None when every query is a generated token."""
        return hidden

    # -- probe projections ----------------------------------------------------------------------
    def _attn(self, layer_idx: int):
        return self.layers[layer_idx].self_attn

    def layer_rotary(self, layer_idx: int, cos, sin):
        """The part of `rotary`'s tables layer `layer_idx` uses (all of them but in Gemma 4)."""
        return cos, sin

    def _project(self, proj: nn.Module, norm: nn.Module | None, layer_idx, hidden, cos, sin):
        layer = self.layers[layer_idx]
        x = layer.input_layernorm(hidden)
        B, T, _ = x.shape
        y = proj(x).view(B, T, -1, self.kv_head_dim(layer_idx))
        if norm is not None:
            y = norm(y)
        y = y.transpose(1, 2)
        return hf_compat.rotate(y, *self.layer_rotary(layer_idx, cos, sin))

    def query(self, layer_idx: int, hidden: torch.Tensor, cos, sin) -> torch.Tensor:
        """Rotated queries `[B, H, T, hd]` of layer `layer_idx` from that layer's input hidden states."""
        attn = self._attn(layer_idx)
        return self._project(attn.q_proj, getattr(attn, "q_norm", None), layer_idx, hidden, cos, sin)

    def key(self, layer_idx: int, hidden: torch.Tensor, cos, sin) -> torch.Tensor:
        """Rotated keys `[B, Hkv, T, hd]` of layer `layer_idx` from that layer's input hidden states."""
        attn = self._attn(layer_idx)
        return self._project(attn.k_proj, getattr(attn, "k_norm", None), layer_idx, hidden, cos, sin)

    def attention_scale(self, layer_idx: int) -> float:
        return self._attn(layer_idx).scaling

    def run_layer(self, layer_idx: int, hidden, attention, cos, sin, cache):
        """Decoder layer `layer_idx` on `hidden`, attending as `attention` (engine/attention.py) over `cache`."""
        return hf_compat.call_decoder_layer(self.layers[layer_idx], hidden, attention, (cos, sin), cache)

    # -- FLOP accounting ------------------------------------------------------------------------
    def linear_params_per_layer(self) -> int:
        """Weights touched once per token per layer (attention projections + MLP)."""
        layer = self.layers[0]
        n = 0
        for name, p in layer.named_parameters():
            if p.dim() == 2:
                n += p.numel()
        return n


def decode_video_files(conversations: list[list[dict]]):
    """(conversations with every video file replaced by its frames, the files' VideoMetadata in video order, or
    [] when no video is a file). The metadata carries each file's fps, which the processor samples frames and
    spaces time positions with; frames given directly carry none, so one batch cannot mix both."""
    items = [item for conv in conversations for message in conv if not isinstance(message["content"], str)
             for item in message["content"] if item.get("type") == "video"]
    key = lambda item: next(k for k in ("video", "url", "path") if item.get(k) is not None)  # noqa: E731
    files = [item for item in items if isinstance(item[key(item)], (str, os.PathLike))]
    if not files:
        return conversations, []
    if len(files) != len(items):
        raise InputError("a batch mixes video files and videos given as frames: the processor takes the files' fps "
                         "for every video or for none; give all videos as files, or all as frames")
    metadata = []
    for item in files:
        frames, meta = decode_video(os.fspath(item.pop(key(item))))
        item["video"] = frames
        metadata.append(meta)
    return conversations, metadata


def check_image_tokens(input_ids: torch.Tensor, image_token_id: int, expected: int, what: str = "image"):
    found = int((input_ids == image_token_id).sum())
    if found != expected:
        raise InputError(
            f"{what}-token count mismatch: the prompts hold {found} {what} placeholder tokens but the "
            f"{what}s give {expected} visual features; let the processor expand the {what} token"
        )


def scores_by_row(visual_mask: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Per-visual-token scores laid out [B, Nmax] by rank among each row's visual tokens (0 on padding),
    from `flat` in the order the features fill the visual positions."""
    n = visual_mask.sum(-1)
    valid = torch.arange(int(n.max()), device=n.device)[None, :] < n[:, None]
    return torch.zeros(valid.shape, dtype=torch.float32, device=n.device).masked_scatter(valid, flat.float())


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions that skip left padding, as transformers' generate() builds them."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(~attention_mask, 0)


def layer_windows(text_config, n_layers: int | None = None) -> tuple:
    """Each LLM layer's sliding window (None: full attention), from a text config: `layer_types[i] ==
    "sliding_attention"` (Qwen2/Qwen3 with `use_sliding_window`, Gemma), or every layer when `sliding_window` is set
    without `layer_types` (Mistral)."""
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None)
    return tuple(window if window and (types is None or types[i] == "sliding_attention") else None
                 for i in range(text_config.num_hidden_layers if n_layers is None else n_layers))
