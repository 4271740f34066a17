"""dasr-eval's core: per-level scores of a model and of bicubic upsampling, predictor MAE per block."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dasr_model.data import block_mae, checked_v
from dasr_model.diagnostics import mixing_stats
from dasr_model.errors import DASRError
from dasr_model.infer import DEFAULT_TILE, predict, refuse_out_of_memory, super_resolve, to_image, to_tensor
from dasr_model.metrics import CROP, cropped_y, psnr, psnr_rgb, psnr_y, ssim
from dasr_model.niqe import niqe
from degrade.io import to_uint8
from degrade.testset import MIN_TEST_SIDE

Pair = tuple[int, np.ndarray | None, np.ndarray, np.ndarray | None]  # level, HR or None, LR (float32 [0, 1]), v
MIN_HR_SIDE = MIN_TEST_SIDE  # an HR side below this leaves an LR of under 16 px: too little for degrading and SSIM


class Pairs:
    """The pairs to evaluate, with their number known up front (for a progress bar); iterated lazily.
    `names[i]` names pair i (its image, for per-image scores and saved SR images), where known;
    `sharpen_hr`: the LR images were degraded from the sharpened HR (a make-dataset --sharpen-hr set)."""

    def __init__(self, count: int, make: Callable[[], Iterator[Pair]], names: list[str] | None = None,
                 sharpen_hr: bool = False):
        self.count, self.make, self.sharpen_hr = count, make, sharpen_hr
        self.names = names if names is not None else [f"{i:06d}" for i in range(count)]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Pair]:
        return self.make()


def sharpened_note(what: str) -> str:
    """The note for scores on pairs whose LR was degraded from the sharpened HR (`what`: the dataset, named)."""
    return (f"note: {what} was made with --sharpen-hr: its LR images come from the sharpened HR but are scored "
            "against the plain HR; real images are not sharpened, so make it without")


def pairs_from_shards(path: str | Path, *, limit: int | None = None) -> Pairs:
    """A dataset's samples (the first `limit` of them), as stored: no crop, no augmentation. A sample whose
    v is not 33 numbers in [0, 1] is refused as training refuses it (DatasetError, here, before any is read)."""
    import degrade

    ds = degrade.open_dataset(path)
    n = len(ds) if limit is None else min(limit, len(ds))
    seen = 0  # the labels checked now, one shard's v at a time: a damaged one is refused before any work
    for k in range(len(ds.files)):
        if seen >= n:
            break
        v = ds.shard_column("v", k)[: n - seen]
        bad = np.flatnonzero(~((v >= 0) & (v <= 1)).all(axis=1))
        if bad.size:
            checked_v(v[bad[0]], seen + int(bad[0]))  # raises, naming the sample as training does
        seen += len(v)

    def make() -> Iterator[Pair]:
        for i in range(n):
            s = ds[i]
            yield int(s.params.level or 0), s.hr.astype(np.float32) / 255, s.lr.astype(np.float32) / 255, s.v

    return Pairs(n, make, [f"sample-{ds.stored_index(i):08d}" for i in range(n)], sharpen_hr=ds.sharpen_hr)


def pairs_from_hr_dir(folder: str | Path, levels: list[int], seed: int) -> Pairs:
    """Each HR image (cropped to a multiple of 4) degraded at each level, with a seed fixed by
    (seed, image position in sorted order, level), so numbers compare across runs and models: the test set
    `degrade make-testset` writes (degrade.testset), made on the fly."""
    import degrade
    from degrade.discover import find_images
    from degrade.testset import read_test_hr, testset_params

    files = find_images([folder])

    def make() -> Iterator[Pair]:
        for i, f in enumerate(files):
            hr = read_test_hr(f).astype(np.float32) / 255
            for level in levels:
                params = testset_params(level, seed, i)
                yield level, hr, degrade.apply(hr, params), degrade.encode(params)

    return Pairs(len(files) * len(levels), make, [n for n in image_names(files, Path(folder)) for _ in levels])


def pairs_from_testset(folder: str | Path, levels: list[int] | None = None) -> Pairs:
    """A saved test set's pairs (degrade make-testset), each file checked against its manifest, with their
    levels and v: the pairs pairs_from_hr_dir makes from the set's HR folder and seed."""
    from degrade.testset import open_testset

    ts = open_testset(folder)
    wanted = ts.levels if levels is None else levels

    def make() -> Iterator[Pair]:
        for level, _, hr, lr, v in ts.pairs(wanted):
            yield level, hr, lr, v

    return Pairs(len(ts.images) * len(wanted), make, [image.name for image in ts.images for _ in wanted])


