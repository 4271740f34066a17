"""JSON as our file readers take it: an object that names a key twice is refused."""

from __future__ import annotations

import json
from typing import Any


class DuplicateKey(ValueError):
    """A JSON object that names a key twice (strict_json)."""


def strict_json(text: str | bytes) -> Any:
    """json.loads, refusing (DuplicateKey, a ValueError) an object that names a key twice: JSON readers
    differ on which of the two counts, so a file that says two things is no file of ours (a model file's
    header naming a tensor twice, with two places for its bytes, say). Other errors as json.loads's."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKey(f"the key {twice[:80]!r} appears twice in one object")
    return out
