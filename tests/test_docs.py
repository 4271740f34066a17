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


def test_dataset_format_md_lists_every_shard_dataset_and_attribute(tmp_path):
    """docs/dataset-format.md is the shard format's public contract: its two tables name exactly the
    datasets and the attributes a shard holds. Oracle: a shard just written, opened with h5py."""
    import h5py

    from .conftest import make_small_dataset

    make_small_dataset(tmp_path / "ds", count=2, seed=0, shard_size=2)
    doc = (ROOT / "docs" / "dataset-format.md").read_text()
    tables = {head: set(re.findall(r"^\| `(\w+)` \|", body, re.M))
              for head, body in re.findall(r"^\| (dataset|attribute) \|.*?\n((?:\|.*\n)+)", doc, re.M)}
    with h5py.File(tmp_path / "ds" / "shard-00000.h5", "r") as f:
        assert tables == {"dataset": set(f), "attribute": set(f.attrs)}
