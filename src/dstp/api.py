"""The user-facing entry point: `dstp.load(...)` returns a `Pipeline` with `.generate(images, prompts)`."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dstp.config import DSTPConfig, GenerationConfig, PruneConfig
from dstp.engine.engine import Engine, GenerationOutput
from dstp.engine.trace import Trace
from dstp.errors import InputError, UnsupportedModelError
from dstp.models.base import Adapter
from dstp.models.registry import adapter_for_config, adapter_for_model


@dataclass
class GenerateResult:
    texts: list[str]
    tokens: torch.Tensor
    trace: Trace


class Pipeline:
    """A model + its processor + an optional pruner and DSTP policy, driven by the dstp engine."""

    def __init__(self, adapter: Adapter, prune: PruneConfig | None = None, shift: DSTPConfig | None = None):
        from dstp.pruners import get_pruner
        from dstp.shift import ShiftPolicy

        self.adapter, self.engine = adapter, Engine(adapter)
        self.prune, self.shift = prune, shift
        self.pruner = get_pruner(prune, adapter.n_layers) if prune is not None else None
        if shift is not None and self.pruner is None:
            raise InputError("DSTP needs a base pruner: pass prune=PruneConfig(...) as well")
        self.policy = ShiftPolicy(shift, self.pruner.layer) if shift is not None else None

    @property
    def processor(self):
        return self.adapter.processor

    @property
    def needs_vision_scores(self) -> bool:
        return self.pruner is not None and "vision_scores" in self.pruner.needs

    def prepare(self, images, prompts, vision_scores: bool | None = None):
        """Process and embed; the encoder's attention scores are computed only when `vision_scores` is True
        (None: when this pipeline's pruner reads them)."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} images but {len(prompts)} prompts: pass one image per prompt")
        if not prompts:
            raise InputError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise InputError(f"prompt {i} is empty")
        wanted = self.needs_vision_scores if vision_scores is None else vision_scores
        return self.adapter.prepare(self.adapter.process(images, prompts), vision_scores=wanted)

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens: int = 32, relevant: torch.Tensor | None = None,
                 **generation) -> GenerateResult:
        config = GenerationConfig(max_new_tokens=max_new_tokens, **generation)
        return self.generate_prepared(self.prepare(images, prompts), config, relevant)

    @torch.no_grad()
    def generate_prepared(self, prepared, config: GenerationConfig, relevant=None) -> GenerateResult:
        retention = self.prune.retention if self.prune is not None else 1.0
        out: GenerationOutput = self.engine.generate(prepared, config, pruner=self.pruner, retention=retention,
                                                     shift=self.policy, relevant=relevant)
        texts = self.decode(out.tokens, out.trace.new_tokens)
        return GenerateResult(texts=texts, tokens=out.tokens, trace=out.trace)

    def decode(self, tokens: torch.Tensor, lengths: list[int]) -> list[str]:
        tok = getattr(self.processor, "tokenizer", self.processor)
        if tok is None:
            return ["" for _ in lengths]
        return [tok.decode(tokens[b, :n].tolist(), skip_special_tokens=True) for b, n in enumerate(lengths)]


def load(model_id_or_path: str, prune: PruneConfig | None = None, shift: DSTPConfig | None = None,
         dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu") -> Pipeline:
    """Load a supported HF multimodal model (hub id or local directory) for dstp generation."""
    import transformers

    import dstp.shiftbench.modeling  # noqa: F401  registers the ShiftBench model with transformers' Auto classes

    if os.path.sep in str(model_id_or_path) or str(model_id_or_path).startswith("."):
        if not os.path.isdir(model_id_or_path):
            raise InputError(f"checkpoint not found: {model_id_or_path} is not a directory")
    try:
        config = transformers.AutoConfig.from_pretrained(model_id_or_path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a model config from {model_id_or_path!r}: {e}") from None
    adapter_cls = adapter_for_config(config)
    arch = next(a for a in (config.architectures or adapter_cls.architectures) if a in adapter_cls.architectures)
    model_cls = adapter_cls.model_class(arch)
    if model_cls is None:
        raise UnsupportedModelError(f"transformers {transformers.__version__} has no class {arch}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    model = model_cls.from_pretrained(model_id_or_path, dtype=torch_dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    processor = adapter_cls.load_processor(model_id_or_path)
    return Pipeline(adapter_cls(model, processor), prune=prune, shift=shift)


def from_model(model, processor=None, prune: PruneConfig | None = None, shift: DSTPConfig | None = None) -> Pipeline:
    """Wrap an already loaded transformers model."""
    return Pipeline(adapter_for_model(model, processor), prune=prune, shift=shift)
