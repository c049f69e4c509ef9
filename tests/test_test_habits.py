"""The fast inner loop stays what the README promises: `slow` is a registered marker that deselects tests, and the
README names both commands."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_slow_is_a_registered_marker_and_the_readme_names_both_commands():
    pytest_options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(marker.startswith("slow:") for marker in pytest_options["markers"])
    readme = (ROOT / "README.md").read_text()
    assert 'uv run pytest -m "not slow"' in readme
    assert "uv run o365sync demo" in readme.split("```sh", 2)[1] and "uv run pytest " in readme.split("```sh", 2)[1]


def test_the_inner_loop_leaves_out_some_tests_but_not_all():
    marked = [p for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.slow" in p.read_text()]
    assert marked and len(marked) < len(list((ROOT / "tests").glob("test_*.py")))
