"""Bundled sample photos: six small CC0 photographs, the default input of every command.

Origins and licences are in ``degrade/data/samples/SOURCES.tsv`` (installed with the package).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

_SAMPLE_DIR = "data/samples"


def sample_dir() -> Path:
    return Path(str(files("degrade").joinpath(_SAMPLE_DIR)))


def sample_images() -> list[Path]:
    """Paths of the bundled sample photos (PNG, 8-bit RGB, long side 512 px), sorted by name."""
    return sorted(sample_dir().glob("*.png"))
