"""Every transformers-version-sensitive call in one place, tested on the declared range (SUPPORTED below).

- Attention: dstp registers its own attention function through transformers' public `AttentionInterface` and sets
  it as the language model's `attn_implementation`. Inside the engine each decoder layer gets the engine's
  `Attention` (mask, causal rule, kernel: `engine/attention.py`) as a keyword argument, which transformers' layers
  pass on to the attention function. Called without it (the model's own `forward` / `generate()`), the function is
  transformers' SDPA, with SDPA's masks, so the wrapped model behaves as it did.
- Decoder layers take the cache as `cache` (5.25), `past_key_values` (5.x before) or `past_key_value` (4.x), and
  return the hidden states (5.x) or a tuple (4.x).
- Vision towers return a `BaseModelOutputWithPooling` whose `pooler_output` (and Qwen3-VL's per-layer DeepStack
  features) is one tensor or a tuple of per-image tensors, depending on the release.
"""
from __future__ import annotations

import inspect
import warnings

import torch

from dstp.errors import UnsupportedEnvironmentError

ATTENTION = "dstp"  # the attn_implementation name dstp registers
ENGINE_KWARG = "dstp_attention"  # the decoder-layer keyword that carries the engine's Attention

# Tested range (pyproject.toml declares the same; CI runs both ends): (first, last) minor release.
SUPPORTED = {"transformers": ("5.17", "5.25"), "torch": ("2.11", "2.14")}


def _minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_versions(installed: dict[str, str] | None = None) -> list[str]:
    """Compare the installed transformers and torch with the tested range. A release known to break (transformers
    4.x: another layer and cache API) raises UnsupportedEnvironmentError; one outside the tested range warns once.
    Returns the warnings' texts."""
    if installed is None:
        import transformers

        installed = {"transformers": transformers.__version__, "torch": torch.__version__}
    texts = []
    for name, version in installed.items():
        first, last = SUPPORTED[name]
        if name == "transformers" and _minor(version)[0] < 5:
            raise UnsupportedEnvironmentError(
                f"dstp needs transformers {first} to {last}.x; transformers {version} is installed (4.x has another "
                f"decoder-layer and cache API): pip install 'transformers>={first},<{_next(last)}'")
        if not _minor(first) <= _minor(version) <= _minor(last):
            text = (f"dstp is tested with {name} {first} to {last}.x; {name} {version} is installed: results may "
                    f"differ or break (pip install '{name}>={first},<{_next(last)}')")
            warnings.warn(text, stacklevel=3)
            texts.append(text)
    return texts


def _next(minor: str) -> str:
    major, m = _minor(minor)
    return f"{major}.{m + 1}"


# -- attention ---------------------------------------------------------------------------------------------------
def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs):
    engine_attention = kwargs.pop(ENGINE_KWARG, None)
    if engine_attention is None:  # the model's own forward: transformers' SDPA, as with attn_implementation="sdpa"
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = engine_attention(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None


_registered = False
_sdpa = None  # transformers' sdpa_attention_forward, bound at registration (importing dstp imports no transformers)


def register_attention():
    """Register dstp's attention function, and SDPA's mask builder under the same name (for the model's own
    forward), with transformers, once the installed versions are checked. Idempotent."""
    global _registered, _sdpa
    if _registered:
        return
    check_versions()
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    _sdpa = sdpa_attention_forward

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    _registered = True


def use_engine_attention(language_model: torch.nn.Module):
    """Make dstp's attention function the language model's (`set_attn_implementation`, transformers' public
    switch); the vision tower keeps its own."""
    register_attention()
    config = language_model.config
    if getattr(config, "_attn_implementation", None) == ATTENTION:
        return
    if hasattr(language_model, "set_attn_implementation"):
        language_model.set_attn_implementation(ATTENTION)
    if getattr(config, "_attn_implementation", None) != ATTENTION:  # a module that is not a PreTrainedModel
        config._attn_implementation = ATTENTION


# -- decoder layers ------------------------------------------------------------------------------------------------
_CACHE_KWARG: dict[type, str] = {}


def _cache_kwarg(layer) -> str:
    kind = type(layer)
    if kind not in _CACHE_KWARG:
        params = inspect.signature(kind.forward).parameters
        _CACHE_KWARG[kind] = next((n for n in ("cache", "past_key_values", "past_key_value") if n in params),
                                  "past_key_values")
    return _CACHE_KWARG[kind]


def call_decoder_layer(layer, hidden, attention, position_embeddings, cache, **family_kwargs):
    """Run one transformers decoder layer with the engine's cache view and `Attention` (and the keywords a family's
    layer needs besides, e.g. Gemma 4's `shared_kv_states`)."""
    out = layer(hidden, attention_mask=None, position_embeddings=position_embeddings, use_cache=True,
                **{_cache_kwarg(layer): cache, ENGINE_KWARG: attention}, **family_kwargs)
    return out[0] if isinstance(out, tuple) else out


# -- linear-attention layers (hybrid LLMs: Qwen3.5's Gated DeltaNet) --------------------------------------------
class _LinearLayerView:
    """What transformers 5.17's Gated DeltaNet reads of `cache.layers[layer_idx]`."""
    record_past = False

    def __init__(self, step):
        self._step = step

    @property
    def conv_states(self):
        return [self._step.states.conv.get(self._step.layer_idx)]

    @property
    def recurrent_states(self):
        return [self._step.states.recurrent.get(self._step.layer_idx)]


class LinearAttentionCache:
    """The cache object a transformers linear-attention layer is called with inside the engine; the state it reads
    and writes is the engine's (`engine/recurrent_state.py`, one `LinearStep`). Transformers' cache API for these
    layers changed within the tested range, so this answers both: 5.17's (`has_previous_state`,
    `layers[i].conv_states`) and 5.25's (`get_conv_state`, `get_recurrent_state`, `increase_count`, ...). A prefill
    starts from zero state, as transformers' first forward does; a decoding step updates the state in place
    (transformers' `causal_conv1d_update` writes the convolution window itself)."""

    def __init__(self, step):
        self.step = step
        self.layers = {step.layer_idx: _LinearLayerView(step)}

    def has_previous_state(self, layer_idx=None, state_idx=None) -> bool:
        return not self.step.prefill

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return None if self.step.prefill else self.step.states.conv[layer_idx]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return None if self.step.prefill else self.step.states.recurrent[layer_idx]

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def increase_count(self, layer_idx: int, state_idx: int = 0):
        pass

    def get_recurrent_states_to_keep(self, layer_idx=None) -> int:
        return 0

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        """Prefill: keep the last `conv_kernel_size` inputs as the window, return the inputs (left-padded with zeros
        to the kernel when shorter), as transformers' cache does."""
        states = self.step.states
        if not self.step.prefill:  # transformers continues from a state only through causal_conv1d_update
            raise RuntimeError("a linear-attention layer continued its state with several tokens at once")
        k = conv_kernel_size or conv_states.shape[-1]
        full = conv_states
        if full.shape[-1] < k:
            full = torch.nn.functional.pad(full, (k - full.shape[-1], 0), value=0)
        states.conv[layer_idx] = full[..., -k:].contiguous().clone()
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs):
        states = self.step.states
        if self.step.prefill:
            states.recurrent[layer_idx] = recurrent_states.contiguous().clone()
        else:
            states.recurrent[layer_idx].copy_(recurrent_states)
        return states.recurrent[layer_idx]


