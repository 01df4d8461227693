"""Every vLLM name dstp's vLLM plugin (src/dstp/integrations/vllm/) relies on, and a check, by reading vLLM's
Python sources with `ast` (never importing vLLM, so it runs on any machine and on any release's wheel, GPU build
or not), that each exists with a signature the plugin can use.

    python tests_vllm/vllm_api.py vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl   # or a folder holding vllm/
    python tests_vllm/vllm_api.py --markdown      # the list as docs/vllm.md shows it

`API` is the list, read off the plugin's code: every `from vllm... import`, every attribute of a vLLM object it
reads or calls (with the arguments it passes), every vLLM method it overrides (with the signature its override
has), and the calls inside vLLM that it relies on (vLLM calling the hooks it overrides with arguments its
overrides accept; vLLM's vision towers calling the modules it records with the arguments it reads back).
Attributes of Hugging Face configs and of torch modules are not vLLM's and are not listed. docs/vllm.md shows
the same list (`--markdown`; tests_vllm/test_vllm_api.py keeps the two equal).

`check(source_root)` returns one line per problem: a name that is gone, a parameter the plugin passes that is
gone or renamed, an overridden method whose parameters differ from the override's, a call inside vLLM that no
longer passes what the plugin's hook or recorder takes.
"""
from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
import re
import sys
import zipfile

# ---------------------------------------------------------------------------------------------------------------
# the list
# ---------------------------------------------------------------------------------------------------------------
# A path is "module:Name.member...": a module, a name bound in it (what `from module import Name` gets), then
# attributes of it (a class's own or inherited methods, class attributes, dataclass fields, or `self.X = ...`
# assignments in its methods; for a module-level instance, its class's).


@dataclasses.dataclass(frozen=True)
class Exists:
    """The name exists (an import, a class attribute or instance attribute the plugin reads)."""
    path: str
    use: str


@dataclasses.dataclass(frozen=True)
class Call:
    """The plugin calls it this way (`call`: the call as the plugin writes it; the callee's name is not used);
    a class: its constructor (`__init__`, or the fields of a dataclass)."""
    path: str
    call: str
    use: str


@dataclasses.dataclass(frozen=True)
class Override:
    """The plugin overrides this method (or replaces this function) with `signature` (without self / cls): vLLM
    calls the override as it calls its own, and the override hands its arguments on to vLLM's."""
    path: str
    signature: str
    use: str


@dataclasses.dataclass(frozen=True)
class Fields:
    """A dataclass with these init fields (the plugin builds copies with `dataclasses.replace`)."""
    path: str
    fields: tuple[str, ...]
    use: str


@dataclasses.dataclass(frozen=True)
class CallsIn:
    """Inside vLLM's function `path`, `callee` (as written there, e.g. `blk`, `self.merger`) is called with
    `args` positional arguments (None: any number) and at least the keywords `keywords`."""
    path: str
    callee: str
    args: int | None
    keywords: tuple[str, ...]
    use: str


@dataclasses.dataclass(frozen=True)
class Key:
    """vLLM's function `path` puts `key` into the dict it builds (the plugin reads that key)."""
    path: str
    key: str
    use: str


@dataclasses.dataclass(frozen=True)
class HookCalls:
    """Every call `<...>.method(...)` in vLLM's modules/packages `scopes` passes arguments the plugin's override
    `signature` takes, and there is at least one (vLLM still calls the hook)."""
    method: str
    scopes: tuple[str, ...]
    signature: str
    use: str


LLAVA = "vllm.model_executor.models.llava"
QWEN25 = "vllm.model_executor.models.qwen2_5_vl"
QWEN3 = "vllm.model_executor.models.qwen3_vl"
CLIP = "vllm.model_executor.models.clip"
PROC = "vllm.multimodal.processing.processor"
MODELS = {LLAVA: "LlavaForConditionalGeneration", QWEN25: "Qwen2_5_VLForConditionalGeneration",
          QWEN3: "Qwen3VLForConditionalGeneration"}
PROCESSORS = {LLAVA: "LlavaMultiModalProcessor", QWEN25: "Qwen2_5_VLMultiModalProcessor",
              QWEN3: "Qwen3VLMultiModalProcessor"}
INFOS = {LLAVA: "LlavaProcessingInfo", QWEN25: "Qwen2_5_VLProcessingInfo", QWEN3: "Qwen3VLProcessingInfo"}
BUILDERS = {LLAVA: "LlavaDummyInputsBuilder", QWEN25: "Qwen2_5_VLDummyInputsBuilder",
            QWEN3: "Qwen3VLDummyInputsBuilder"}
LANGUAGE_MODELS = {"vllm.model_executor.models.llama": "LlamaForCausalLM",  # LLaVA-1.5's LLM
                   "vllm.model_executor.models.qwen2": "Qwen2ForCausalLM",  # Qwen2.5-VL's
                   QWEN3: "Qwen3LLMForCausalLM"}  # Qwen3-VL's

PROCESSOR_HOOKS = {  # the processor mixin's overrides (models.py, _KeptPlaceholders)
    "apply": ("(inputs, *args, **kwargs)", "reads `inputs.prompt` (cdpruner: the request's instruction)"),
    "_get_mm_hashes": ("(inputs)", "adds the instruction to each image's hash (cdpruner)"),
    "_apply_hf_processor_main": ("(mm_items, hf_kwargs)", "adds the `dstp_instruction` field (cdpruner)"),
    "_get_mm_fields_config": ("(hf_inputs, hf_processor_mm_kwargs)", "declares the `dstp_instruction` field"),
    "_get_prompt_updates": ("(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)",
                            "k of N placeholder tokens per image"),
}
MODEL_HOOKS = {  # the model mixin's overrides (models.py, _PrunedImages)
    "__init__": ("(*, vllm_config, prefix='', **kwargs)", "reads the `dstp` settings"),
    "embed_multimodal": ("(**kwargs)", "takes the `dstp_instruction` field off the image kwargs"),
    "_process_image_input": ("(image_input)", "vision tower + projector, then the pruner keeps k of N"),
    "embed_input_ids": ("(input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs)",
                        "strips the 6 position channels off the kept embeddings"),
    "forward": ("(input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs)",
                "adds the kept tokens' position offsets"),
    "get_mrope_input_positions": ("(input_tokens, mm_features)", "positions of the unpruned layout"),
}


