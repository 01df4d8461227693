"""The README and docs/ point only at what exists, inside the repository, and hand-write no counts that go stale.

Checked on README.md, docs/*.md and docs/results/README.md (the records in docs/results/*/ are kept as written at
the time): every relative link resolves to a file or folder of the repository (anchors into a Markdown page must
name one of its headings, GitHub-style); every `docs/...`, `src/...`, `tests/...`, `tests_vllm/...` or
`scripts/...` path named in backticks exists (globs must match something; placeholders such as `<org>` are
skipped); every module imported as `import dstp...` exists, and every one run with `python -m dstp...` runs as a
program (a package with a `__main__.py`, or a module with an `if __name__ == "__main__":` block); no link leaves the
repository; no line count or test count is written by hand; the README stays a front page. Paths of the lab
(`src/dstp/lab/`, `dstp.lab`) are reported by a test of their own."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "docs" / "results" / "README.md"]
README_MAX_LINES = 260
LAB = "src/dstp/lab"

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|src|tests|tests_vllm|scripts)/[\w./*<>{}-]*)")
MODULE = re.compile(r"python3? -m (dstp(?:\.\w+)+)")  # run as a program: a module file or a package's __main__
IMPORT = re.compile(r"(?:^|[\s;(\"'])(?:import|from) (dstp(?:\.\w+)+)")  # imported: a module or a package
# "about 250 lines", "559 tests", "92 passed": counts that change with every commit
HAND_COUNT = re.compile(r"\b\d[\d,]*\s+(?:lines?|tests?|passed|failed|deselected|test cases)\b", re.I)


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prose(text: str) -> str:
    """The page without its fenced code blocks (shell comments there are not headings, commands not links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(prose(page.read_text(encoding="utf-8"))):
        s = slug(title)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = prose(page.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub("", text)  # `[x](y)` inside code is not a link
    return LINK.findall(text) + REFERENCE_DEF.findall(text)


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))  # http:, https:, mailto:


def relative_links(page: Path):
    for target in links(page):
        if not is_external(target):
            yield target


def named_paths(page: Path) -> list[str]:
    """Repository paths named in backticks (prose and tables; code blocks hold commands, not references)."""
    out = []
    for code in INLINE_CODE.findall(prose(page.read_text(encoding="utf-8"))):
        for path in REPO_PATH.findall(code):
            path = path.rstrip(".,;:")
            if any(c in path for c in "<>{}"):  # a placeholder such as tests/real_configs/<org>--<name>/
                continue
            out.append(path)
    return out


def exists(path: str) -> bool:
    if "*" in path:
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


MAIN_GUARD = re.compile(r"^if __name__ == [\"']__main__[\"']\s*:", re.M)


def module_exists(module: str, run: bool = True) -> bool:
    """An importable module (`run` False), or one `python -m` runs as a program (`run` True)."""
    base = ROOT / "src" / Path(*module.split("."))
    if not run:
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    if (base / "__main__.py").is_file():
        return True
    file = base.with_suffix(".py")
    return file.is_file() and bool(MAIN_GUARD.search(file.read_text(encoding="utf-8")))


def named_modules(page: Path) -> list[tuple[str, bool]]:
    """(module, run as a program?) for `python -m dstp...` and `import dstp...` anywhere, code blocks included."""
    text = page.read_text(encoding="utf-8")
    return [(m, True) for m in MODULE.findall(text)] + [(m, False) for m in IMPORT.findall(text)]


def is_lab(path_or_module: str) -> bool:
    return path_or_module.startswith(LAB) or path_or_module.startswith("dstp.lab")


# -- links -----------------------------------------------------------------------------------------------------
def test_pages_exist():
    assert README.is_file() and (ROOT / "docs").is_dir()
    assert len(PAGES) > 2


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve_inside_the_repository(page):
    bad, outside = [], []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if ROOT != dest and ROOT not in dest.parents:
            outside.append(target)
            continue
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading '{anchor}' in {dest.relative_to(ROOT)})")
    assert not outside, f"{page_id(page)} links outside the repository: {outside}"
    assert not bad, f"{page_id(page)} has broken links: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_reference_to_files_outside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "shared/DESIGN.md" not in text, (
        f"{page_id(page)} points at the design document outside the repository: it is docs/design.md")