def call_linear_decoder_layer(layer, hidden, position_embeddings, step):
    """Run one transformers decoder layer whose token mixer is linear attention, on the engine's state `step`
    (a `LinearStep`); a prefill's padding goes in as the 2-D mask transformers gives these layers."""
    out = layer(hidden, attention_mask=step.mask if step.prefill else None, position_embeddings=position_embeddings,
                use_cache=True, **{_cache_kwarg(layer): LinearAttentionCache(step)})
    return out[0] if isinstance(out, tuple) else out


# -- vision towers -------------------------------------------------------------------------------------------------
def pooled_features(out) -> torch.Tensor:
    """[n_tokens, D] from an image-feature call's output: its `pooler_output` (or the output itself), one tensor
    [n_tokens, D] or [views, tokens, D], or per-image tensors to join."""
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (tuple, list)):
        return torch.cat([f.flatten(0, -2) for f in feats], dim=0)
    return feats.flatten(0, -2)


def video_features_with_newline(out, newline: torch.Tensor, tokens_per_video: int) -> torch.Tensor:
    """[n_videos * (tokens_per_video + 1), D]: LLaVA-OneVision's video features, each video followed by the
    model's newline embedding: transformers 5.25's `get_video_features` appends it, 5.17's forward does."""
    feats = getattr(out, "pooler_output", out)
    if feats.shape[1] == tokens_per_video:
        feats = torch.cat([feats, newline.to(feats)[None, None].expand(feats.shape[0], 1, -1)], dim=1)
    return feats.flatten(0, 1)


def deepstack_features(out) -> list[torch.Tensor]:
    """Qwen3-VL's DeepStack features, one [n_tokens, D] tensor per LLM layer that receives them: each layer's entry
    is one tensor (5.17) or per-image tensors to join (5.25)."""
    return [pooled_features(layer) for layer in (out.deepstack_features or [])]


def vision_window_index(visual, grid) -> torch.Tensor:
    """Qwen2.5-VL's ViT merged-token order (window order), as its forward computes it: a function of
    `transformers.vision_utils` in newer releases, a method of the vision model in older 5.x ones."""
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:
        return visual.get_window_index(grid)[0]
    return get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                   window_size=visual.window_size, patch_size=visual.patch_size)[0]


def gemma4_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor):
    """Gemma 4's ViT rotary (one rotary block per image axis), as its attention applies it to [n, S, H, hd]."""
    from transformers.models.gemma4.modeling_gemma4 import apply_multidimensional_rope

    return apply_multidimensional_rope(x, cos, sin, position_ids)


# -- rotary --------------------------------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Standard (non-interleaved) RoPE, as every supported family applies it after its cos/sin layout; cos/sin
    narrower than x rotate its first dims only and pass the rest (partial rotary: Qwen3.5)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    d = cos.shape[-1]
    if d < x.shape[-1]:
        return torch.cat((rotate(x[..., :d], cos[:, 0], sin[:, 0]), x[..., d:]), dim=-1)
    return x * cos + rotate_half(x) * sin


# -- transformers' compiled static cache (the speed baseline) -----------------------------------------------------
def static_cache_compile_config(device: torch.device, mode: str | None = None, backend: str = "inductor"):
    """The `compile_config` that makes `generate(..., cache_implementation="static")` compile its decoding forward
    on `device`: transformers does so by itself on CUDA (and a few accelerators); on other devices only when its
    CompileConfig's `_compile_all_devices` is set, a private switch (transformers 5.17-5.25)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, backend=backend,
                           mode=mode or ("reduce-overhead" if device.type == "cuda" else "default"))
    config._compile_all_devices = True
    return config
