"""The library's refusals: one base type, so a caller (or a CLI) catches exactly these and `OSError`.

`DegradeError` subclasses `ValueError`, so code written against the older `ValueError`s keeps working.
Anything else that escapes the library is a bug and should keep its traceback.
"""

from __future__ import annotations


class DegradeError(ValueError):
    """Bad input refused by the library; the message says what and why in one line."""


class ImageError(DegradeError):
    """An image file could not be read or written; the message names the file and the reason."""


class DatasetError(DegradeError):
    """A dataset cannot be made, resumed, read or verified; the message says why in one line."""


class SampleIndexError(DatasetError, IndexError):
    """A sample index outside a dataset (an IndexError too, as sequences raise)."""


class SampleIndexTypeError(DatasetError, TypeError):
    """A dataset index that is neither an integer nor a slice (a TypeError too, as sequences raise)."""


class DegradeWarning(UserWarning):
    """Something the library did that a caller may not expect, and went on (a folder search that left a link
    to a folder unsearched); the message says what in one line. The CLIs print it as `warning: ...`."""
