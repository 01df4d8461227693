"""The user-facing entry point: `dstp.load(...)` returns a `Pipeline` with `.chat(conversations)` and
`.generate(images, prompts)`."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from dstp.chat import check_conversations, check_image_lists
from dstp.config import EngineConfig, GenerationConfig, PruneConfig, generation_config
from dstp.engine.engine import Engine, GenerationOutput
from dstp.engine.trace import Trace
from dstp.errors import ConfigError, InputError, UnsupportedModelError
from dstp.models.base import Adapter
from dstp.models.registry import adapter_for_config, adapter_for_model, load_plugin
from dstp.pruners import get_pruner
from dstp.policy import PolicyConfig, make_policy


@dataclass
class GenerateResult:
    texts: list[str]
    tokens: torch.Tensor  # [B, n] generated ids, padded after a row stops
    trace: Trace


class Pipeline:
    """A model + its processor + an optional pruner and DSTP policy, driven by the dstp engine."""

    def __init__(self, adapter: Adapter, prune: PruneConfig | None = None, shift: PolicyConfig | None = None,
                 engine: EngineConfig | None = None):
        self.adapter, self.engine = adapter, Engine(adapter, engine)
        self.prune, self.shift = prune, shift
        self.pruner = get_pruner(prune, adapter.n_layers) if prune is not None else None
        self.policy = make_policy(shift, self.pruner, adapter.n_layers) if shift is not None else None
        adapter.check_methods(adapter.model.config, self.pruner, shift)

    @property
    def processor(self):
        return self.adapter.processor

    @property
    def needs_vision_scores(self) -> bool:
        return self.pruner is not None and "vision_scores" in self.pruner.needs

    def generation_config(self, max_new_tokens: int, generation: dict) -> GenerationConfig:
        """The checkpoint's generation defaults (its generation_config.json), overridden by `generation`."""
        return generation_config(max_new_tokens, self.adapter.generation_defaults(), generation)

    # -- inputs ---------------------------------------------------------------------------------
    def prepare(self, images, prompts, vision_scores: bool | None = None):
        """Process and embed prompts written in the model's own format; `images[i]` is one image, a list of
        images or None. The encoder's attention scores are computed only when `vision_scores` is True (None:
        when this pipeline's pruner reads them)."""
        per_prompt, prompts = check_image_lists(images, prompts, self.adapter.image_placeholder)
        return self.embed(self.adapter.process(per_prompt, prompts), vision_scores)

    def prepare_chat(self, conversations, vision_scores: bool | None = None):
        """Render conversations with the processor's chat template (generation prompt added) and embed them."""
        a = self.adapter
        conversations = check_conversations(conversations, a.image_placeholder, None if a.takes_video else a.family)
        return self.embed(self.adapter.render_chat(conversations), vision_scores)

    def embed(self, batch, vision_scores: bool | None = None):
        check_prompt_length(batch, self.adapter)
        if self.pruner is not None and self.pruner.video_only and video_tokens(batch, self.adapter) == 0:
            raise ConfigError(f"{self.pruner.name} prunes video tokens only (frame against frame) and these inputs "
                              f"hold no video; use another method for images")
        wanted = self.needs_vision_scores if vision_scores is None else vision_scores
        return self.adapter.prepare(batch, vision_scores=wanted)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def chat(self, conversations, max_new_tokens: int = 32, **generation) -> GenerateResult:
        """Answer a batch of conversations in transformers' chat format, e.g.
        `[[{"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": "..."}]}]]`.
        Any number of images per conversation (zero included); rows may mix them. `generation`: do_sample,
        temperature, top_p, top_k, repetition_penalty, seed, stop_token_ids; what is not given comes from the
        checkpoint's generation_config.json (an explicit `do_sample=False` is plain greedy)."""
        config = self.generation_config(max_new_tokens, generation)
        return self.generate_prepared(self.prepare_chat(conversations), config)

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens: int = 32, relevant: torch.Tensor | None = None,
                 **generation) -> GenerateResult:
        """Answer prompts written in the model's own format (image placeholders included); `images[i]` is the
        image of prompt i, a list of its images, or None. Generation settings as in `chat`."""
        config = self.generation_config(max_new_tokens, generation)
        return self.generate_prepared(self.prepare(images, prompts), config, relevant)

    @torch.no_grad()
    def generate_prepared(self, prepared, config: GenerationConfig, relevant=None) -> GenerateResult:
        out: GenerationOutput = self.engine.generate(prepared, config, pruner=self.pruner, shift=self.policy,
                                                     relevant=relevant)
        texts = self.decode(out.tokens, out.trace.new_tokens)
        return GenerateResult(texts=texts, tokens=out.tokens, trace=out.trace)

    def decode(self, tokens: torch.Tensor, lengths: list[int]) -> list[str]:
        tok = getattr(self.processor, "tokenizer", self.processor)
        if tok is None:
            return ["" for _ in lengths]
        return [tok.decode(tokens[b, :n].tolist(), skip_special_tokens=True) for b, n in enumerate(lengths)]