class ValidationSet:
    """Validation during training, batched on the device: the EMA generator's PSNR-Y (4-px crop) per level,
    bicubic's (computed once), and the predictor's MAE per block, on a dataset's first samples (as stored).

    The numbers are dasr-eval's on those samples (`evaluate_pairs`), computed faster: the samples stay on the
    device, the generator mixes its experts per sample in batches of up to VAL_BATCH_PIXELS LR pixels
    instead of being fused image by image, and PSNR-Y is reduced on the device in float64 (the same 8-bit
    rounding, BT.601 weights and crop as dasr_model.metrics). They agree with `evaluate_pairs` up to float
    rounding of the generator's output (tested). Samples of several sizes are batched by size."""

    def __init__(self, pairs: Pairs, device: torch.device):
        self.device = device
        self.levels: list[int] = []
        self.lr: list[torch.Tensor] = []  # (3, h, w) float32 on the device
        self.hr: list[torch.Tensor] = []  # (3, H, W) uint8 on the device (its Y is made per batch)
        self.v: list[torch.Tensor] = []
        bicubic: dict[int, list[float]] = {}
        for level, hr, lr, v in pairs:
            if hr is None or v is None:
                raise DASRError("a validation sample needs its HR and its v")
            lr_t = to_tensor(lr).to(device)
            bic = to_image(F.interpolate(lr_t, scale_factor=4, mode="bicubic", align_corners=False))
            bicubic.setdefault(level, []).append(psnr_y(bic, hr))
            self.levels.append(level)
            self.lr.append(lr_t[0])
            self.hr.append(torch.from_numpy(np.ascontiguousarray(to_uint8(hr).transpose(2, 0, 1))).to(device))
            self.v.append(torch.from_numpy(np.asarray(v, np.float32)))
        if not self.levels:
            raise DASRError("no validation samples")
        self.bicubic = {str(k): float(np.mean(x)) for k, x in sorted(bicubic.items())}
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(self.lr):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        self.batches = []  # lists of sample indices, each one shape and at most VAL_BATCH_PIXELS LR pixels
        for shape, idx in by_shape.items():
            per = max(1, VAL_BATCH_PIXELS // (shape[1] * shape[2]))
            self.batches += [idx[i : i + per] for i in range(0, len(idx), per)]

    def __len__(self) -> int:
        return len(self.levels)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, generator: torch.nn.Module) -> dict[str, Any]:
        """{"psnr_y": {level: mean}, "bicubic_psnr_y": {level: mean}, "mae": {block: MAE}} for `model`'s
        predictor and `generator` (an ExpertMSRResNet, e.g. the EMA copy), in float32, in eval mode."""
        was = model.training, generator.training
        model.eval()
        generator.eval()
        try:
            psnrs = torch.empty(len(self), dtype=torch.float64)
            v_hats = torch.empty(len(self), len(self.v[0]))
            for idx in self.batches:
                lr = torch.stack([self.lr[i] for i in idx])
                v_hat, a = predict(model, lr)  # as dasr-sr does
                sr = generator(lr, a)
                hr_y = _y(torch.stack([self.hr[i] for i in idx]).double())
                mse = ((_y(torch.round(sr.clamp(0, 1) * 255).double()) - hr_y) ** 2).mean(dim=(1, 2))
                psnrs[idx] = (10 * torch.log10(255.0**2 / mse)).cpu()  # mse 0: inf, as metrics.psnr
                v_hats[idx] = v_hat.float().cpu()
        finally:
            model.train(was[0])
            generator.train(was[1])
        levels = torch.tensor(self.levels)
        return {"psnr_y": {str(k): float(psnrs[levels == k].mean()) for k in sorted(set(self.levels))},
                "bicubic_psnr_y": dict(self.bicubic),
                "mae": block_mae(v_hats, torch.stack(self.v))}