def _api() -> tuple:
    api: list = [
        # __init__.py
        Call("vllm:ModelRegistry.register_model", "register_model(arch, 'module:class')",
             "registers dstp's model classes (register())"),
        # engine_checks.py
        Call("vllm.model_executor.models:ModelRegistry.get_supported_archs", "get_supported_archs()",
             "every architecture gets the engine-start check"),
        Exists("vllm.model_executor.models.config:MODELS_CONFIG_MAP",
               "vLLM's per-architecture config hooks; the plugin wraps each"),
        Exists("vllm.model_executor.models.config:VerifyAndUpdateConfig", "the no-op hook the plugin subclasses"),
        Override("vllm.model_executor.models.config:VerifyAndUpdateConfig.verify_and_update_model_config",
                 "(model_config)", "the engine-start check runs in it, before vLLM's own hook"),
        Override("vllm.model_executor.models.config:*.verify_and_update_model_config", "(model_config)",
                 "every architecture's own hook, which the plugin's hook calls after its check"),
        HookCalls("verify_and_update_model_config", ("vllm.config",), "(model_config)",
                  "vLLM runs the hook while it builds its ModelConfig"),
        Exists("vllm.config.model:ModelConfig.hf_config", "the `dstp` override and the model's HF config"),
        Exists("vllm.config.model:ModelConfig.hf_text_config", "the LLM's layer count (the pruner's)"),
        Exists("vllm.config.model:ModelConfig.architecture", "which family the check is for"),
        Exists("vllm.config.vllm:VllmConfig.model_config", "the model's config, in the model's __init__"),
        Exists("vllm.config.vllm:VllmConfig.parallel_config", "visionzip is refused under tensor parallelism"),
        Exists("vllm.config.parallel:ParallelConfig.tensor_parallel_size", "visionzip is refused when > 1"),
        # models.py: registration
        Call("vllm.multimodal:MULTIMODAL_REGISTRY.register_processor",
             "register_processor(factory, info=info, dummy_inputs=builder)", "dstp's processors for its models"),
        Exists(f"{LLAVA}:_build_llava_or_pixtral_hf_info", "LLaVA's processing-info factory, registered as is"),
        Override(f"{LLAVA}:_build_llava_or_pixtral_hf_processor", "(info, dummy_inputs, **kwargs)",
                 "replaced by the plugin's factory, which calls it for Pixtral-HF"),
        Call(f"{LLAVA}:_build_llava_or_pixtral_hf_processor", "f(info, dummy_inputs, **kwargs)",
             "Pixtral-HF configs keep vLLM's processor"),
        CallsIn(f"{LLAVA}:_build_llava_or_pixtral_hf_info", "LlavaProcessingInfo", 1, (),
                "LLaVA-1.5's info is a LlavaProcessingInfo (the plugin tests `type(info) is`)"),
        Call(f"{PROC}:BaseMultiModalProcessor", "DstpLlavaProcessor(info, dummy_inputs, **kwargs)",
             "the plugin's LLaVA processor, built by its factory"),
        Exists("vllm.model_executor.models.interfaces:SupportsMRoPE",
               "LLaVA runs as M-RoPE with a `dstp` key (a base of dstp's LLaVA class)"),
        Exists("vllm.model_executor.models.interfaces:SupportsMRoPE.supports_mrope",
               "the flag vLLM reads off the class"),
        Override("vllm.model_executor.models.interfaces:SupportsMRoPE.get_mrope_input_positions",
                 MODEL_HOOKS["get_mrope_input_positions"][0], "LLaVA's positions (it has no method of its own)"),
        Exists(f"{LLAVA}:LlavaForConditionalGeneration.hf_to_vllm_mapper",
               "LLaVA's weight-name mapper, extended for transformers 5's CLIP names"),
        Call("vllm.model_executor.models.utils:WeightsMapper", "WeightsMapper(orig_to_new_regex={...})",
             "maps transformers 5's CLIP weight names"),
        Exists("vllm.model_executor.models.utils:WeightsMapper.__or__", "`mapper | LLaVA's mapper`"),
        # models.py: processor side
        Call("vllm.multimodal.processing:PromptReplacement", "PromptReplacement(modality=m, target=t, replacement=r)",
             "the image replacement with k placeholders"),
        Exists(f"{PROC}:PromptUpdate.modality", "which updates are images'"),
        Exists(f"{PROC}:PromptUpdate.target", "copied into the new replacement"),
        Exists(f"{PROC}:PromptUpdate.content", "vLLM's N placeholder tokens (a list or a function of the item)"),
        Exists(f"{PROC}:BaseMultiModalProcessor.info", "the processor's info (`self.info`)"),
        Exists("vllm.multimodal.processing.inputs:ProcessorInputs.prompt", "the prompt's token ids (`apply`)"),
        Call("vllm.multimodal.parse:MultiModalDataItems.get_count", "get_count('image', strict=False)",
             "the number of images"),
        Call("vllm.multimodal.inputs:MultiModalFieldConfig.batched", "batched('image', keep_on_cpu=True)",
             "the `dstp_instruction` field, one row per image, on the CPU"),
        HookCalls("_get_mm_hashes", ("vllm.multimodal",), PROCESSOR_HOOKS["_get_mm_hashes"][0],
                  "vLLM hashes the images through the overridable method"),
        HookCalls("_apply_hf_processor_main", ("vllm.multimodal",), PROCESSOR_HOOKS["_apply_hf_processor_main"][0],
                  "vLLM runs the HF processor through the overridable method"),
        HookCalls("_get_mm_fields_config", ("vllm.multimodal", "vllm.renderers"),
                  PROCESSOR_HOOKS["_get_mm_fields_config"][0], "vLLM reads the fields through the method"),
        HookCalls("_get_prompt_updates", ("vllm.multimodal",), PROCESSOR_HOOKS["_get_prompt_updates"][0],
                  "vLLM builds the placeholders through the method"),
        # models.py: model side
        Call("vllm.multimodal.inputs:PlaceholderRange", "PlaceholderRange(offset=o, length=n)",
             "an image's placeholders in the unpruned layout"),
        Fields("vllm.multimodal.inputs:PlaceholderRange", ("offset", "length"), "`dataclasses.replace(offset=...)`"),
        Fields("vllm.multimodal.inputs:MultiModalFeatureSpec", ("data", "modality", "mm_position"),
               "`dataclasses.replace(mm_position=...)` in get_mrope_input_positions"),
        Exists("vllm.multimodal.inputs:MultiModalFieldElem.data", "`feature.data['image_grid_thw'].data`"),
        HookCalls("get_mrope_input_positions", ("vllm.v1.worker",), MODEL_HOOKS["get_mrope_input_positions"][0],
                  "the model runners ask the model for a request's positions"),
        HookCalls("embed_multimodal", ("vllm.v1.worker",), MODEL_HOOKS["embed_multimodal"][0],
                  "the model runners run the encoder through it"),
        HookCalls("embed_input_ids", ("vllm.v1.worker",), MODEL_HOOKS["embed_input_ids"][0],
                  "the model runners merge the embeddings through it"),
        # LLaVA's vision tower (visionzip)
        Exists(f"{LLAVA}:LlavaImagePixelInputs.type", "`image_input['type']`"),
        Exists(f"{LLAVA}:LlavaImagePixelInputs.pixel_values", "`image_input['pixel_values']`"),
        Exists(f"{LLAVA}:LlavaForConditionalGeneration.config", "the HF config (`self.config`)"),
        Exists(f"{LLAVA}:LlavaForConditionalGeneration.vision_tower", "the CLIP tower"),
        Exists(f"{LLAVA}:LlavaForConditionalGeneration.multi_modal_projector", "projects merged tokens"),
        CallsIn(f"{LLAVA}:init_vision_tower_for_llava", "CLIPVisionModel", None, (),
                "LLaVA's tower is vLLM's CLIPVisionModel"),
        Call(f"{CLIP}:CLIPVisionModel.forward", "forward(pixel_values, feature_select_strategy='full')",
             "the tower's output with its CLS row"),
        Exists(f"{CLIP}:CLIPVisionModel.vision_model", "`vision_tower.vision_model.encoder.layers[-1]`"),
        Exists(f"{CLIP}:CLIPVisionTransformer.encoder", "`vision_tower.vision_model.encoder.layers[-1]`"),
        Exists(f"{CLIP}:CLIPEncoder.layers", "the feature layer (vLLM builds the tower up to it)"),
        Exists(f"{CLIP}:CLIPEncoderLayer.layer_norm1", "hooked: the layer's normed input"),
        Exists(f"{CLIP}:CLIPEncoderLayer.self_attn", "the layer's attention"),
        Exists(f"{CLIP}:CLIPAttention.qkv_proj", "q and k of the normed input (CLS attention, keys)"),
        Exists(f"{CLIP}:CLIPAttention.num_heads_per_partition", "head count"),
        Exists(f"{CLIP}:CLIPAttention.head_dim", "head size"),
        Exists(f"{CLIP}:CLIPAttention.scale", "attention scale"),
        CallsIn(f"{CLIP}:CLIPEncoderLayer.__init__", "CLIPAttention", None, (), "the layer's attention class"),
        # Qwen2.5-VL / Qwen3-VL vision towers (visionzip)
        Exists(f"{QWEN25}:Qwen2_5_VLImagePixelInputs.type", "`image_input['type']`"),
        Exists(f"{QWEN25}:Qwen2_5_VLImagePixelInputs.image_grid_thw", "`image_input['image_grid_thw']`"),
        Exists(f"{QWEN25}:Qwen2_5_VLForConditionalGeneration.config", "the HF config (`self.config`)"),
        Exists(f"{QWEN25}:Qwen2_5_VLForConditionalGeneration.visual", "the vision tower"),
        Exists(f"{QWEN25}:Qwen2_5_VLForConditionalGeneration.use_data_parallel",
               "visionzip is refused with a data-parallel encoder"),
        CallsIn(f"{QWEN25}:Qwen2_5_VLForConditionalGeneration.__init__", "Qwen2_5_VisionTransformer", None, (),
                "the tower's class"),
        Call(f"{QWEN25}:Qwen2_5_VisionTransformer.prepare_encoder_metadata", "prepare_encoder_metadata(grid_thw)",
             "the window order of the merged tokens"),
        Key(f"{QWEN25}:Qwen2_5_VisionTransformer.prepare_encoder_metadata", "reverse_indices",
            "window order -> raster order"),
        Exists(f"{QWEN3}:Qwen3VLForConditionalGeneration.config", "the HF config (`self.config`)"),
        Exists(f"{QWEN3}:Qwen3VLForConditionalGeneration.visual", "the vision tower"),
        Exists(f"{QWEN3}:Qwen3VLForConditionalGeneration.use_data_parallel",
               "visionzip is refused with a data-parallel encoder"),
        Exists(f"{QWEN3}:Qwen3VLForConditionalGeneration.visual_dim", "width of the LLM-input part"),
        Exists(f"{QWEN3}:Qwen3VLForConditionalGeneration.multiscale_dim", "width of the DeepStack part"),
        Exists(f"{QWEN3}:Qwen3VLForConditionalGeneration.use_deepstack", "whether there is a DeepStack part"),
        CallsIn(f"{QWEN3}:Qwen3VLForConditionalGeneration.__init__", "Qwen3_VisionTransformer", None, (),
                "the tower's class"),
        CallsIn(f"{QWEN3}:Qwen3VLForConditionalGeneration._parse_and_validate_image_input",
                "Qwen2_5_VLImagePixelInputs", None, (), "Qwen3-VL's image inputs are Qwen2.5-VL's"),
    ]
    for module, tower, block in ((QWEN25, "Qwen2_5_VisionTransformer", "Qwen2_5_VisionBlock"),
                                 (QWEN3, "Qwen3_VisionTransformer", "Qwen3_VisionBlock")):
        api += [
            Exists(f"{module}:{tower}.spatial_merge_size", "visual tokens per image"),
            Exists(f"{module}:{tower}.spatial_merge_unit", "patches per merged token"),
            Exists(f"{module}:{tower}.blocks", "the last block's call is recorded"),
            Exists(f"{module}:{tower}.merger", "its call is recorded; projects merged tokens"),
            CallsIn(f"{module}:{tower}.__init__", block, None, (), "the blocks' class"),
            CallsIn(f"{module}:{tower}.forward", "blk", 1,
                    ("cu_seqlens", "rotary_pos_emb_cos", "rotary_pos_emb_sin"),
                    "the recorded block call: x positional, its metadata by keyword"),
            CallsIn(f"{module}:{tower}.forward", "self.merger", 1, (), "the recorded merger call: its input"),
            Exists(f"{module}:{block}.attn", "the block's attention"),
            Exists(f"{module}:{block}.norm1", "the attention's input norm"),
            CallsIn(f"{module}:{block}.__init__", "Qwen2_5_VisionAttention", None, (), "the attention's class"),
        ]
    api += [
        Exists(f"{QWEN25}:Qwen2_5_VisionAttention.qkv", "q and k of the last block"),
        Exists(f"{QWEN25}:Qwen2_5_VisionAttention.num_attention_heads_per_partition", "head count"),
        Exists(f"{QWEN25}:Qwen2_5_VisionAttention.hidden_size_per_attention_head", "head size"),
        Exists(f"{QWEN25}:Qwen2_5_VisionAttention.apply_rotary_emb", "the block's rotary, on q and k"),
        CallsIn(f"{QWEN25}:Qwen2_5_VisionAttention.__init__", "ApplyRotaryEmb", None, (), "the rotary's class"),
        Call("vllm.model_executor.layers.rotary_embedding.common:ApplyRotaryEmb.forward_native",
             "apply_rotary_emb(qk, cos, sin)", "rotary on the stacked q and k"),
    ]
    # the three families: classes the plugin subclasses or registers, the methods it overrides
    for module, model in MODELS.items():
        api += [Exists(f"{module}:{model}", "subclassed by dstp's model class"),
                Exists(f"{module}:{PROCESSORS[module]}", "subclassed by dstp's processor"),
                Exists(f"{module}:{INFOS[module]}", "registered with dstp's processor"),
                Exists(f"{module}:{BUILDERS[module]}", "registered with dstp's processor")]
        for hook, (signature, use) in PROCESSOR_HOOKS.items():
            api.append(Override(f"{module}:{PROCESSORS[module]}.{hook}", signature, use))
        api.append(Call(f"{module}:{INFOS[module]}.get_hf_config", "get_hf_config()", "the model's HF config"))
        for hook, (signature, use) in MODEL_HOOKS.items():
            if hook == "get_mrope_input_positions" and module == LLAVA:
                continue  # LLaVA has none of its own: SupportsMRoPE's, above
            api.append(Override(f"{module}:{model}.{hook}", signature, use))
        api += [CallsIn(f"{module}:{model}.embed_multimodal", "self._process_image_input", 1, (),
                        "the encoder runs through _process_image_input"),
                Call(f"{module}:{model}.get_language_model", "get_language_model()",
                     "embeds the instruction (cdpruner)")]
    for module, lm in LANGUAGE_MODELS.items():
        api.append(Call(f"{module}:{lm}.embed_input_ids", "embed_input_ids(ids)",
                        "`get_language_model().embed_input_ids(ids)`: the instruction's embeddings"))
    return tuple(api)