def video_tokens(batch, adapter: Adapter) -> int:
    """How many video placeholder tokens a processed batch holds (0 for a family without video)."""
    video_id = getattr(adapter.model.config, "video_token_id", None)
    ids = batch.get("input_ids") if hasattr(batch, "get") else None
    return 0 if video_id is None or ids is None or not adapter.takes_video else int((ids == video_id).sum())


def check_prompt_length(batch, adapter: Adapter):
    """A processed prompt longer than the model's context (a long video's frames) is refused before the vision
    tower runs."""
    context = getattr(adapter.text_config, "max_position_embeddings", None)
    ids = batch.get("input_ids") if hasattr(batch, "get") else None
    if context is None or ids is None or ids.shape[-1] <= context:
        return
    raise InputError(f"the prompt holds {ids.shape[-1]} tokens ({video_tokens(batch, adapter)} video tokens in the "
                     f"batch), more than the model's context of {context} positions (max_position_embeddings): "
                     f"pass fewer or smaller frames")


DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
          "float": torch.float32}
# from_pretrained arguments that also decide where the config and processor files come from
HUB_KWARGS = ("revision", "cache_dir", "token", "trust_remote_code", "local_files_only", "force_download",
              "proxies", "subfolder")


def resolve_dtype(dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ConfigError(f"unknown dtype {dtype!r}; use a torch dtype or one of {', '.join(DTYPES)}")


def resolve_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; e.g. 'cpu', 'cuda', 'cuda:1'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but this torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_config(source: str, hub: dict):
    """The checkpoint's config: a local directory as such, anything else resolved by transformers (hub id,
    local cache, `HF_HUB_OFFLINE`). A model type that an adapter outside the library serves (the lab's ShiftBench
    model) has that adapter's module imported first (`load_plugin`), which registers the model with transformers."""
    import transformers  # kept off `import dstp`, which imports no transformers until a model is loaded

    local = os.path.isdir(source)
    try:
        load_plugin(transformers.PretrainedConfig.get_config_dict(source, **hub)[0].get("model_type"))
        return transformers.AutoConfig.from_pretrained(source, **hub)
    except (OSError, ValueError) as e:
        if local:
            raise InputError(f"cannot load a model config from directory {source!r}: {first_line(e)}") from None
        raise InputError(f"checkpoint not found: {source!r} is not a local directory, and transformers cannot "
                         f"resolve it as a model id ({first_line(e)})") from None


def load(model_id_or_path: str | os.PathLike, prune: PruneConfig | None = None, shift: PolicyConfig | None = None,
         dtype: torch.dtype | str = "auto", device: str | torch.device | None = None,
         processor_kwargs: dict | None = None, compile: bool = False, engine: EngineConfig | None = None,
         **from_pretrained_kwargs) -> Pipeline:
    """Load a supported multimodal model with its own processor for dstp generation.

    model_id_or_path: a local directory, or a hub id resolved as transformers resolves it (the hub, the local
        cache, offline with `HF_HUB_OFFLINE=1`), e.g. "Qwen/Qwen2.5-VL-3B-Instruct".
    prune: the prefill pruner (`PruneConfig(method, retention, ...)`); None: no pruning.
    shift: the decode-time policy: DSTP on top of the pruner (`DSTPConfig(tau, window, source, ...)`), or VisionPulse
        on the unpruned prefill (`VisionPulseConfig(...)`, no pruner); None: the pruner alone.
    dtype: a torch dtype, "bfloat16"/"bf16", "float16"/"fp16", "float32"/"fp32", or "auto" (the checkpoint's).
    device: where the model runs ("cpu", "cuda", "cuda:1"; default cpu); leave it unset with `device_map`.
    processor_kwargs: passed to the processor's `from_pretrained`, e.g. `{"max_pixels": 1280 * 28 * 28}`.
    compile: run the decoding step under `torch.compile(fullgraph=True)` (CUDA graphs on CUDA); greedy tokens are
        the eager engine's. Shorthand for `engine=EngineConfig(compile=True)`.
    engine: how the engine runs the step (`EngineConfig`: compile mode, fallback, stop-check interval).
    from_pretrained_kwargs: passed to transformers' `from_pretrained`, e.g. `device_map`, `revision`,
        `trust_remote_code`, `cache_dir`, `token`, `attn_implementation` (default "sdpa"; it stays the vision
        tower's, while the language model's attention becomes dstp's own: `models/hf_compat.py`).
    Returns a `Pipeline` with `.chat(conversations)` and `.generate(images, prompts)`.
    """
    import transformers  # kept off `import dstp`, which imports no transformers until a model is loaded

    source = os.fspath(model_id_or_path)
    if not isinstance(source, str) or not source.strip():
        raise InputError(f"model_id_or_path must be a hub id or a directory, got {model_id_or_path!r}")
    torch_dtype = resolve_dtype(dtype)
    if device is not None and "device_map" in from_pretrained_kwargs:
        raise ConfigError("pass either device or device_map, not both")
    target = None if "device_map" in from_pretrained_kwargs else resolve_device("cpu" if device is None else device)
    device_map = from_pretrained_kwargs.get("device_map")
    if isinstance(device_map, dict):
        check_one_device(device_map.values())
    hub = {k: from_pretrained_kwargs[k] for k in HUB_KWARGS if k in from_pretrained_kwargs}
    config = load_config(source, hub)
    adapter_cls = adapter_for_config(config)
    check_config_fields(source, hub, adapter_cls)
    check_methods(adapter_cls, config, prune, shift)
    arch = next(a for a in (config.architectures or adapter_cls.architectures) if a in adapter_cls.architectures)
    model_cls = adapter_cls.model_class(arch)
    if model_cls is None:
        raise UnsupportedModelError(f"transformers {transformers.__version__} has no class {arch}")
    kwargs = {"attn_implementation": "sdpa", **from_pretrained_kwargs}
    try:
        model = model_cls.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"cannot load the weights of {source!r}: {first_line(e)}") from None
    if target is not None:
        model = model.to(target)
    check_one_device((getattr(model, "hf_device_map", None) or {}).values())
    processor = adapter_cls.load_processor(source, **hub, **(processor_kwargs or {}))
    return Pipeline(adapter_cls(model.eval(), processor), prune=prune, shift=shift,
                    engine=engine_config(engine, compile))


