"""Engine-start checks: vLLM's per-architecture config hooks (`MODELS_CONFIG_MAP`, consulted while it builds
its `ModelConfig`, before any weight loads) carry the plugin's check for every architecture vLLM knows.

- LLaVA-1.5, Qwen2.5-VL, Qwen3-VL: the `dstp` override is parsed (a bad method or retention stops the engine
  with one line); for LLaVA, whose RoPE is 1-D, the text config gains `mrope_section` [rotary_dim / 2, 0, 0] so
  that vLLM keeps per-request position lists (M-RoPE with three identical rows computes exactly 1-D RoPE): the
  only way vLLM lets a model give a request positions other than 0..L-1, which kept tokens need.
- every other architecture: a `dstp` override is refused in one line (it would otherwise be ignored silently).

Imports vLLM; `register()` calls `install()`.
"""
from __future__ import annotations

from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

from dstp.integrations.vllm.settings import KEY, fail, from_hf_config

SUPPORTED = {"LlavaForConditionalGeneration": "LLaVA-1.5", "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL",
             "Qwen3VLForConditionalGeneration": "Qwen3-VL"}


def check_supported(model_config) -> None:
    settings = from_hf_config(model_config.hf_config)  # raises on a bad override
    if settings is None:
        return
    hf = model_config.hf_config
    if model_config.architecture != "LlavaForConditionalGeneration":
        return
    if getattr(hf.vision_config, "model_type", "") not in ("clip_vision_model", "siglip_vision_model"):
        raise fail(f"LlavaForConditionalGeneration with a {hf.vision_config.model_type!r} vision tower is not "
                   f"LLaVA-1.5 (CLIP or SigLIP); not supported")
    if settings.method == "visionzip" and (hf.vision_config.model_type != "clip_vision_model"
                                           or hf.vision_feature_select_strategy != "default"
                                           or not isinstance(hf.vision_feature_layer, int)):
        raise fail(f"visionzip needs LLaVA-1.5's layout (a CLIP tower, one vision feature layer, CLS token dropped: "
                   f"vision_feature_select_strategy 'default'), got a {hf.vision_config.model_type!r} tower, layer "
                   f"{hf.vision_feature_layer!r}, strategy {hf.vision_feature_select_strategy!r}")
    text = hf.get_text_config()
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or "mrope_section" in rope:
        raise fail(f"LLaVA with rope_parameters {rope} is not supported (plain RoPE only)")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    rope["mrope_section"] = [rotary_dim // 2, 0, 0]
    text.rope_parameters = rope


def refuse(model_config) -> None:
    if getattr(model_config.hf_config, KEY, None) is not None:
        raise fail(f"architecture {model_config.architecture} is not supported; supported: "
                   + ", ".join(f"{name} ({arch})" for arch, name in SUPPORTED.items()))


def _hook(check, base: type) -> type:
    """`base` (vLLM's own hook for the architecture, or the no-op one) with `check` run first."""

    class Hook(base):
        dstp_check = True

        @classmethod
        def verify_and_update_model_config(cls, model_config) -> None:
            check(model_config)
            super().verify_and_update_model_config(model_config)

    Hook.__name__ = f"Dstp{base.__name__}"
    return Hook


def install() -> None:
    """Give every architecture vLLM knows the plugin's check (once per process)."""
    for arch in ModelRegistry.get_supported_archs():
        existing = MODELS_CONFIG_MAP.get(arch, VerifyAndUpdateConfig)
        if getattr(existing, "dstp_check", False):
            continue
        MODELS_CONFIG_MAP[arch] = _hook(check_supported if arch in SUPPORTED else refuse, existing)