API = _api()


# ---------------------------------------------------------------------------------------------------------------
# reading vLLM's sources
# ---------------------------------------------------------------------------------------------------------------

class Sources:
    """vLLM's .py files, from a folder (the `vllm` package itself, or one that holds it: site-packages, an
    unpacked wheel) or from a wheel (read from the zip, nothing unpacked). `read` records what was read."""

    def __init__(self, root: str | os.PathLike):
        root = pathlib.Path(root)
        self.zip = None
        if root.is_file():
            self.zip = zipfile.ZipFile(root)
            self.names = {n for n in self.zip.namelist() if n.endswith(".py")}
        elif (root / "vllm" / "__init__.py").is_file():
            self.base = root
        elif root.name == "vllm" and (root / "__init__.py").is_file():
            self.base = root.parent
        else:
            raise FileNotFoundError(f"{root}: neither a wheel nor a folder holding vLLM's package")
        self.read_files: set[str] = set()
        self._texts: dict[str, str | None] = {}
        self._trees: dict[str, ast.Module | None] = {}

    def read(self, rel: str) -> str | None:
        if self.zip is not None:
            if rel not in self.names:
                return None
            text = self.zip.read(rel).decode("utf-8")
        else:
            path = self.base / rel
            if not path.is_file():
                return None
            text = path.read_text(encoding="utf-8")
        self.read_files.add(rel)
        return text

    def module_file(self, module: str) -> str | None:
        rel = module.replace(".", "/")
        for candidate in (rel + ".py", rel + "/__init__.py"):
            if self.zip is not None:
                if candidate in self.names:
                    return candidate
            elif (self.base / candidate).is_file():
                return candidate
        return None

    def text(self, module: str) -> str | None:
        rel = self.module_file(module)
        if rel is None:
            return None
        if rel not in self._texts:
            self._texts[rel] = self.read(rel)
        return self._texts[rel]

    def tree(self, module: str) -> ast.Module | None:
        rel = self.module_file(module)
        if rel is None:
            return None
        if rel not in self._trees:
            text = self.text(module)
            self._trees[rel] = None if text is None else _parse(text, rel)
        return self._trees[rel]

    def calls(self, module: str) -> dict[str, list[ast.Call]]:
        """The module's calls by the callee's last name (`x.y.f(...)` and `f(...)` under "f")."""
        tree = self.tree(module)
        if tree is None:
            return {}
        if not hasattr(tree, "calls_by_name"):
            index: dict[str, list[ast.Call]] = {}
            for n in ast.walk(tree):
                if isinstance(n, ast.Call):
                    f = n.func
                    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                    if name is not None:
                        index.setdefault(name, []).append(n)
            tree.calls_by_name = index
        return tree.calls_by_name

    def is_package(self, module: str) -> bool:
        return (self.module_file(module) or "").endswith("/__init__.py")

    def modules_under(self, package: str) -> list[str]:
        """The modules of `package` and of all its subpackages."""
        prefix = package.replace(".", "/") + "/"
        if self.zip is not None:
            files = sorted(n for n in self.names if n.startswith(prefix))
        else:
            files = sorted(str(p.relative_to(self.base)).replace(os.sep, "/")
                           for p in (self.base / prefix).rglob("*.py"))
        return [f[:-len("/__init__.py")].replace("/", ".") if f.endswith("/__init__.py")
                else f[:-3].replace("/", ".") for f in files]


