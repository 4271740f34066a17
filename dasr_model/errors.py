"""The model side's refusals: a bad checkpoint, model file, run folder or option.

`DASRError` derives from `degrade.DegradeError` (a `ValueError`), so every `dasr-*` command catches
exactly the library's refusals and `OSError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from degrade.errors import DegradeError


class DASRError(DegradeError):
    """A model, checkpoint, run folder or option was refused; the message says why in one line."""
