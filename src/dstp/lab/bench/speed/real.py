"""The `real` scenario of `dstp speed`: a random-weight model built from a published config.json at full depth and
width, and the processed inputs its family's processor would make for one image (no processor or tokenizer needed:
the real special token ids come from the config)."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from types import SimpleNamespace

import torch
import transformers
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from dstp.api import first_line
from dstp.errors import ConfigError, InputError, UnsupportedModelError
from dstp.lab.bench.speed.config import SpeedConfig
from dstp.models.registry import ADAPTERS, adapter_for_config

# -- the `real` scenario: a random-weight model built from a published config.json --------------------------------
# batch 1 (a 4-8B model at batch 1 is weight-bound: a decoding step reads its weights, 8 GB at bf16 for Qwen3-VL-4B);
# 128 new tokens and one timed run per row keep `scripts/gpu_check.sh` under 10 minutes on one H100 (the estimate
# and its basis: that script's header)
REAL = dict(batch=1, new_tokens=128, shift_every=32, window=20, prompt_text=24, repeats=1)
REAL_IMAGE = "1280x960"
REAL_FAMILIES = ("qwen3_vl", "qwen2_5_vl", "llava")  # the families whose processed inputs `build_real_batch` makes
TEXT_BEFORE_IMAGE = 4  # of prompt_text: a chat turn's opening before the image, the question after it
# Qwen processors resize an image to multiples of patch * merge within [min_pixels, max_pixels]: the published
# preprocessor_config.json values (size.shortest_edge / longest_edge), read from beside config.json when it is there
QWEN_PIXELS = {"qwen3_vl": (65536, 16777216), "qwen2_5_vl": (3136, 12845056)}
# fields the inputs and the run need, per family; "text." is text_config (Qwen2.5-VL publishes these at the top
# level); "a|b": either. LLaVA's published text_config leaves its widths to LlamaConfig's defaults (7B's), as does
# transformers when it loads the checkpoint.
_QWEN_FIELDS = ("image_token_id", "vision_start_token_id", "vision_end_token_id", "text.hidden_size",
                "text.num_hidden_layers", "text.num_attention_heads", "text.num_key_value_heads",
                "text.intermediate_size", "text.vocab_size", "vision_config.patch_size",
                "vision_config.spatial_merge_size", "vision_config.temporal_patch_size")
REAL_FIELDS = {
    "qwen3_vl": tuple(f.replace("text.", "text_config.") for f in _QWEN_FIELDS),
    "qwen2_5_vl": _QWEN_FIELDS,
    "llava": ("image_token_id|image_token_index", "text.vocab_size|vocab_size", "vision_config.image_size",
              "vision_config.patch_size"),
}
REAL_DEFAULTS = SpeedConfig("real", grid=None, hidden=0, layers=0, heads=1, kv_heads=1, intermediate=0, vocab=0,
                            **REAL)  # the shapes come from the config (`real_speed_config`)


def _config_file(path: str) -> str:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if os.path.isdir(path) and not os.path.isfile(file):
        raise InputError(f"--model-config {path!r}: a folder without a config.json")
    if not os.path.isfile(file):
        raise InputError(f"--model-config {path!r}: no such file (give a published config.json or its folder)")
    return file


def _read_json(file: str) -> dict:
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"--model-config {file!r} is not a JSON file: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise InputError(f"--model-config {file!r} holds a JSON {type(data).__name__}, not a config object")
    return data


def _text_dict(data: dict) -> dict:
    text = data.get("text_config")
    return text if isinstance(text, dict) else data


def _field(data: dict, path: str):
    """The value at a dotted path ("text." = the text config), or KeyError."""
    node = data
    for i, key in enumerate(path.split(".")):
        node = _text_dict(node) if i == 0 and key == "text" else node[key] if isinstance(node, dict) else None
        if node is None:
            raise KeyError(path)
    return node


def real_family(file: str, data: dict) -> tuple[str, str]:
    """(architecture, dstp family) of a published config, or UnsupportedModelError / InputError."""
    archs, model_type = data.get("architectures"), data.get("model_type")
    archs = [archs] if isinstance(archs, str) else list(archs) if isinstance(archs, list) else []
    if not archs and not model_type:
        raise InputError(f"--model-config {file!r}: the field 'architectures' is missing (and 'model_type' too)")
    supported = [a for f in REAL_FAMILIES for a in _adapter_of_family(f).architectures]
    try:
        adapter = adapter_for_config(SimpleNamespace(architectures=archs or [], model_type=model_type))
    except UnsupportedModelError:
        raise UnsupportedModelError(f"--model-config {file!r}: unsupported architecture "
                                    f"{(archs or [model_type])[0]!r}; dstp speed builds {', '.join(supported)}") \
            from None
    if adapter.family not in REAL_FAMILIES:
        raise UnsupportedModelError(f"--model-config {file!r}: dstp speed cannot build the inputs of "
                                    f"{adapter.architectures[0]} yet; it builds {', '.join(supported)}")
    arch = next((a for a in archs or [] if a in adapter.architectures), adapter.architectures[0])
    for need in REAL_FIELDS[adapter.family]:
        found = False
        for alt in need.split("|"):
            try:
                _field(data, alt)
                found = True
            except KeyError:
                pass
        if not found:
            name = need.split("|")[0].replace("text.", "text_config.")
            raise InputError(f"--model-config {file!r}: the field {name!r} is missing (a {arch} config has it)")
    return arch, adapter.family


def _adapter_of_family(family: str):
    return next(a for a in ADAPTERS.values() if a.family == family)


def _family_of(arch: str) -> str:
    return ADAPTERS[arch].family


def real_hf_config(file: str, layers: int | None = None):
    """The transformers config of a published config.json, the LLM cut to `layers` layers if given (nothing else
    changes: widths, heads, vocabulary, rope, vision tower, special token ids as published)."""
    data = copy.deepcopy(_read_json(file))
    arch, family = real_family(file, data)
    if layers is not None:
        text = _text_dict(data)
        text["num_hidden_layers"] = layers
        text.pop("layer_types", None)  # derived from the depth when absent
        if "max_window_layers" in text:
            text["max_window_layers"] = min(text["max_window_layers"], layers)
    model_type = data.get("model_type") or _adapter_of_family(family).model_type
    try:
        config = transformers.CONFIG_MAPPING[model_type].from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"--model-config {file!r}: transformers {transformers.__version__} cannot read it as a "
                         f"{model_type} config: {first_line(e)}") from None
    config.architectures = [arch]
    return config, arch, family


def _image_size(image: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in image.lower().split("x"))
    except ValueError:
        w = h = 0
    if w < 1 or h < 1:
        raise ConfigError(f"--image must be WIDTHxHEIGHT in pixels, e.g. 1280x960, got {image!r}")
    return w, h


def _smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL `smart_resize` (multiples of `factor`, the aspect kept, the area within bounds), its
    refusal (an aspect ratio over 200) as one line."""
    try:
        return smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        raise ConfigError(f"--image: {first_line(e)}") from None