VAL_BATCH_PIXELS = 1 << 16  # LR pixels per validation forward pass (16 samples of 64 x 64)


def _y(x: torch.Tensor, crop: int = 4) -> torch.Tensor:
    """(B, 3, H, W) float64 on 8-bit levels (0-255) -> (B, H - 2 crop, W - 2 crop) BT.601 Y, as
    dasr_model.metrics.y_channel computes it (the same operations in the same order)."""
    y = 16 + (65.481 * x[:, 0] + 128.553 * x[:, 1] + 24.966 * x[:, 2]) / 255
    return y[:, crop:-crop, crop:-crop] if crop else y


def image_names(files: list[Path], root: Path) -> list[str]:
    """Each file's path under `root` without its suffix (posix); with the suffix for all where two would
    share a name (a.png and a.jpg), so that names stay distinct."""
    from degrade.discover import relative_names

    stems = relative_names(files, root)  # a file given alone: its own name
    return stems if len(set(stems)) == len(stems) else relative_names(files, root, suffix=True)


# A trailing scale or role tag that names a file of an LR/HR pair (DIV2K's 0801x4 and 0801x4m, RealSR's
# Canon_001_LR4 and Canon_001_HR, DRealSR's _x1 / _x4): left out when pairing LR and HR files by name. An
# x + digits without a separator is a tag only after a digit (0801x4, box2x4): after a letter it may be part
# of the word (fox2, matrix4), which stripping it turned into "fo" and "matri". After a letter it is tried
# only for an LR that pairs no other way (LOOSE_TAG): Set5's and Set14's babyx4 and zebrax4, BasicSR's layout.
PAIR_TAG = re.compile(r"(?:(?:[_-]|(?<=\d))x\d+[mdw]?|[_-](?:lr|hr)\d*)$", re.IGNORECASE)
LOOSE_TAG = re.compile(r"x\d+[mdw]?$", re.IGNORECASE)


def pair_name(path: Path, root: Path, *, strip: bool = True, tag: re.Pattern = PAIR_TAG) -> str:
    """A file's path relative to its folder, without suffix, and without `tag` when `strip`."""
    rel = path.relative_to(root)
    stem = tag.sub("", rel.stem) if strip else rel.stem
    return (rel.parent / (stem or rel.stem)).as_posix()  # a name that is all tag (x4.png) stays itself


def _x_ending(path: Path) -> str | None:
    """A name's x + digits ending, whatever precedes it (babyx4, 0801x4, comic_x4: "x4"), else None."""
    m = LOOSE_TAG.search(path.stem)
    return m.group(0).lower() if m else None


def _loose_tag(path: Path) -> str | None:
    """The x + digits ending of a name that PAIR_TAG leaves alone (after a letter: babyx4), else None."""
    return _x_ending(path) if not PAIR_TAG.search(path.stem) else None