_PARSED: dict[tuple[str, str], ast.Module] = {}  # (file, text) -> tree, shared by all Sources (read-only)


def _parse(text: str, rel: str) -> ast.Module:
    if (rel, text) not in _PARSED:
        _PARSED[(rel, text)] = ast.parse(text, rel)
    return _PARSED[(rel, text)]


@dataclasses.dataclass(frozen=True)
class Module:
    name: str


@dataclasses.dataclass(frozen=True, eq=False)
class Class:
    module: str
    node: ast.ClassDef


@dataclasses.dataclass(frozen=True, eq=False)
class Function:
    module: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    owner: Class | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Value:
    """A module-level or class-level assignment (its value, if any), or an instance attribute (`self.X = ...`)."""
    module: str
    node: ast.AST | None


@dataclasses.dataclass(frozen=True)
class External:
    """A name from outside vLLM (torch, typing, ...): not followed."""
    name: str


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def _top_level(body: list[ast.stmt]):
    """A module's (or class's) statements, descending into if / try / with blocks (not `if TYPE_CHECKING`, which
    binds nothing when the code runs)."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from _top_level(stmt.body)
            yield from _top_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _top_level(stmt.body)
            for handler in stmt.handlers:
                yield from _top_level(handler.body)
            yield from _top_level(stmt.orelse)
            yield from _top_level(stmt.finalbody)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            yield from _top_level(stmt.body)
        else:
            yield stmt


def _decorators(node) -> list[str]:
    return [ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list]


def _assigns(stmt: ast.stmt, name: str) -> bool:
    """`name = ...` or `name: T (= ...)`."""
    if isinstance(stmt, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)
    return isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name


def _is_overload(node) -> bool:
    return any(d.split(".")[-1] == "overload" for d in _decorators(node))


class Resolver:
    def __init__(self, sources: Sources):
        self.src = sources
        self._active: set = set()

    # -- modules --------------------------------------------------------------------------------------------
    def absolute(self, module: str, level: int, name: str | None) -> str:
        if level == 0:
            return name or ""
        package = module if self.src.is_package(module) else module.rpartition(".")[0]
        for _ in range(level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{name}" if name else package

    def lookup(self, module: str, name: str):
        """What `from module import name` gets: a Module, Class, Function, Value, External, or None."""
        if not module.startswith("vllm"):
            return External(f"{module}.{name}")
        key = (module, name)
        if key in self._active:
            return None
        self._active.add(key)
        try:
            return self._lookup(module, name)
        finally:
            self._active.discard(key)

    def _lookup(self, module: str, name: str):
        tree = self.src.tree(module)
        if tree is None:
            return None
        found = None
        for stmt in _top_level(tree.body):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                if found is None or not isinstance(found, Function) or not _is_overload(stmt):
                    found = Function(module, stmt)
            elif isinstance(stmt, ast.ClassDef) and stmt.name == name:
                found = Class(module, stmt)
            elif _assigns(stmt, name):
                found = Value(module, stmt.value)
            elif isinstance(stmt, ast.ImportFrom):
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name:
                        source = self.absolute(module, stmt.level, stmt.module)
                        sub = f"{source}.{alias.name}"
                        if source.startswith("vllm") and self.src.module_file(sub) is not None:
                            found = Module(sub)
                        else:
                            found = self.lookup(source, alias.name)
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname == name:
                        found = Module(alias.name) if alias.name.startswith("vllm") else External(alias.name)
                    elif alias.asname is None and alias.name.split(".")[0] == name:
                        found = Module(name) if name == "vllm" else External(name)
        if found is not None:
            return found
        lazy = self._lazy(tree, module, name)
        if lazy is not None:
            return lazy
        if self.src.module_file(f"{module}.{name}") is not None:
            return Module(f"{module}.{name}")
        return None

    def _lazy(self, tree: ast.Module, module: str, name: str):
        """A module-level `__getattr__` that imports names from a dict {"Name": ".module:attr"} (vllm/__init__)."""
        if not any(isinstance(s, ast.FunctionDef) and s.name == "__getattr__" for s in _top_level(tree.body)):
            return None
        for stmt in _top_level(tree.body):
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(stmt.value, ast.Dict):
                for k, v in zip(stmt.value.keys, stmt.value.values):
                    if (isinstance(k, ast.Constant) and k.value == name and isinstance(v, ast.Constant)
                            and isinstance(v.value, str) and ":" in v.value):
                        target, attr = v.value.split(":", 1)
                        level = len(target) - len(target.lstrip("."))
                        return self.lookup(self.absolute(module, level, target.lstrip(".") or None), attr)
        return None

    def expr(self, module: str, node: ast.expr):
        """What a name or dotted name (a base class, a callee) in `module` refers to."""
        if isinstance(node, ast.Subscript):
            return self.expr(module, node.value)
        if isinstance(node, ast.Name):
            return self.lookup(module, node.id)
        if isinstance(node, ast.Attribute):
            owner = self.expr(module, node.value)
            if isinstance(owner, Module):
                return self.lookup(owner.name, node.attr)
            if isinstance(owner, Class):
                return self.member(owner, node.attr)
            return External(ast.unparse(node)) if isinstance(owner, External) else None
        return None

    # -- classes --------------------------------------------------------------------------------------------
    def bases(self, cls: Class) -> list[Class]:
        out = []
        for base in cls.node.bases:
            target = self.expr(cls.module, base)
            if isinstance(target, Class):
                out.append(target)
        return out

    def mro(self, cls: Class) -> list[Class]:
        def key(c: Class):
            return (c.module, c.node.name, c.node.lineno)

        def linearize(c: Class, seen: tuple) -> list[Class]:
            if key(c) in seen:
                return [c]
            bases = self.bases(c)
            seqs = [linearize(b, seen + (key(c),)) for b in bases] + [list(bases)]
            out = [c]
            while any(seqs):
                for seq in seqs:
                    if not seq:
                        continue
                    head = seq[0]
                    if not any(key(head) in [key(x) for x in s[1:]] for s in seqs):
                        break
                else:  # inconsistent: depth-first
                    head = next(s[0] for s in seqs if s)
                out.append(head)
                seqs = [[x for x in s if key(x) != key(head)] for s in seqs]
            return out

        return linearize(cls, ())

    def own_member(self, cls: Class, name: str):
        """`name` as `cls` itself defines it (body, or `self.name = ...` in its methods), or None."""
        found = None
        for stmt in _top_level(cls.node.body):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                if found is None or not isinstance(found, Function) or not _is_overload(stmt):
                    found = Function(cls.module, stmt, cls)
            elif isinstance(stmt, ast.ClassDef) and stmt.name == name:
                found = Class(cls.module, stmt)
            elif _assigns(stmt, name):
                found = Value(cls.module, stmt.value)
        if found is not None:
            return found
        for stmt in cls.node.body:
            if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(stmt):
                targets = (node.targets if isinstance(node, ast.Assign)
                           else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
                for t in targets:
                    if (isinstance(t, ast.Attribute) and t.attr == name and isinstance(t.value, ast.Name)
                            and t.value.id in ("self", "cls")):
                        return Value(cls.module, None)
                if (isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and len(node.args) >= 2
                        and ast.unparse(node.args[0]) == "self" and isinstance(node.args[1], ast.Constant)
                        and node.args[1].value == name):
                    return Value(cls.module, None)
        return None

    def member(self, cls: Class, name: str):
        for c in self.mro(cls):
            found = self.own_member(c, name)
            if found is not None:
                return found
        return None

    def instance_class(self, value: Value) -> Class | None:
        if isinstance(value.node, ast.Call):
            target = self.expr(value.module, value.node.func)
            if isinstance(target, Class):
                return target
        return None

    def path(self, path: str):
        module, _, rest = path.partition(":")
        if self.src.tree(module) is None:
            return None, f"module {module} is gone"
        current, walked = Module(module), module
        for part in rest.split("."):
            if isinstance(current, Value):
                cls = self.instance_class(current)
                if cls is None:
                    return None, f"{walked} is not an instance of a vLLM class"
                current = cls
            if isinstance(current, Module):
                found = self.lookup(current.name, part)
            elif isinstance(current, Class):
                found = self.member(current, part)
            else:
                return None, f"{walked} has no readable attributes"
            walked = f"{walked}{':' if isinstance(current, Module) and ':' not in walked else '.'}{part}"
            if found is None:
                return None, f"{walked} is gone"
            current = found
        return current, None

    # -- signatures -----------------------------------------------------------------------------------------
    def dataclass_fields(self, cls: Class) -> list[tuple[str, bool, bool]] | None:
        """(name, has a default, keyword-only) of a dataclass's (or NamedTuple's) init fields, base first;
        None when no class of the MRO is a dataclass."""
        fields: dict[str, tuple[bool, bool]] = {}
        any_dataclass = False
        for c in reversed(self.mro(cls)):
            decorators = [d for d in c.node.decorator_list
                          if re.search(r"(^|\.)dataclass$", ast.unparse(d.func if isinstance(d, ast.Call) else d))]
            named_tuple = any(ast.unparse(b).split(".")[-1] == "NamedTuple" for b in c.node.bases)
            if not decorators and not named_tuple:
                continue
            any_dataclass = True
            kw_only = any(isinstance(d, ast.Call) and any(k.arg == "kw_only" and isinstance(k.value, ast.Constant)
                                                          and k.value.value for k in d.keywords)
                          for d in decorators)
            for stmt in c.node.body:
                if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                    continue
                annotation = ast.unparse(stmt.annotation)
                if "ClassVar" in annotation:
                    continue
                if annotation.endswith("KW_ONLY"):
                    kw_only = True
                    continue
                default = stmt.value is not None
                if isinstance(stmt.value, ast.Call) and ast.unparse(stmt.value.func).split(".")[-1] == "field":
                    kws = {k.arg: k.value for k in stmt.value.keywords}
                    if isinstance(kws.get("init"), ast.Constant) and kws["init"].value is False:
                        fields.pop(stmt.target.id, None)
                        continue
                    default = "default" in kws or "default_factory" in kws
                    if isinstance(kws.get("kw_only"), ast.Constant):
                        fields[stmt.target.id] = (default, bool(kws["kw_only"].value))
                        continue
                fields[stmt.target.id] = (default, kw_only)
        if not any_dataclass:
            return None
        return [(name, d, k) for name, (d, k) in fields.items()]

    def signature(self, target) -> Signature | None:
        if isinstance(target, Function):
            static = "staticmethod" in _decorators(target.node)
            return Signature.of(target.node.args, drop_first=target.owner is not None and not static)
        if isinstance(target, Class):
            for c in self.mro(target):
                init = self.own_member(c, "__init__")
                if isinstance(init, Function):
                    return self.signature(init)
                fields = self.dataclass_fields(c)
                if fields is not None:
                    return Signature.of_fields(fields)
        return None


@dataclasses.dataclass
class Param:
    name: str
    kind: str  # "positional_only", "positional", "keyword_only"
    default: bool


@dataclasses.dataclass
class Signature:
    params: list[Param]
    varargs: bool
    varkw: bool

    @classmethod
    def of(cls, args: ast.arguments, drop_first: bool = False) -> Signature:
        positional = [(a.arg, "positional_only") for a in args.posonlyargs] + [(a.arg, "positional")
                                                                               for a in args.args]
        n_defaults = len(args.defaults)
        params = [Param(name, kind, i >= len(positional) - n_defaults) for i, (name, kind) in enumerate(positional)]
        params += [Param(a.arg, "keyword_only", d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
        if drop_first and params and params[0].kind != "keyword_only":
            params = params[1:]
        return cls(params, args.vararg is not None, args.kwarg is not None)

    @classmethod
    def parse(cls, text: str) -> Signature:
        node = ast.parse(f"def f{text}: pass").body[0]
        return cls.of(node.args)

    @classmethod
    def of_fields(cls, fields) -> Signature:
        return cls([Param(n, "keyword_only" if k else "positional", d) for n, d, k in fields], False, False)

    @property
    def positional(self) -> list[Param]:
        return [p for p in self.params if p.kind != "keyword_only"]

    def get(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def __str__(self) -> str:
        parts, star = [], False
        for p in self.params:
            if p.kind == "keyword_only" and not star:
                parts.append("*args" if self.varargs else "*")
                star = True
            parts.append(p.name + ("=..." if p.default else ""))
        if self.varargs and not star:
            parts.append("*args")
        if self.varkw:
            parts.append("**kwargs")
        return f"({', '.join(parts)})"


def _call_shape(call: ast.Call) -> tuple[int, list[str], bool, bool]:
    """(positional count, keyword names, has *x, has **x)."""
    starred = any(isinstance(a, ast.Starred) for a in call.args)
    return (sum(not isinstance(a, ast.Starred) for a in call.args), [k.arg for k in call.keywords if k.arg],
            starred, any(k.arg is None for k in call.keywords))


def call_problems(sig: Signature, n_args: int, keywords: list[str], starred: bool, double_starred: bool) -> list[str]:
    """Why a call with these arguments would not bind to `sig` (empty: it binds)."""
    problems = []
    positional = sig.positional
    if n_args > len(positional) and not sig.varargs:
        problems.append(f"takes {len(positional)} positional argument(s), the call passes {n_args}")
    filled = {p.name for p in positional[:n_args]}
    for k in keywords:
        p = sig.get(k)
        if p is None or p.kind == "positional_only":
            if not sig.varkw:
                problems.append(f"has no parameter `{k}`")
        elif k in filled:
            problems.append(f"gets `{k}` twice")
        filled.add(k)
    if not (starred or double_starred):
        missing = [p.name for p in sig.params if not p.default and p.name not in filled]
        if missing:
            problems.append(f"requires {', '.join(f'`{m}`' for m in missing)}, which the call does not pass")
    return problems


def override_problems(vllm: Signature, plugin: Signature) -> list[str]:
    """Why the plugin's override (`plugin`) cannot stand in for vLLM's method (`vllm`): vLLM calls it as it
    calls its own, the override hands its arguments on to vLLM's."""
    problems = []
    plugin_positional = plugin.positional
    for i, v in enumerate(vllm.positional):
        if i < len(plugin_positional):
            p = plugin_positional[i]
            if p.name != v.name and v.kind == "positional":
                problems.append(f"positional parameter {i + 1} is `{v.name}`, the override's is `{p.name}`")
            if p.default is False and v.default:
                problems.append(f"`{v.name}` is optional, the override requires it")
        elif vllm.get(v.name) is not None and plugin.get(v.name) is not None:
            p = plugin.get(v.name)
            if p.default is False and v.default:
                problems.append(f"`{v.name}` is optional, the override requires it")
        elif not plugin.varargs or (v.kind == "positional" and not plugin.varkw):
            problems.append(f"has parameter `{v.name}`, which the override does not take")
    for v in vllm.params:
        if v.kind != "keyword_only":
            continue
        p = plugin.get(v.name)
        if p is None:
            if not plugin.varkw:
                problems.append(f"has keyword parameter `{v.name}`, which the override does not take")
        elif p.default is False and v.default:
            problems.append(f"`{v.name}` is optional, the override requires it")
    if vllm.varargs and not plugin.varargs:
        problems.append("takes *args, the override does not")
    if vllm.varkw and not plugin.varkw:
        problems.append("takes **kwargs, the override does not")
    for p in plugin.params:
        v = vllm.get(p.name)
        if v is None:
            problems.append(f"has no parameter `{p.name}`, which the override takes and hands on")
        elif p.kind == "keyword_only" and v.kind != "keyword_only" and p.name not in \
                [q.name for q in plugin_positional]:
            problems.append(f"`{p.name}` is positional, the override takes it by keyword only")
    return list(dict.fromkeys(problems))


