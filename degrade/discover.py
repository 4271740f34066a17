"""Finding images: files named directly, plus image files under folders (recursive), in a stable order."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from degrade.errors import DegradeError, DegradeWarning

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what a folder search finds
# what a file named directly may be called and still be re-read as a dataset's source (degrade verify):
# the folder search's suffixes and PNM/PAM, which the reader reads but a folder search leaves out (adding them
# there would move every later image's position, and so its degradation, in test sets of such folders)
SOURCE_SUFFIXES = (*IMAGE_SUFFIXES, ".pbm", ".pgm", ".ppm", ".pnm", ".pam")


def relative_names(files: Sequence[Path], root: Path, *, suffix: bool = False) -> list[str]:
    """Each file's path under the folder `root` as posix, without its suffix unless `suffix` (a file given
    as `root` itself: its own name)."""
    rel = [f.relative_to(root) if root.is_dir() else Path(f.name) for f in files]
    return [(r if suffix else r.with_suffix("")).as_posix() for r in rel]


def find_images(paths: Sequence[str | os.PathLike], *, what: str = "input images") -> list[Path]:
    """Each path that is a file, as given (whatever its suffix: reading it says whether it is an image), and
    the files with an image suffix under each folder, sorted by their path relative to it. A path that does
    not exist, or nothing found at all ("no {what}"), is a DegradeError.

    A folder search does not enter a symbolic link to a folder inside it (as `find` and Python's rglob do
    not: no loops, and a folder's images and their positions do not change with what a link leads to); each
    such link is a :class:`DegradeWarning` naming it, as is each entry with an image suffix that is not a
    regular file (a link to nothing, a FIFO, a device), left out. A folder given itself may be a link."""
    found: list[Path] = []
    for src in paths:
        p = Path(src)
        if p.is_dir():
            here = []
            for f in p.rglob("*"):
                if f.is_symlink() and f.is_dir():
                    warnings.warn(f"{f}: a link to a folder, not searched (a folder search does not follow "
                                  "links to folders)", DegradeWarning, stacklevel=2)
                elif f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    here.append(f)
                elif f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir():
                    warnings.warn(f"{f}: not a regular file (a link to nothing, a FIFO, a device), skipped",
                                  DegradeWarning, stacklevel=2)
            found += sorted(here, key=lambda f: f.relative_to(p).as_posix())
        elif p.exists():
            found.append(p)
        else:
            raise DegradeError(f"{p}: no such file or folder")
    if not found:
        raise DegradeError(f"no {what} (looked for " + ", ".join(IMAGE_SUFFIXES) + ")")
    return found
