"""The package's docstring examples run in CI (pyproject: ``--doctest-modules``, ``hf_stage_attribution`` in
``testpaths``), and none is left commented out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import hf_stage_attribution

PACKAGE = Path(hf_stage_attribution.__file__).parent


def test_doctests_of_the_package_are_collected(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.getoption("doctestmodules"), "pyproject's addopts must keep --doctest-modules"
    assert "hf_stage_attribution" in pytestconfig.getini("testpaths")


def test_no_example_is_commented_out() -> None:
    """A ``>>> # ...`` line is an example that never runs: make it real, or prose / a ``::`` block."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.match(r"\s*(>>>|\.\.\.) #(?! doctest:)", line)  # a directive line is fine
    ]
    assert not found, f"commented-out doctest lines: {found}"
