"""The package's layout: no module grows past what one reader holds in mind."""

from __future__ import annotations

from tests.conftest import REPO_ROOT

MAX_LINES = 400


def test_no_module_is_over_400_lines() -> None:
    lengths = {
        path.relative_to(REPO_ROOT).as_posix(): len(path.read_text().splitlines())
        for path in (REPO_ROOT / "processor").rglob("*.py")
    }
    over = {module: lines for module, lines in lengths.items() if lines > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
