"""What the dasr-* commands share: one-line errors and the torch check."""

from __future__ import annotations

import importlib.util

import click


def os_error(exc: OSError) -> str:
    """An OSError as one line: 'path: reason'."""
    where = exc.filename if exc.filename is not None else ""
    return f"{where}: {exc.strerror}" if where and exc.strerror else str(exc)


def require_torch() -> None:
    """The dasr-* commands need PyTorch, an optional dependency of this package: say how to get it."""
    if importlib.util.find_spec("torch") is None:
        raise click.ClickException("PyTorch is not installed; the dasr-* commands need it: "
                                   "pip install 'dasr-toolkit[train]' (on a CPU-only machine first: "
                                   "pip install torch --index-url https://download.pytorch.org/whl/cpu)")
