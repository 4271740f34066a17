"""Rebuild the bundled sample photos in degrade/data/samples/ from the original photos.

Usage, from the repository root: python scripts/make_samples.py PHOTO_CORPUS_FOLDER. The folder holds
the GCompris photos that CHOSEN names (the .webp files of Debian's GCompris data package) and a
tab-separated MANIFEST.tsv with a header row and, per photo, the columns `file` (its name there),
`license` (which must start with CC0-1.0), `source_package`, `source_version`, `original_path` (its path
in the package) and `processing` (what was done to it before). Each photo is downscaled with area
averaging so its long side is 512 px and saved as lossless PNG; SOURCES.tsv records origin, licence and
processing per file.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2
import numpy as np

CHOSEN = {
    "macaw.png": "gcompris-animals-scarlet_macaw.webp",
    "giraffe.png": "gcompris-animals-giraffe.webp",
    "kingfisher.png": "gcompris-erase-kingfisher.webp",
    "castle.png": "gcompris-monuments-neuschwansteincastle.webp",
    "seabed.png": "gcompris-clickgame-sea1.webp",
    "sheep.png": "gcompris-farm-sheep.webp",
}
LONG_SIDE = 512


def main(corpus: Path, out: Path) -> None:
    with open(corpus / "MANIFEST.tsv", newline="") as f:
        manifest = {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}
    rows = []
    for name, source in CHOSEN.items():
        entry = manifest[source]
        if not entry["license"].startswith("CC0-1.0"):
            sys.exit(f"{source}: licence is not CC0: {entry['license']}")
        img = cv2.imdecode(np.fromfile(corpus / source, np.uint8), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        f = LONG_SIDE / max(h, w)
        size = (round(w * f), round(h * f))
        small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".png", small, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        assert ok
        buf.tofile(out / name)
        rows.append([name, f"{size[0]}x{size[1]}", entry["license"],
                     f"{source} from Debian package {entry['source_package']} {entry['source_version']} "
                     f"({entry['original_path']}); {entry['processing']}; then area-downscaled to long "
                     f"side {LONG_SIDE}, PNG"])
    with open(out / "SOURCES.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["file", "size", "license", "origin"])
        writer.writerows(rows)


if __name__ == "__main__":

    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_samples.py PHOTO_CORPUS_FOLDER (the folder with MANIFEST.tsv)")
    main(Path(sys.argv[1]), Path("degrade/data/samples"))
