"""The declared range of the dependencies a user brings: one source of truth, refused or warned outside it."""
import re
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from dstp.errors import UnsupportedEnvironmentError
from dstp.models import hf_compat

ROOT = Path(__file__).resolve().parents[1]


def declared(name: str) -> tuple[str, str]:
    """(lower bound, exclusive upper bound) of `name` in pyproject.toml's dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in deps if re.match(rf"{name}[<>=]", d)]
    return re.search(r">=([\d.]+)", spec).group(1), re.search(r"<([\d.]+)", spec).group(1)


@pytest.mark.parametrize("name", ["transformers", "torch"])
def test_pyproject_declares_the_checked_range(name):
    first, last = hf_compat.SUPPORTED[name]
    major, minor = map(int, last.split("."))
    assert declared(name) == (first, f"{major}.{minor + 1}")


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-floor.lock"])
def test_each_lock_is_an_end_of_the_range(lock):
    pins = dict(re.findall(r"^(torch|transformers)==([\d.]+)", (ROOT / lock).read_text(), flags=re.M))
    end = 1 if lock == "requirements.lock" else 0
    for name, version in pins.items():
        assert version.startswith(hf_compat.SUPPORTED[name][end] + "."), (lock, name, version)
    assert set(pins) == {"torch", "transformers"}


def test_installed_versions_are_in_range():
    installed = {"transformers": transformers.__version__, "torch": torch.__version__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf_compat.check_versions(installed) == []


def test_transformers_4_is_refused_in_one_line():
    with pytest.raises(UnsupportedEnvironmentError) as e:
        hf_compat.check_versions({"transformers": "4.57.1", "torch": "2.14.1"})
    text = str(e.value)
    assert "\n" not in text and "4.57.1" in text and "5.17 to 5.25" in text


@pytest.mark.parametrize("name,version", [("transformers", "5.26.0"), ("transformers", "5.16.1"),
                                          ("torch", "2.15.0"), ("torch", "2.10.0+cu128")])
def test_outside_the_range_warns_naming_both(name, version):
    installed = {"transformers": "5.25.0", "torch": "2.14.1", name: version}
    with pytest.warns(UserWarning) as record:
        texts = hf_compat.check_versions(installed)
    assert len(texts) == 1 and len(record) == 1
    first, last = hf_compat.SUPPORTED[name]
    assert version in texts[0] and f"{first} to {last}" in texts[0] and "\n" not in texts[0]