def match_pairs(lr_files: list[Path], lr_root: Path, hr_files: list[Path], hr_root: Path) -> list[tuple[Path, Path]]:
    """Each LR file with its HR file, by name: the same name; else the LR's name without its tag equal to an
    HR's name (0801x4 -> 0801); else both without their tags (Canon_001_LR4 -> Canon_001 <- Canon_001_HR);
    else, for a name with x + digits after a letter, where every LR name of its folder ends in that x + digits
    (after anything: babyx4 beside 0801x4 and comic_x4) or two or more of them after a letter, the same two
    with it taken for a tag (babyx4 -> baby).
    The first rule that finds one partner decides; several at once, an HR claimed twice or a file left
    without a partner is a DASRError naming it."""
    hr_by_name: dict[str, Path] = {}
    hr_by_stem: dict[str, list[Path]] = {}
    for f in hr_files:
        other = hr_by_name.setdefault(pair_name(f, hr_root, strip=False), f)
        if other != f:  # a.png and a.jpg
            raise DASRError(f"{other} and {f}: two HR images of one name; keep one")
        hr_by_stem.setdefault(pair_name(f, hr_root), []).append(f)
    # x + digits after a letter is a tag where its folder's LR names share it: all of them end in it, whatever
    # precedes it (Set5's x4 on each file, a DIV2K 0801x4 or a comic_x4 among them), or two or more after a
    # letter (a PAIR_TAG's owl_x2 or 0801x2 is no company): a lone fox2.png among other names would otherwise
    # pair with an HR named fo. Per folder: one evaluation may hold several benchmarks, each named its own way
    tags = {f: _loose_tag(f) for f in lr_files}
    shared, sizes = Counter((f.parent, t) for f, t in tags.items()), Counter(f.parent for f in lr_files)
    endings = Counter((f.parent, _x_ending(f)) for f in lr_files)
    pairs, taken = [], {}
    for lr in lr_files:
        name, stem = pair_name(lr, lr_root, strip=False), pair_name(lr, lr_root)
        tag = tags[lr]
        tagged = tag is not None and (shared[(lr.parent, tag)] >= 2 or endings[(lr.parent, tag)] == sizes[lr.parent])
        loose = pair_name(lr, lr_root, tag=LOOSE_TAG) if tagged else stem
        for found in ([hr_by_name[name]] if name in hr_by_name else [],
                      [hr_by_name[stem]] if stem in hr_by_name else [], hr_by_stem.get(stem, []),
                      [hr_by_name[loose]] if loose in hr_by_name else [], hr_by_stem.get(loose, [])):
            if found:
                break
        if len(found) > 1:
            raise DASRError(f"{lr}: pairs with {len(found)} HR images ({found[0].name}, {found[1].name}); "
                            "rename one")
        if not found:
            raise DASRError(f"{lr}: no HR partner in {hr_root} (pairs match by relative path, ignoring a tag such "
                            "as x4, _LR4, _HR)")
        if found[0] in taken:
            raise DASRError(f"{taken[found[0]]} and {lr}: two LR images pair with {found[0]}")
        taken[found[0]] = lr
        pairs.append((lr, found[0]))
    alone = [f for f in hr_files if f not in taken]
    if alone:
        raise DASRError(f"{len(alone)} HR image(s) without an LR partner, e.g. {alone[0]}")
    return sorted(pairs, key=lambda pair: pair_name(pair[1], hr_root, strip=False))


def pairs_from_lr_dir(lr_dir: str | Path) -> Pairs:
    """Real LR images alone (no HR): for no-reference scores. Read as dasr-sr reads them; level 0."""
    import degrade
    from degrade.discover import find_images

    files = find_images([lr_dir], what="LR images")

    def make() -> Iterator[Pair]:
        for f in files:
            yield 0, None, degrade.read_image(f), None

    return Pairs(len(files), make, image_names(files, Path(lr_dir)))