def _calls(node: ast.AST, callee: str):
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            text = ast.unparse(n.func)
            if text == callee or callee.startswith(".") and text.endswith(callee):
                yield n


def _check(resolver: Resolver, item) -> list[str]:
    where = getattr(item, "path", None)
    if isinstance(item, HookCalls):
        plugin = Signature.parse(item.signature)
        seen, problems = 0, []
        for scope in item.scopes:
            modules = resolver.src.modules_under(scope) if resolver.src.is_package(scope) else [scope]
            for module in modules:
                if item.method not in (resolver.src.text(module) or ""):
                    continue  # (not parsed: most of the scope)
                for call in resolver.src.calls(module).get(item.method, []):
                    if not isinstance(call.func, ast.Attribute) or ast.unparse(call.func.value) == "super()":
                        continue
                    seen += 1
                    for p in call_problems(plugin, *_call_shape(call)):
                        problems.append(f"{module}:{call.lineno} calls `{item.method}` as "
                                        f"`{ast.unparse(call)[:200]}`: the plugin's override {item.signature} "
                                        f"{p}")
        if not seen:
            problems.append(f"nothing in {', '.join(item.scopes)} calls `.{item.method}(...)` any more "
                            f"(the plugin's hook would never run)")
        return problems
    target, missing = resolver.path(item.path)
    if target is None:
        return [f"{where}: {missing} (plugin: {item.use})"]
    if isinstance(item, Exists):
        return []
    if isinstance(item, Fields):
        cls = target if isinstance(target, Class) else None
        fields = None if cls is None else resolver.dataclass_fields(cls)
        if fields is None:
            return [f"{where}: not a dataclass (plugin: {item.use})"]
        names = [f[0] for f in fields]
        return [f"{where}: no init field `{f}` (plugin: {item.use})" for f in item.fields if f not in names]
    if isinstance(item, (CallsIn, Key)):
        if not isinstance(target, Function):
            return [f"{where}: not a function (plugin: {item.use})"]
        if isinstance(item, Key):
            for n in ast.walk(target.node):
                keys = (n.keys if isinstance(n, ast.Dict) else
                        [n.slice] if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store) else [])
                if any(isinstance(k, ast.Constant) and k.value == item.key for k in keys):
                    return []
            return [f"{where}: no longer sets key {item.key!r} (plugin: {item.use})"]
        calls = list(_calls(target.node, item.callee))
        if not calls:
            return [f"{where}: no longer calls `{item.callee}` (plugin: {item.use})"]
        problems = []
        for call in calls:
            n_args, keywords, starred, _ = _call_shape(call)
            if item.args is not None and (n_args != item.args or starred):
                problems.append(f"{where}: calls `{item.callee}` with {n_args} positional argument(s), the plugin "
                                f"reads {item.args} (plugin: {item.use})")
            lacking = [k for k in item.keywords if k not in keywords]
            if lacking:
                problems.append(f"{where}: calls `{item.callee}` without keyword(s) {', '.join(lacking)} "
                                f"(plugin: {item.use})")
        return problems
    sig = resolver.signature(target)
    if sig is None:
        return [f"{where}: not a function or class whose signature can be read (plugin: {item.use})"]
    if isinstance(item, Call):
        call = ast.parse(item.call, mode="eval").body
        return [f"{where}{sig}: {p} (plugin calls `{item.call}`: {item.use})"
                for p in call_problems(sig, *_call_shape(call))]
    if isinstance(item, Override):
        return [f"{where}{sig}: {p} (plugin's override {item.signature}: {item.use})"
                for p in override_problems(sig, Signature.parse(item.signature))]
    raise TypeError(item)


