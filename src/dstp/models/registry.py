"""Which adapter serves which checkpoint, decided from the config's architecture.

The library's families are registered here. An adapter that lives outside the library (the lab's ShiftBench model,
`dstp.lab.shiftbench`) registers itself when its module is imported; `load_plugin` imports that module, named by
the `dstp.adapters` entry point under the checkpoint's model_type, when such a checkpoint is loaded."""
from __future__ import annotations

from importlib.metadata import entry_points

from dstp.errors import UnsupportedModelError
from dstp.models.base import Adapter
from dstp.models.gemma4 import Gemma4Adapter
from dstp.models.internvl import InternVLAdapter
from dstp.models.llava import LlavaAdapter
from dstp.models.llava_next import LlavaNextAdapter
from dstp.models.llava_onevision import LlavaOnevisionAdapter
from dstp.models.qwen2_5_vl import Qwen25VLAdapter
from dstp.models.qwen3_5 import Qwen35Adapter, Qwen35MoeAdapter
from dstp.models.qwen3_vl import Qwen3VLAdapter
from dstp.models.qwen3_vl_moe import Qwen3VLMoeAdapter

ADAPTERS: dict[str, type[Adapter]] = {}


def register(adapter: type[Adapter]) -> type[Adapter]:
    for arch in adapter.architectures:
        ADAPTERS[arch] = adapter
    return adapter


for _a in (LlavaAdapter, LlavaNextAdapter, Qwen25VLAdapter, Qwen3VLAdapter, InternVLAdapter, Qwen35Adapter,
           Qwen35MoeAdapter, Gemma4Adapter):
    register(_a)
for _a in (LlavaOnevisionAdapter, Qwen3VLMoeAdapter):
    register(_a)


PLUGIN_GROUP = "dstp.adapters"  # entry points: model_type -> the module that registers its adapter when imported


def load_plugin(model_type) -> bool:
    """Import the module the `dstp.adapters` entry point names for `model_type` (if there is one and no registered
    adapter serves that type yet): True if one was imported."""
    if not isinstance(model_type, str) or any(a.model_type == model_type for a in ADAPTERS.values()):
        return False
    found = list(entry_points(group=PLUGIN_GROUP, name=model_type))
    for point in found:
        point.load()
    return bool(found)


def supported() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for_config(config) -> type[Adapter]:
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in ADAPTERS:
            return ADAPTERS[arch]
    by_type = {a.model_type: a for a in ADAPTERS.values()}
    if getattr(config, "model_type", None) in by_type:
        return by_type[config.model_type]
    raise UnsupportedModelError(
        f"unsupported model architecture {archs or config.model_type!r}; supported: {', '.join(supported())}"
    )


def adapter_for_model(model, processor=None) -> Adapter:
    """The adapter of the model's class, or of the nearest supported class it derives from."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model, processor)
    raise UnsupportedModelError(f"unsupported model class {type(model).__name__!r}; supported: {', '.join(supported())}")
