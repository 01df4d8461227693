"""dstp's vLLM plugin: dstp's pre-LLM pruners (divprune, visionzip, cdpruner, random, uniform) inside vLLM, for
LLaVA-1.5, Qwen2.5-VL and Qwen3-VL. Install with `pip install "dstp[vllm]"`; vLLM loads `register()` through the
`vllm.general_plugins` entry point in every process it starts. Configure per model through vLLM's `hf_overrides`:

    from vllm import LLM
    llm = LLM("llava-hf/llava-1.5-7b-hf", hf_overrides={"dstp": {"method": "divprune", "retention": 0.25}})

    vllm serve Qwen/Qwen2.5-VL-3B-Instruct --hf-overrides '{"dstp": {"method": "divprune", "retention": 0.25}}'

Without the `dstp` key the model runs as vLLM's own. What happens with it, and what vLLM would need for FastV
and DSTP: docs/vllm.md. Importing this package imports nothing of vLLM; `register()` does.
"""
from __future__ import annotations

MODELS = {
    "LlavaForConditionalGeneration": "dstp.integrations.vllm.models:DstpLlavaForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "dstp.integrations.vllm.models:DstpQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "dstp.integrations.vllm.models:DstpQwen3VLForConditionalGeneration",
}


def register() -> None:
    """The `vllm.general_plugins` entry point: dstp's classes for the supported architectures (imported lazily,
    by vLLM, when it builds such a model) and the engine-start checks for every architecture. vLLM calls it once
    per process; calling it again changes nothing."""
    # vLLM is optional: `import dstp.integrations.vllm` imports none of it (engine_checks does), register() does
    from vllm import ModelRegistry

    from dstp.integrations.vllm import engine_checks

    for arch, cls in MODELS.items():
        ModelRegistry.register_model(arch, cls)
    engine_checks.install()