def real_image_layout(file: str, config, family: str, image: str) -> dict:
    """What the family's processor makes of one `image` ("WxH"): the visual token count and, for Qwen, the
    patch grid (image_grid_thw) and pixel_values' row width."""
    w, h = _image_size(image)
    vc = config.vision_config
    if family == "llava":  # resized and centre-cropped to the tower's square input; CLS dropped by "default"
        n = (vc.image_size // vc.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
        return {"n_visual": n, "pixels": (3, vc.image_size, vc.image_size)}
    lo, hi = QWEN_PIXELS[family]
    pre = os.path.join(os.path.dirname(file), "preprocessor_config.json")
    if os.path.isfile(pre):
        p = _read_json(pre)
        size = p.get("size") if isinstance(p.get("size"), dict) else {}
        lo = p.get("min_pixels") or size.get("shortest_edge") or lo
        hi = p.get("max_pixels") or size.get("longest_edge") or hi
    patch, merge = vc.patch_size, vc.spatial_merge_size
    hb, wb = _smart_resize(h, w, patch * merge, lo, hi)
    gh, gw = hb // patch, wb // patch
    channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", None) or 3
    return {"n_visual": gh * gw // merge ** 2, "grid_thw": (1, gh, gw),
            "pixels": (gh * gw, channels * vc.temporal_patch_size * patch * patch)}


def real_speed_config(path: str, image: str = REAL_IMAGE, layers: int | None = None) -> SpeedConfig:
    """The `real` scenario of a published config.json: its model at full depth (or `layers` LLM layers) and width,
    one image of `image` pixels, batch 1. Bad input (no file, not JSON, an architecture dstp speed cannot build, a
    field missing) raises InputError / UnsupportedModelError with one line."""
    file = _config_file(path)
    floor = REAL_DEFAULTS.prune_layer + 1
    if layers is not None and layers < floor:
        raise ConfigError(f"--layers must be >= {floor} (FastV prunes at layer {REAL_DEFAULTS.prune_layer}), "
                          f"got {layers}")
    config, arch, family = real_hf_config(file, layers)
    layout = real_image_layout(file, config, family, image)
    t = config.get_text_config()
    n_visual = layout["n_visual"]
    # Qwen: <vision_start> image <vision_end> inside the text; LLaVA: BOS, then the text around the image
    n_prompt = REAL_DEFAULTS.prompt_text + n_visual + (1 if family == "llava" else 2)
    heads = t.num_attention_heads
    return replace(REAL_DEFAULTS, hidden=t.hidden_size, layers=t.num_hidden_layers, heads=heads,
                   kv_heads=getattr(t, "num_key_value_heads", None) or heads, intermediate=t.intermediate_size,
                   vocab=t.vocab_size, model_config=file, architecture=arch, image=image,
                   head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads, n_visual=n_visual,
                   n_prompt=n_prompt)


def _text_ids(config, vocab: int) -> tuple[int, int]:
    """[lo, hi): ordinary token ids, below the special tokens that sit at the vocabulary's end (Qwen's, LLaVA's
    <image>) and above those at its start (LLaVA's <unk> <s> </s>)."""
    names = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
             "vision_end_token_id", "vision_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
    special = set()
    for c in (config, config.get_text_config()):
        for n in names:
            v = getattr(c, n, None)
            special.update(v if isinstance(v, (list, tuple)) else [] if v is None else [v])
    hi = min([i for i in special if i >= vocab // 2] + [vocab])
    lo = max([i for i in special if i < vocab // 2] + [-1]) + 1
    return lo, hi


def build_real_model(cfg: SpeedConfig, device, dtype):
    """A random-weight model of the published config (`from_config`: transformers' own initialisation), built on
    `device` in `dtype` directly (a 4B model is 18 GB in float32 on the host otherwise)."""
    config, arch, family = real_hf_config(cfg.model_config, cfg.layers)
    cls = _adapter_of_family(family).model_class(arch)
    if cls is None:
        raise UnsupportedModelError(f"transformers {transformers.__version__} has no class {arch}")
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # always generate new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def build_real_batch(cfg: SpeedConfig, config, device, dtype):
    """Processed inputs as the family's processor makes them for one image of `cfg.image` pixels: the real special
    token ids around the image's placeholder tokens, random text ids, random pixels of the right shape."""
    family = _family_of(cfg.architecture)
    layout = real_image_layout(cfg.model_config, config, family, cfg.image)
    g = torch.Generator().manual_seed(cfg.seed)
    lo, hi = _text_ids(config, cfg.vocab)
    text = torch.randint(lo, hi, (cfg.batch, cfg.prompt_text), generator=g)
    image_id = config.image_token_id
    full = lambda n, v: torch.full((cfg.batch, n), v, dtype=torch.long)  # noqa: E731
    before, after = text[:, :TEXT_BEFORE_IMAGE], text[:, TEXT_BEFORE_IMAGE:]
    if family == "llava":
        bos = config.get_text_config().bos_token_id
        ids = torch.cat([full(1, 1 if bos is None else bos), before, full(cfg.visual_tokens, image_id), after], 1)
        pixels = torch.randn(cfg.batch, *layout["pixels"], generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    else:
        ids = torch.cat([before, full(1, config.vision_start_token_id), full(cfg.visual_tokens, image_id),
                         full(1, config.vision_end_token_id), after], 1)
        rows, width = layout["pixels"]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "pixel_values": torch.randn(cfg.batch * rows, width, generator=g),
                 "image_grid_thw": torch.tensor([layout["grid_thw"]] * cfg.batch),
                 "mm_token_type_ids": (ids == image_id).int()}
    assert ids.shape[1] == cfg.prompt_tokens and int((ids == image_id).sum()) == cfg.batch * cfg.visual_tokens
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