def pairs_from_lr_hr_dirs(lr_dir: str | Path, hr_dir: str | Path, scale: int = 4) -> Pairs:
    """Given LR/HR pairs (a real-world test set such as DRealSR, or LR made elsewhere), matched by name
    (match_pairs); every file must have its partner. Each HR must be `scale` x its LR, up to scale - 1 px
    more a side (cropped at the bottom/right, as mod-crop test sets are made). The pairs carry no v and
    no level (level 0). The LR is read as dasr-sr reads it; the HR on 8-bit levels."""
    import degrade
    from degrade.discover import find_images

    lr_root, hr_root = Path(lr_dir), Path(hr_dir)
    pairs = match_pairs(find_images([lr_root], what="LR images"), lr_root,
                        find_images([hr_root], what="HR images"), hr_root)

    def read(lr_file: Path, hr_file: Path) -> tuple[np.ndarray, np.ndarray]:
        lr, hr = degrade.read_image(lr_file), degrade.read_image(hr_file)
        (h, w), (hh, hw) = lr.shape[:2], hr.shape[:2]
        if not (scale * h <= hh < scale * (h + 1) and scale * w <= hw < scale * (w + 1)):
            raise DASRError(f"{hr_file}: {hw}x{hh} px is not {scale}x its LR {lr_file} ({w}x{h} px): expected "
                            f"{scale * w}x{scale * h}, or up to {scale - 1} px more a side")
        if scale * min(h, w) < MIN_HR_SIDE:
            raise DASRError(f"{lr_file}: {w}x{h} px is too small to evaluate: at least {MIN_HR_SIDE // scale} px "
                            "a side")
        return lr, to_uint8(hr[: scale * h, : scale * w]).astype(np.float32) / 255

    def make() -> Iterator[Pair]:
        for lr_file, hr_file in pairs:
            lr, hr = read(lr_file, hr_file)
            yield 0, hr, lr, None

    return Pairs(len(pairs), make, image_names([lr for lr, _ in pairs], lr_root))


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, pairs: Iterable[Pair], device: torch.device, *,
                   generator: torch.nn.Module | None = None, tile: int | None = DEFAULT_TILE,
                   lpips: torch.nn.Module | None = None, niqe_params: dict[str, np.ndarray] | None = None,
                   dtype: torch.dtype | None = None, channels_last: bool = False,
                   progress: Callable[[], None] | None = None,
                   on_image: Callable[[int, dict[str, Any], np.ndarray], None] | None = None) -> dict[str, Any]:
    """Scores per level of `model` (its predictor, and `generator` for SR when given, e.g. the trainer's
    EMA generator, else its own), computed as dasr-sr computes its output: v_hat and a from the whole LR
    at its own resolution, the experts fused once per image, tiles of at most `tile`
    LR px overlapping by G's receptive-field radius (the whole-image result), the fused generator in
    `dtype` and, with `channels_last`, that memory format (dasr-sr's --precision; see infer.fuse_experts).
    With `lpips` (dasr_model.lpips.LPIPS on `device`), also the LPIPS distance of SR and of bicubic to HR,
    on the whole 8-bit images (no crop, as LPIPS is usually reported). With `niqe_params`
    (dasr_model.niqe.load_niqe_params), the no-reference NIQE of SR and of bicubic (Y, 4-px crop). A pair
    whose HR is None (real LR alone) gets NIQE only. `progress()` is called after each pair, and
    `on_image(i, scores, sr)` with pair i's level and scores (the values the means are made of) and its SR
    image ((H, W, 3) float32 in [0, 1], what dasr-sr writes once rounded)."""
    scores: dict[int, dict[str, list[float]]] = {}
    counts: dict[int, int] = {}
    v_hats, vs, mixes, mix_levels = [], [], [], []
    gen = model.generator if generator is None else generator
    names = getattr(pairs, "names", None)
    at = ["reading the first image"]  # what an allocation failure names

    def score_all() -> None:  # (nested: the failure is raised once this call's tensors are freed)
        for index, (level, hr, lr, v) in enumerate(pairs):
            at[:] = [f"scoring {names[index] if names else f'pair {index}'} ({lr.shape[1]}x{lr.shape[0]} px LR)"]
            row: dict[str, Any] = {"level": level}
            lr_t = to_tensor(lr).to(device)
            v_hat, a = predict(model, lr_t, tile=tile)
            mixes.append(a.float().cpu())
            mix_levels.append(level)
            sr = to_image(super_resolve(model, lr_t, a, tile=tile, dtype=dtype, channels_last=channels_last,
                                        generator=gen))
            bic = to_image(F.interpolate(lr_t, scale_factor=4, mode="bicubic", align_corners=False))
            counts[level] = counts.get(level, 0) + 1
            s = scores.setdefault(level, {})

            def add(key: str, value: float) -> None:
                s.setdefault(key, []).append(value)
                row[key] = value

            # Y once per image (the 4-px crop PSNR, SSIM and NIQE all take), one at a time beside HR's
            y_hr = None if hr is None else cropped_y(hr, crop=CROP, like=sr)
            pair = []
            for prefix, out in (("", sr), ("bicubic_", bic)):
                y = cropped_y(out, crop=CROP)
                if y_hr is not None:
                    add(prefix + "psnr_y", psnr(y, y_hr))
                    add(prefix + "ssim_y", ssim(y, y_hr))
                if niqe_params is not None:
                    pair.append(_niqe_or_nan(y, niqe_params))
                del y
            del y_hr
            if hr is not None:
                add("psnr_rgb", psnr_rgb(sr, hr, crop=CROP))
                if lpips is not None:
                    hr_t = to_tensor(hr).to(device)
                    add("lpips", float(lpips(_levels(sr, device), hr_t)[0]))
                    add("bicubic_lpips", float(lpips(_levels(bic, device), hr_t)[0]))
            if niqe_params is not None:  # an image without a score for either is left out of both columns
                scored = all(math.isfinite(x) for x in pair)
                add("niqe", pair[0] if scored else math.nan)
                add("bicubic_niqe", pair[1] if scored else math.nan)
            elif hr is None:
                raise DASRError("an image without HR has no score but NIQE: give its parameters")
            if v is not None:
                v_hats.append(v_hat.cpu())
                vs.append(torch.from_numpy(np.asarray(v, np.float32))[None])
            if on_image is not None:
                on_image(index, row, sr)
            if progress is not None:
                progress()
            at[:] = [f"reading the image after {names[index] if names else f'pair {index}'}"]

    tiles = f"in LR tiles of {tile} px (a smaller --tile" if tile else "for the whole image at once (--tile"
    refuse_out_of_memory(score_all, device, lambda: f"{at[0]} {tiles} lowers the network's memory; the SR, HR and "
                         "bicubic images are held whole)")
    if not scores:
        raise DASRError("nothing to evaluate")
    levels = {str(lv): {"images": counts[lv], **{k: _mean(x) if k in NIQE_KEYS else float(np.mean(x))
                                                 for k, x in s.items()}}
              for lv, s in sorted(scores.items())}
    for s, out in zip((s for _, s in sorted(scores.items())), levels.values()):
        if "niqe" in s:  # the images NIQE scored, model and bicubic alike (too small or flat ones have none)
            out["niqe_images"] = int(np.isfinite(s["niqe"]).sum())
    mae = block_mae(torch.cat(v_hats), torch.cat(vs)) if vs else {}
    mixing = mixing_stats(torch.cat(mixes), torch.tensor(mix_levels))
    return {"levels": levels, "mae": mae, "mixing": mixing}


def _niqe_or_nan(y: np.ndarray, params: dict[str, np.ndarray]) -> float:
    """NIQE of an image's Y (metrics.cropped_y: BT.601 on 8-bit levels, 4-px crop), or NaN where it has no
    score (fewer than two textured 96-px blocks): such an image is left out of the level's mean, not the end
    of the run."""
    try:
        return niqe(y, params)
    except DASRError:
        return math.nan


NIQE_KEYS = ("niqe", "bicubic_niqe")  # NaN there means "no score" (any other NaN stays visible)


def _mean(values: list[float]) -> float:
    """The mean of the images NIQE could score (NaN where it scored none)."""
    finite = [x for x in values if not math.isnan(x)]
    return float(np.mean(finite)) if finite else math.nan


def _levels(img: np.ndarray, device: torch.device) -> torch.Tensor:
    """An (H, W, 3) image in [0, 1] rounded to 8-bit levels, as the other scores see it, as (1, 3, H, W)."""
    return to_tensor((np.round(np.clip(img, 0, 1) * 255) / 255).astype(np.float32)).to(device)
