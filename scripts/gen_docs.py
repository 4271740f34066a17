"""Regenerate the parts of docs/ that derive from code: the level table and the vector table.

Run from the repository root: python scripts/gen_docs.py. tests/test_docs.py fails when they are stale.
"""

from __future__ import annotations

import re
from pathlib import Path

from degrade.recipe import levels_markdown
from degrade.vector import markdown_table

DOC = Path(__file__).parents[1] / "docs" / "degradation.md"
BLOCKS = {"levels-table": levels_markdown, "vector-table": markdown_table}


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name}:start -->\n)(.*?)(<!-- {name}:end -->)", re.S)


def main() -> None:
    text = DOC.read_text()
    for name, render in BLOCKS.items():
        pattern = block_pattern(name)
        if not pattern.search(text):
            raise SystemExit(f"{DOC}: markers for {name} not found")
        text = pattern.sub(lambda m: m.group(1) + render() + m.group(3), text)
    DOC.write_text(text)


if __name__ == "__main__":
    main()