def _expand(resolver: Resolver, item) -> list:
    """An item whose path is "module:*.member": one item per class of the module that defines the member itself."""
    path = getattr(item, "path", "")
    if ":*." not in path:
        return [item]
    module, member = path.split(":*.")
    tree = resolver.src.tree(module)
    if tree is None:
        return [dataclasses.replace(item, path=f"{module}:*")]  # reported as a missing module
    return [dataclasses.replace(item, path=f"{module}:{stmt.name}.{member}") for stmt in _top_level(tree.body)
            if isinstance(stmt, ast.ClassDef) and isinstance(resolver.own_member(Class(module, stmt), member),
                                                             Function)]


def check(source_root, api=None) -> list[str]:
    """One line per problem with the vLLM sources under `source_root` (the `vllm` package folder, a folder holding
    it, or a wheel), for every entry of `api`; empty when the plugin's assumptions all hold. Imports no vLLM."""
    resolver = Resolver(source_root if isinstance(source_root, Sources) else Sources(source_root))
    problems = []
    for entry in API if api is None else api:
        for item in _expand(resolver, entry):
            problems += _check(resolver, item)
    return list(dict.fromkeys(problems))


def version(source_root) -> str | None:
    """vLLM's version as its sources state it (`vllm/_version.py`), or None."""
    sources = source_root if isinstance(source_root, Sources) else Sources(source_root)
    text = sources.read("vllm/_version.py") or ""
    m = re.search(r"""__version__\s*=\s*version\s*=\s*['"]([^'"]+)|__version__\s*=\s*['"]([^'"]+)""", text)
    return None if m is None else (m.group(1) or m.group(2))


