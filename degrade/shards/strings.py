"""A shard's strings, read so that a small file cannot inflate. In HDF5 a variable-length string is a
pointer to text stored elsewhere in the file, and many pointers may share one text: a 10 MB shard whose
2,000 `params` rows (or an array attribute's 2,000 elements) all point at one 2 MB string read as 4-8 GB
(a security review). Attributes are read only when they hold one value (bounded by the file), and string
rows a block at a time, each checked against a limit."""

from __future__ import annotations

import os
from typing import Any

from degrade.errors import DatasetError

# Rows read at a time: each read costs about 70 us however many rows it takes (a row about 1 us more), but
# every row may inflate to the file's size: a read takes as many rows as STRING_BUDGET holds of those, at
# least one (a row of a shard larger than the budget: no more than the file) and at most MAX_STRING_BLOCK.
STRING_BUDGET = 256 << 20
MAX_STRING_BLOCK = 64
MAX_SOURCE_BYTES = 4096  # a source's path in a shard's `sources` table: Linux's PATH_MAX


class UnreadArray:
    """What scalar_attr gives for an array attribute, left unread: no text, and says its shape."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def __repr__(self) -> str:
        return f"<an array attribute of shape {self.shape}, not read>"


def scalar_attr(f: Any, name: str) -> Any:
    """Attribute `name` of an HDF5 object `f` where it is one value; None where it is missing; an
    UnreadArray where it is an array (which no attribute of ours is)."""
    if name not in f.attrs:
        return None
    shape = f.attrs.get_id(name).shape
    return f.attrs[name] if shape == () else UnreadArray(shape)


def string_rows(ds: Any, rows: slice, *, limit: int, where: str) -> list[Any]:
    """The rows of a variable-length string dataset that `rows` selects (ascending), as h5py gives them
    (bytes), each at most `limit` bytes, else a DatasetError naming `where` and the row. Read in blocks
    whose worst case (every row the file's size) stays within STRING_BUDGET."""
    wanted = range(*rows.indices(ds.shape[0]))
    step = max(1, min(MAX_STRING_BLOCK, STRING_BUDGET // max(1, os.path.getsize(ds.file.filename))))
    out = []
    for at in range(0, len(wanted), step):
        part = wanted[at:at + step]
        texts = ds[part.start:part[-1] + 1:part.step]
        out.extend(_within(text, limit, where, row) for row, text in zip(part, texts))
    return out


def one_string(ds: Any, row: int, *, limit: int, where: str) -> Any:
    """Row `row` of a variable-length string dataset, at most `limit` bytes (one row is no larger than the
    file: read as it is), else the DatasetError of string_rows."""
    return _within(ds[row], limit, where, row)


def _within(text: Any, limit: int, where: str, row: int) -> Any:
    if len(text) > limit:
        raise DatasetError(f"{where}: row {row} holds a string of {len(text)} bytes, more than {limit}")
    return text


__all__ = ["MAX_SOURCE_BYTES", "MAX_STRING_BLOCK", "STRING_BUDGET", "UnreadArray", "one_string", "scalar_attr",
           "string_rows"]
