"""A shard's strings, read so that a small file cannot inflate. In HDF5 a variable-length string is a
pointer to text stored elsewhere in the file, and many pointers may share one text: a 10 MB shard whose
2,000 `params` rows (or an array attribute's 2,000 elements) all point at one 2 MB string read as 4-8 GB
(a security review). Attributes are read only when they hold one value (bounded by the file), and string
rows a few at a time, each checked against a limit."""

from __future__ import annotations

from typing import Any

from degrade.errors import DatasetError

STRING_BLOCK = 8  # rows read at a time: as fast as the whole column (about 6 us a row), 8 strings at the most
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
    (bytes), each at most `limit` bytes, else a DatasetError naming `where` and the row."""
    wanted = range(*rows.indices(ds.shape[0]))
    out = []
    for at in range(0, len(wanted), STRING_BLOCK):
        part = wanted[at:at + STRING_BLOCK]
        block = ds[part.start:part[-1] + 1:part.step]
        for row, text in zip(part, block):
            if len(text) > limit:
                raise DatasetError(f"{where}: row {row} holds a string of {len(text)} bytes, more than {limit}")
        out.extend(block)
    return out


__all__ = ["MAX_SOURCE_BYTES", "STRING_BLOCK", "UnreadArray", "scalar_attr", "string_rows"]
