"""Test-session set-up shared by every test module.

At import time, before any test module imports transformers or huggingface_hub (both read these variables
once, when first imported): Hugging Face runs offline and its caches point to a fixed folder inside the
repo's ignored `.pytest_cache/`, so no test reads or writes a user's real cache or reaches a hub.
The `hub_models` fixture writes the hub-shaped fixture repos of tests/hub_fixtures.py into that cache."""
from __future__ import annotations

import os
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HF_HOME = REPO_ROOT / ".pytest_cache" / "hf-home"
HF_HUB_CACHE = HF_HOME / "hub"

_ALREADY_IMPORTED = sorted(m for m in ("huggingface_hub", "transformers", "datasets") if m in sys.modules)

os.environ["HF_HOME"] = str(HF_HOME)
os.environ["HF_HUB_CACHE"] = str(HF_HUB_CACHE)
os.environ["HF_ASSETS_CACHE"] = str(HF_HOME / "assets")
os.environ["HF_XET_CACHE"] = str(HF_HOME / "xet")
os.environ["HF_DATASETS_CACHE"] = str(HF_HOME / "datasets")
for _var in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE",
             "PYTORCH_PRETRAINED_BERT_CACHE", "HF_TOKEN_PATH"):
    os.environ.pop(_var, None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest


@pytest.fixture(scope="session")
def hub_models() -> dict[str, str]:
    """Family -> hub id of the fixture repos (tests/hub_fixtures.py), built once into the session's offline
    cache; load them with `from_pretrained(hub_models["qwen2_5_vl"])`."""
    import huggingface_hub.constants as hub_constants

    if pathlib.Path(hub_constants.HF_HUB_CACHE) != HF_HUB_CACHE or not hub_constants.HF_HUB_OFFLINE:
        pytest.fail(f"huggingface_hub was imported before tests/conftest.py set its environment (already imported "
                    f"then: {_ALREADY_IMPORTED}); its cache is {hub_constants.HF_HUB_CACHE}, offline="
                    f"{hub_constants.HF_HUB_OFFLINE}. Do not import it from a plugin or a root conftest.")
    from hub_fixtures import build_hub_cache

    return build_hub_cache(HF_HUB_CACHE)


def pytest_collection_modifyitems(session, config, items):
    """tests/test_real_checkpoints.py keeps one real-width stand-in (2-4 GB) on disk at a time: run its tests grouped
    by the checkpoint they build, in the module's own order within a group, so that each is built once."""
    def checkpoint(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        return params.get("repo_id") or getattr(item.module, "CHECKPOINT_OF", {}).get(item.originalname)

    idx = [i for i, item in enumerate(items) if item.path.name == "test_real_checkpoints.py"]
    if not idx:
        return
    order = list(dict.fromkeys(c for c in map(checkpoint, (items[i] for i in idx)) if c))
    group = sorted((items[i] for i in idx), key=lambda item: -1 if checkpoint(item) is None
                   else order.index(checkpoint(item)))
    for i, item in zip(idx, group):
        items[i] = item
