"""Docs that derive from code stay in sync with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from degrade.recipe import levels_markdown
from degrade.vector import markdown_table

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("name,render", [("levels-table", levels_markdown), ("vector-table", markdown_table)])
def test_generated_blocks_of_degradation_md_are_current(name, render):
    doc = (ROOT / "docs" / "degradation.md").read_text()
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", doc, re.S)
    assert match, f"docs/degradation.md lacks the {name} markers"
    assert match.group(1) == render(), "stale: regenerate with python scripts/gen_docs.py"


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = "pip install -e '.[dev]' && python -m pytest -q"
    assert test_command in readme and test_command in ci