def describe(item) -> tuple[str, str, str]:
    """(vLLM module, name in it, how the plugin relies on it) of `item`, as docs/vllm.md shows it."""
    if isinstance(item, HookCalls):
        return (", ".join(item.scopes), f"every call `.{item.method}(...)`",
                f"binds to the plugin's override `{item.signature}`: {item.use}")
    module, _, name = item.path.partition(":")
    if isinstance(item, Exists):
        how = item.use
    elif isinstance(item, Call):
        how = f"called as `{item.call}`: {item.use}"
    elif isinstance(item, Override):
        how = f"overridden as `{item.signature}`: {item.use}"
    elif isinstance(item, Fields):
        how = f"a dataclass with fields {', '.join(f'`{f}`' for f in item.fields)}: {item.use}"
    elif isinstance(item, CallsIn):
        shape = ("" if item.args is None else f" with {item.args} positional argument(s)") + (
            f" and keywords {', '.join(f'`{k}`' for k in item.keywords)}" if item.keywords else "")
        how = f"calls `{item.callee}`{shape}: {item.use}"
    elif isinstance(item, Key):
        how = f"returns key `{item.key!r}`: {item.use}"
    else:
        raise TypeError(item)
    return module, f"`{name}`", how


def markdown(api=None) -> str:
    """The list as a table, grouped by vLLM module (modules in the order the list first names them)."""
    rows = [describe(item) for item in (API if api is None else api)]
    order = list(dict.fromkeys(module for module, _, _ in rows))
    lines = ["| vLLM module | name | what the plugin relies on |", "|---|---|---|"]
    for module in order:
        for i, (_, name, how) in enumerate(r for r in rows if r[0] == module):
            lines.append(f"| {f'`{module}`' if i == 0 else ''} | {name} | {how} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--markdown"]:
        print(markdown())
        return 0
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    sources = Sources(argv[0])
    problems = check(sources)
    for line in problems:
        print(line)
    print(f"vLLM {version(sources) or '(version unknown)'} at {argv[0]}: {len(API)} names checked, "
          f"{len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