# -- named paths -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_paths_exist(page):
    missing = [p for p in named_paths(page) if not is_lab(p) and not exists(p)]
    missing += [m for m, run in named_modules(page) if not is_lab(m) and not module_exists(m, run)]
    assert not missing, f"{page_id(page)} names paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_lab_paths_exist(page):
    assert (ROOT / LAB).is_dir(), f"the lab ({LAB}/) is missing"
    names = [p for p in named_paths(page) if is_lab(p)]
    missing = [p for p in names if not exists(p)]
    missing += [m for m, run in named_modules(page) if is_lab(m) and not module_exists(m, run)]
    assert not missing, f"{page_id(page)} names lab paths that do not exist: {sorted(set(missing))}"


# -- the design document -----------------------------------------------------------------------------------------
def test_design_sections_cited_by_the_code_exist():
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", prose(design), re.M)}
    assert sections == set(range(1, max(sections) + 1)), f"docs/design.md's sections are not numbered 1..n: {sections}"
    cited = {}
    for folder in ("src", "tests", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for n in re.findall(r"DESIGN §(\d+)", path.read_text(encoding="utf-8", errors="replace")):
                cited.setdefault(int(n), []).append(str(path.relative_to(ROOT)))
    unknown = {n: files for n, files in cited.items() if n not in sections}
    assert not unknown, f"code cites DESIGN sections that docs/design.md lacks: {unknown}"


# -- counts and length -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_hand_written_line_or_test_counts(page):
    found = [(i, m.group(0)) for i, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
             for m in HAND_COUNT.finditer(line)]
    assert not found, (f"{page_id(page)} writes counts by hand that go stale with every commit (line, text): "
                       f"{found}; say where the number comes from instead (e.g. `wc -l`, `pytest`)")


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/")
    assert lines[2:6] == [
        "```bash",
        "make bench   # set-up (.venv, pinned deps) + the main job: ShiftBench with the shipped model -> results/",
        "make test    # set-up + the test suite (tiny random-weight models of every family, no downloads)",
        "```",
    ], "the README opens with the two set-up commands"


# -- the checker itself ------------------------------------------------------------------------------------------
def test_checker_finds_what_it_should(tmp_path):
    assert slug("5. DSTP (what we implement)") == "5-dstp-what-we-implement"
    assert slug("Parity (tests_vllm/, `make test-vllm`)") == "parity-tests_vllm-make-test-vllm"
    assert slug("ShiftBench: the headline") == "shiftbench-the-headline"
    page = tmp_path / "page.md"
    page.write_text("# T\n\nSee [a](docs/a.md#x), ![img](b.png) and [w](https://example.org).\n"
                    "`src/dstp/api.py` and `dstp fidelity --out docs/results/fidelity.json`, "
                    "`tests/real_configs/<org>--<name>/`.\n\n```bash\n# not a heading [c](c.md)\n```\n"
                    "`[d](d.md)`\n", encoding="utf-8")
    assert list(relative_links(page)) == ["docs/a.md#x", "b.png"]
    assert [t for _, t in HEADING.findall(prose(page.read_text()))] == ["T"]
    assert named_paths(page) == ["src/dstp/api.py", "docs/results/fidelity.json"]
    assert HAND_COUNT.search("shift.py (about 250 lines)") and HAND_COUNT.search("make test (559 tests)")
    assert IMPORT.findall('python -c "import dstp.lab.shiftbench as s"\nfrom dstp.config import X') == [
        "dstp.lab.shiftbench", "dstp.config"]
    assert HAND_COUNT.search("92 passed") and not HAND_COUNT.search("4 LLM layers, 147 runs")
    # run with python -m: a package's __main__.py or a module's main block; a library module without one is not
    assert module_exists("dstp.lab.cli") and module_exists("dstp.lab.cli.revival_check")
    assert module_exists("dstp.lab.shiftbench.revival_check", run=False)
    assert not module_exists("dstp.lab.shiftbench.revival_check") and not module_exists("dstp.no_such_module")