def engine_config(engine: EngineConfig | None, compile: bool) -> EngineConfig:
    """`engine`, with `compile=True` switched on when asked."""
    if not isinstance(compile, bool):
        raise ConfigError(f"compile must be True or False, got {compile!r}")
    engine = engine or EngineConfig()
    return dataclasses.replace(engine, compile=True) if compile else engine


def check_methods(adapter_cls, config, prune: PruneConfig | None, shift: DSTPConfig | None):
    """The family can run the pruner and DSTP asked for (a hybrid LLM cannot run them all): checked from the config,
    before the weights load."""
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    if n_layers is None:
        return  # a config without a layer count: the Pipeline checks once the model is loaded
    pruner = get_pruner(prune, n_layers) if prune is not None else None
    adapter_cls.check_methods(config, pruner, shift)


def check_config_fields(source: str, hub: dict, adapter_cls):
    """The checkpoint's own config.json must hold what the adapter reads (transformers would default it)."""
    import transformers  # kept off `import dstp`, which imports no transformers until a model is loaded

    raw, _ = transformers.PretrainedConfig.get_config_dict(source, **hub)
    missing = adapter_cls.missing_config_field(raw)
    if missing is not None:
        raise InputError(f"{source}: config.json has no {missing}, which dstp's {adapter_cls.family} adapter needs")
    adapter_cls.check_config(raw)


def check_one_device(placements):
    """A device_map's placements (before loading, or as transformers resolved them) must name one device."""
    devices = sorted({str(d) for d in placements})
    if len(devices) > 1:
        raise ConfigError(f"device_map places the model on several devices ({', '.join(devices)}); the dstp engine "
                          f"runs a model on one device: pass device= or a device_map onto one device")


def from_model(model, processor=None, prune: PruneConfig | None = None, shift: PolicyConfig | None = None,
               compile: bool = False, engine: EngineConfig | None = None) -> Pipeline:
    """Wrap an already loaded transformers model (a supported class or a subclass of one) and its processor.

    The model's language model gets dstp's attention function as its `attn_implementation` (models/hf_compat.py):
    the engine's calls use dstp's masks and kernel, and the model's own forward / generate() then run transformers'
    SDPA, whatever implementation the language model had before (its vision tower keeps its own)."""
    return Pipeline(adapter_for_model(model, processor), prune=prune, shift=shift, engine=engine_config(engine, compile))
