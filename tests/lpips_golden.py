"""Weights, images and reference distances for tests/test_lpips.py.

`make_weights` writes a random AlexNet backbone in torchvision's layout (with a classifier head to ignore)
and random LPIPS linear layers in the `lpips` package's layout, both in the pre-1.6 torch.save format the
published files use; `image_pairs` gives the image pairs. The GOLDEN distances come from the reference
implementation, the `lpips` package (0.1.4) on torchvision's AlexNet, with these weights and images:

    pip install --no-deps lpips==0.1.4 torchvision==<the one matching torch> pillow tqdm
    python tests/lpips_golden.py

(torchvision's PyPI wheel is built for CUDA; with a CPU-only torch its compiled operators fail to
register, which AlexNet does not need, so this script skips that registration.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

CONVS = {0: (3, 64, 11), 3: (64, 192, 5), 6: (192, 384, 3), 8: (384, 256, 3), 10: (256, 256, 3)}
# lpips 0.1.4 with torchvision 0.28.0 and torch 2.13.0+cpu, 2026-11-26 (float32, CPU)
GOLDEN = {"blurred": 0.00337104, "noisy": 0.00500702, "other crop": 0.14982054}


def make_weights(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(2018)
    backbone = {}
    for i, (cin, cout, k) in CONVS.items():
        backbone[f"features.{i}.weight"] = rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k))
        backbone[f"features.{i}.bias"] = rng.normal(0, 0.05, cout)
    backbone["classifier.1.weight"] = rng.normal(0, 0.01, (16, 9216))  # torchvision's head: not used
    lins = {f"lin{n}.model.1.weight": np.abs(rng.normal(0, 0.1, (1, c[1], 1, 1))) for n, c in enumerate(CONVS.values())}
    paths = folder / "alexnet.pth", folder / "alex.pth"
    for path, state in zip(paths, (backbone, lins)):
        torch.save({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}, path,
                   _use_new_zipfile_serialization=False)
    return paths


def image_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Name -> two (72, 104, 3) float32 images in [0, 1] on 8-bit levels, from a bundled photo."""
    import cv2

    import degrade

    photo = degrade.read_image(degrade.sample_images()[0])
    ref = photo[40:112, 60:164]
    rng = np.random.default_rng(7)
    pairs = {"blurred": cv2.GaussianBlur(ref, (0, 0), 1.5),
             "noisy": ref + rng.normal(0, 0.05, ref.shape),
             "other crop": photo[140:212, 200:304]}
    return {name: (_levels(ref), _levels(other)) for name, other in pairs.items()}


def _levels(img: np.ndarray) -> np.ndarray:
    return (np.round(np.clip(img, 0, 1) * 255) / 255).astype(np.float32)


def main() -> None:
    import tempfile
    import types

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import lpips

    with tempfile.TemporaryDirectory() as tmp:
        alexnet, lin = make_weights(Path(tmp))
        ref = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, model_path=str(lin), verbose=False)
        state = torch.load(alexnet, weights_only=True)
        for name, p in ref.net.named_parameters():  # slice{n}.{i}.weight -> features.{i}.weight
            p.data.copy_(state["features." + name.split(".", 1)[1]])
    for name, (a, b) in image_pairs().items():
        ta, tb = (torch.from_numpy(x).permute(2, 0, 1)[None] for x in (a, b))
        print(f'"{name}": {float(ref(ta, tb, normalize=True)):.8f},')


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
