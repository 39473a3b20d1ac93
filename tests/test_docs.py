"""The documentation cannot drift: the README stays short, the configuration reference is what
the settings' declarations render, and every test, file and link the docs name exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from processor.options import options_of
from processor.reference import COMMANDS, MACHINE_DEFAULTS, REGENERATE, render
from processor.store.access import ACL_RULES, CLUSTER_ACL_RULES

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
REFERENCE = REPO_ROOT / "docs" / "configuration.md"
DOCS = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 350

# A test named in prose: a file (test_e2e.py), a function, or a function's prefix ("test_x_...").
TEST_NAME = re.compile(r"\b(test_\w+)(\.py)?(\.\.\.)?")
# A repository path in prose; neither a path under another root (/etc/processor/env) nor a glob.
REPO_PATH = re.compile(r"(?<![\w/.-])((?:tests|demo|processor|docs)/[\w./-]*\w)(?![\w*])")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def _test_functions() -> set[str]:
    names: set[str] = set()
    for path in (REPO_ROOT / "tests").glob("*.py"):
        names.update(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
    return names


def _prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside its fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    anchors = set()
    for line in _prose(path):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def _resolves(linked: Path, anchor: str) -> bool:
    if not linked.exists():
        return False
    return not anchor or linked.suffix != ".md" or anchor in _anchors(linked)


def test_the_readme_is_at_most_350_lines() -> None:
    count = len(README.read_text().splitlines())
    assert count <= MAX_README_LINES, (
        f"README.md has {count} lines, more than {MAX_README_LINES}: move detail to docs/"
    )


def test_the_configuration_reference_is_what_the_settings_declare() -> None:
    assert REFERENCE.read_text() == render(), (
        f"docs/configuration.md differs from the settings' declarations: run `make docs` "
        f"({REGENERATE}) and commit the result"
    )


def test_the_regenerate_command_prints_the_reference() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "processor.reference"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert printed == render()


@pytest.mark.parametrize(("command", "cls"), COMMANDS, ids=[name for name, _ in COMMANDS])
def test_the_reference_lists_every_setting_of_every_command(command: str, cls: type) -> None:
    rows = {line.split("`")[1] for line in render().splitlines() if line.startswith("| `")}
    missing = [option.env for option in options_of(cls) if option.env not in rows]
    assert not missing, f"{command}: {missing} missing from the reference"


def test_machine_dependent_defaults_name_real_settings() -> None:
    names = {option.name for _, cls in COMMANDS for option in options_of(cls)}
    assert set(MACHINE_DEFAULTS) <= names


@pytest.mark.parametrize("doc", DOCS, ids=_relative)
def test_every_test_the_docs_cite_exists(doc: Path) -> None:
    functions = _test_functions()
    missing = []
    for line in _prose(doc):
        for name, is_file, elided in TEST_NAME.findall(line):
            if is_file:
                found = (REPO_ROOT / "tests" / f"{name}.py").is_file()
            elif elided:
                found = any(function.startswith(name) for function in functions)
            else:
                found = name in functions
            if not found:
                missing.append(name + is_file)
    assert not missing, f"{_relative(doc)} cites tests that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_relative)
def test_every_repository_path_the_docs_cite_exists(doc: Path) -> None:
    cited = {path for line in _prose(doc) for path in REPO_PATH.findall(line)}
    missing = sorted(path for path in cited if not (REPO_ROOT / path).exists())
    assert not missing, f"{_relative(doc)} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_relative)
def test_every_relative_link_points_at_a_file_and_heading_that_exist(doc: Path) -> None:
    broken = []
    for line in _prose(doc):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto: are not ours to check
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not _resolves(linked, anchor):
                broken.append(target)
    assert not broken, f"{_relative(doc)} has broken links: {broken}"


def test_the_readme_shows_the_acl_lines_the_start_up_check_needs() -> None:
    readme = " ".join(README.read_text().split())
    assert ACL_RULES in readme, "README's ACL line differs from processor/store/access.py ACL_RULES"
    assert CLUSTER_ACL_RULES in readme, "README's cluster ACL line differs from CLUSTER_ACL_RULES"


def test_the_module_map_lists_every_module_and_only_those() -> None:
    text = (REPO_ROOT / "docs" / "development.md").read_text()
    section = text.split("## Module map", 1)[1]
    listed = set(re.findall(r"^- `(processor/[\w/]+\.py)`", section, flags=re.M))
    modules = {
        path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "processor").rglob("*.py")
        if path.name != "__init__.py"
    }
    assert listed == modules, {"not listed": modules - listed, "gone": listed - modules}
