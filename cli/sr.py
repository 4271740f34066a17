"""`dasr-sr` (super-resolve images, steer through v), `dasr-eval` (score a model per level) and
`dasr-export` (a small model file to hand on): thin shells over dasr_model.infer / evaluate."""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import click
from click.core import ParameterSource
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli.common import (
    max_pixels_option,
    one_line,
    os_error,
    parse_levels,
    require_torch,
    set_max_pixels,
    shown,
    sigterm_as_exit,
    text_console,
)
from degrade._version import __version__
from degrade.errors import DegradeError
from degrade.io import check_can_write, make_folders, real_path, write_bytes_atomic, write_image

console = text_console()
err_console = text_console(stderr=True)
# write errors that every image's output would meet: dasr-sr stops at the first (others skip that image)
FOLDER_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
SETTINGS = {"help_option_names": ["-h", "--help"]}
# dasr-sr's finished images waiting for a writer thread, at most, in bytes (one larger image waits for every
# write before it and then goes alone: the sequential way's memory)
WRITE_AHEAD_BYTES = 1 << 30
MODEL_HELP = "A model file (dasr-export), a dasr-train checkpoint (ckpt-*.pt), or a run folder (its newest checkpoint)."


def _load(model_path: Path | None, release: tuple[Path, Path] | None, device: str):
    """(model on its device, device), saying what was loaded."""
    from dasr_model.infer import load_model
    from dasr_model.runs import pick_device

    dev = pick_device(device)
    loaded = load_model(model_path, tuple(release) if release else None,
                        warn=lambda m: err_console.print(f"warning: {m}"))
    err_console.print(loaded.describe(), soft_wrap=True)
    return loaded.model.to(dev), dev


def _one_model(model_path: Path | None, checkpoint: Path | None) -> Path | None:
    if model_path is not None and checkpoint is not None:
        raise click.UsageError("give --model (or its older name --checkpoint), not both")
    return model_path or checkpoint


OUTPUT_NAME = re.compile(r".+_x[0-9]+(\.[0-9]+)?\.png")  # NAME_x4.png, NAME_x2.5.png: what dasr-sr writes


def _inputs(inputs: tuple[Path, ...], out_dir: Path) -> list[Path]:
    """The images to upscale: files as given, folders searched, each file once, but not this tool's own
    outputs (NAME_x4.png, or at any other --outscale) found in OUT_DIR by a folder search (an output folder
    inside an input folder would feed them back in)."""
    from degrade.discover import find_images

    given = {real_path(p) for p in inputs if not p.is_dir()}
    out = real_path(out_dir)
    found = {}  # one path named twice (a.png and ./a.png, or given and found in a folder): upscaled once (a
    for f in find_images(inputs):  # link is a name of its own, with an output of its own)
        found.setdefault(os.path.abspath(f), f)
    files = [f for f in found.values() if real_path(f) in given
             or not (OUTPUT_NAME.fullmatch(f.name) and real_path(f).parent == out)]
    if not files:
        raise click.ClickException(f"no input images besides this tool's own outputs in {out_dir}")
    return files


class OrderedWriters:
    """Jobs (an output's finishing and writing) on `threads` threads while the caller goes on to the next
    image: encoding a x4 PNG takes longer than the network on a GPU (0.15-0.23 s for 2048 x 2048 px, against
    some 11 ms for the network at LR 512 on an H200). `report(key, result)` gets each job's result in the
    order the jobs were given, in the caller's thread, as soon as it and every job before it are done (each
    `submit` reports what is done first), so messages and the progress bar keep up; an exception a job raises
    is raised there, with its traceback, and the jobs not yet started then do nothing (a full disk stops the
    run at the next image). In flight at most 2 x `threads` jobs and `budget` bytes (each job's estimate); a
    larger job waits for all before it and is done before `submit` returns, as in the sequential way. An
    exception of the caller's own (or Ctrl-C) lets the jobs given finish first: their images are upscaled
    already. threads 0: each job at once in the caller's thread (the sequential way)."""

    def __init__(self, threads: int, report: Callable[[object, object], None], budget: int = WRITE_AHEAD_BYTES):
        self.threads, self.report, self.budget = threads, report, budget
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="dasr-sr-write") if threads else None
        self.pending: collections.deque[tuple[object, int, Future]] = collections.deque()
        self.held = 0
        self.job_failed = False

    def submit(self, key: object, nbytes: int, job: Callable[[], object]) -> None:
        if self.pool is None:
            self.report(key, job())
            return
        while self.pending and self.pending[0][2].done():  # what is done: reported now, not jobs later
            self._collect()
        while self.pending and (len(self.pending) >= 2 * self.threads or self.held + nbytes > self.budget):
            self._collect()
        self.pending.append((key, nbytes, self.pool.submit(self._run, job)))
        self.held += nbytes
        while self.held > self.budget:  # a job over the budget alone: done before the caller goes on
            self._collect()

    def drain(self) -> None:
        while self.pending:
            self._collect()

    def _run(self, job: Callable[[], object]) -> object:  # on a writer thread
        if self.job_failed:  # after a failed job (a full disk): the next would fail alike, and go unreported
            return None
        try:
            return job()
        except BaseException:
            self.job_failed = True
            raise

    def _collect(self) -> None:
        key, nbytes, future = self.pending.popleft()
        self.held -= nbytes
        self.report(key, future.result())  # a job's exception: raised here, the jobs after it not reported

    def __enter__(self) -> OrderedWriters:
        return self

    def __exit__(self, *exc) -> None:  # the writes under way end (each file is atomic); queued ones too, unless
        if self.pool is not None:  # a job failed (a full disk: the next would fail alike; they do nothing then)
            self.pool.shutdown(wait=True, cancel_futures=self.job_failed)


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=err_console, transient=True)


def _parse_mix(text: str | None, experts: int):
    import torch

    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint="--mix") from None
    if not all(math.isfinite(x) for x in values):
        raise click.BadParameter(f"{text!r}: every coefficient must be a finite number", param_hint="--mix")
    if len(values) != experts:
        raise click.BadParameter(f"the model has {experts} experts: --mix needs {experts} values, got {len(values)}",
                                 param_hint="--mix")
    return torch.tensor([values])


def _tile(ctx, param, value: int) -> int | None:
    if value == 0:
        return None
    if value < MIN_TILE:
        raise click.BadParameter(f"{value}: at least {MIN_TILE} LR px (tiles overlap by the network's receptive "
                                 "field, 35 px for the full model), or 0 for the whole image at once",
                                 param_hint="--tile")
    return value


MIN_TILE = 64
tile_option = click.option(
    "--tile", type=int, default=512, show_default=True, callback=_tile,  # dasr_model.infer.DEFAULT_TILE
    help="LR tile side: larger images are processed in tiles overlapping by the network's receptive field, "
         "which gives the whole-image result with memory that follows the tile. 0: the whole image at once.")


def model_options(f):
    f = click.option("--release-weights", nargs=2, type=click.Path(path_type=Path), metavar="G.pth P.pth",
                     help="The released G and P weights instead of --model.")(f)
    f = click.option("--checkpoint", "checkpoint", type=click.Path(path_type=Path), hidden=True)(f)  # older name
    return click.option("--model", "model_path", type=click.Path(path_type=Path), help=MODEL_HELP)(f)


def gpu_has_bf16(device) -> bool:
    """Whether the CUDA `device` computes bf16 in hardware (NVIDIA: compute capability 8.0 or newer), not
    emulated through float32."""
    import torch

    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3: no emulation, no such argument
            return torch.cuda.is_bf16_supported()


def precision_kwargs(precision: str, device) -> dict:
    """dasr-sr's --precision as upscale() keywords: bf16 (channels_last on CUDA) or float32 ({}). auto is
    bf16 on a CUDA GPU with bf16 tensor cores, where it was measured faithful (PSNR-Y within 0.008 dB of
    float32's, mean -0.0008 dB, on the bundled photos with a trained model, H200) at half the network's
    memory, and float32 elsewhere (older GPUs and CPUs without bf16 units run it far slower)."""
    import torch

    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and gpu_has_bf16(device) else "fp32"
    return {"dtype": torch.bfloat16, "channels_last": device.type == "cuda"} if precision == "bf16" else {}


precision_option = click.option(
    "--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
    help="The fused generator's precision; auto: bf16 on a CUDA GPU with bf16 tensor cores (compute capability "
         "8.0 or newer; measured within 0.01 dB of fp32 there, at half the memory), fp32 elsewhere. bf16 on a GPU "
         "is also channels_last; the predictor and the bilinear base stay fp32.")


@click.command("dasr-sr", context_settings=SETTINGS)
@click.version_option(__version__, prog_name="dasr-sr")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@model_options
@click.option("--device", default="auto", show_default=True)
@tile_option
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="Override a field of the predicted v in physical units, e.g. --set noise1.type=gaussian "
                   "--set noise1.strength=5 (sigma, of 255).")
@click.option("--mix", help="Set the expert coefficients a directly: a0,a1,...")
@click.option("--print-v", is_flag=True,
              help="Print each image's v, decoded: the predicted one, edited by any --set (which the mix is made "
                   "from; with --mix, the mix given replaces it), shown clamped to [0, 1].")
@precision_option
@click.option("--outscale", type=click.FloatRange(1, 16), default=4.0, show_default=True,
              help="The output's scale: the x4 result resized (area averaging below 4, Lanczos above); "
                   "outputs are named NAME_x{scale}.png.")
@click.option("--write-threads", type=click.IntRange(0, 64), default=None,
              help="Threads that finish and write the outputs (PNG encoding, --outscale's resize) while the next "
                   "image is upscaled; 0: one after another. Default: half the usable cores, 1 to 4.")
@max_pixels_option
def sr_main(inputs, out_dir, model_path, checkpoint, release_weights, device, tile, settings, mix, print_v,
            precision, outscale, write_threads, max_pixels) -> None:
    """Super-resolve INPUT images or folders x4 (or --outscale) into OUT_DIR as PNG; an alpha channel is
    kept (upscaled bicubic).

    A file that cannot be read or upscaled, or whose output cannot be written, is reported and skipped;
    the exit status is then 1. A full disk or a read-only folder stops the run.
    """
    require_torch()
    set_max_pixels(max_pixels)
    import cv2

    import degrade
    from dasr_model.infer import finish, out_of_memory, output_size, parse_settings, upscale
    from degrade.inspect import pipeline_steps
    from degrade.io import read_image_alpha
    from degrade.shards.executor import usable_cores

    if not math.isfinite(outscale):  # click's FloatRange lets nan through
        raise click.BadParameter(f"{outscale}: not a number from 1 to 16", param_hint="--outscale")
    suffix = f"_x{outscale:.10g}.png"

    if mix is not None and settings:
        raise click.UsageError("--set edits v, which only chooses the expert mix; --mix sets the mix directly: "
                               "give one of them")
    failed = []
    restore = sigterm_as_exit()  # a scheduler's stop ends the run as Ctrl-C does: no partial file left
    try:
        files = _inputs(inputs, out_dir)
        names: dict[str, Path] = {}
        given = {real_path(f) for f in files}
        for f in files:  # NAME_x4.png: two inputs with one stem would silently overwrite each other
            other = names.setdefault(f"{f.stem}{suffix}", f)
            if other != f:
                raise click.ClickException(f"{other} and {f} would both be written as {f.stem}{suffix}; "
                                           "give them separately with different --out folders")
            if real_path(out_dir / f"{f.stem}{suffix}") in given:  # overwritten, then upscaled itself
                raise click.ClickException(f"{f}'s output would overwrite the input {out_dir / (f.stem + suffix)}; "
                                           "write to another --out folder")
        overrides = parse_settings(list(settings))
        model, dev = _load(_one_model(model_path, checkpoint), release_weights, device)
        a_fixed = _parse_mix(mix, model.config.num_experts)
        fast = precision_kwargs(precision, dev)
        out_dir.mkdir(parents=True, exist_ok=True)
        threads = min(4, max(1, usable_cores() // 2)) if write_threads is None else write_threads

        def skipped(f: Path, text: str) -> str:
            return f"skipped {text if text.startswith(shown(f)) else f'{shown(f)}: {text}'}"

        def save(f: Path, sr, alpha, said: list[str]) -> tuple[str | None, list[str]]:
            """On a writer thread: (None, the lines to print once written: --print-v's), or (the line saying
            why not, [])."""
            try:
                out = finish(sr, alpha, outscale)
            except DegradeError as exc:
                return skipped(f, one_line(exc)), []
            except (MemoryError, cv2.error) as exc:  # the output --outscale makes: that image's, as upscale's is
                if not out_of_memory(exc):
                    raise
                return f"skipped {shown(f)}: out of memory making its x{outscale:g} output", []
            try:
                degrade.write_image(out_dir / f"{f.stem}{suffix}", out)
            except (DegradeError, OSError) as exc:  # this image's output: a name too long, a folder there
                if isinstance(exc, OSError) and exc.errno in FOLDER_ERRORS:  # every image's: stop
                    raise
                return f"skipped {shown(f)}: not written: {one_line(exc)}", []
            except (MemoryError, cv2.error) as exc:
                if not out_of_memory(exc):
                    raise
                return f"skipped {shown(f)}: not written: out of memory encoding it", []
            return None, said

        with _bar() as bar:
            task = bar.add_task("super-resolving", total=len(files))
            parts = bar.add_task("  its tiles", total=1, visible=False)  # while an image takes several tiles

            def on_tile(done: int, total: int) -> None:
                bar.update(parts, completed=done, total=total, visible=total > 1 and done < total)

            def saved(f: Path, result: tuple[str | None, list[str]]) -> None:  # in the inputs' order, here
                why, said = result
                if why is not None:
                    failed.append(f)
                    err_console.print(why)
                for line in said:
                    console.print(line, soft_wrap=True)
                bar.advance(task)

            with OrderedWriters(threads, saved) as writers:
                for f in files:
                    why = None
                    try:
                        img, alpha = read_image_alpha(f)
                        output_size(img.shape[0], img.shape[1], outscale)  # refused before the work, not after
                        # --set values are checked against each image's own v (a noise strength's range
                        # follows the predicted noise type): a refusal is that image's
                        sr, v_hat = upscale(model, img, overrides=overrides, mix=a_fixed, tile=tile, device=dev,
                                            on_tile=on_tile, **fast)
                        del img
                    except (DegradeError, OSError) as exc:
                        why = skipped(f, one_line(exc))
                    except (MemoryError, cv2.error) as exc:  # reading it (upscale turns its own into a refusal)
                        if not out_of_memory(exc):
                            raise
                        why = skipped(f, "out of memory reading it")
                    if why is not None:  # (out of the except block: its exception is no job's context)
                        writers.submit(f, 0, functools.partial(lambda line: (line, []), why))  # reported in turn
                        continue
                    said = []
                    if print_v:
                        v = v_hat[0].clamp(0, 1).cpu().numpy()
                        said = [f"{f.name}: v = " + ",".join(f"{x:.3f}" for x in v),
                                f"  reads as: {' -> '.join(pipeline_steps(degrade.decode(v)))}"]
                    # what the job holds: the x4 image, its alpha, and the output --outscale makes of them
                    nbytes = (sr.nbytes + (0 if alpha is None else alpha.nbytes)) * (1 + max(1.0, outscale / 4) ** 2)
                    writers.submit(f, int(nbytes), functools.partial(save, f, sr, alpha, said))
                    del sr, alpha
                writers.drain()
    except DegradeError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error(exc)) from None
    finally:
        restore()
    err_console.print(f"wrote {len(files) - len(failed)} image(s) to {out_dir}")
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(files)} input(s) could not be read, upscaled or written "
                                   "(listed above)")


@click.command("dasr-eval", context_settings=SETTINGS)
@click.version_option(__version__, prog_name="dasr-eval")
@model_options
@click.option("--shards", type=click.Path(path_type=Path), help="Evaluate on a dataset's (HR, LR, v) samples.")
@click.option("--hr-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Degrade these HR images at each --levels with fixed seeds and evaluate (or, with --lr-dir, "
                   "their given LR partners).")
@click.option("--lr-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Evaluate on these given LR images (a real-world test set): with --hr-dir each paired with the "
                   "HR of its name (ignoring a tag such as x4, _LR4, _HR); alone, no-reference NIQE only.")
@click.option("--testset", type=click.Path(path_type=Path, file_okay=False),
              help="Evaluate on a saved test set (degrade make-testset): its levels (or those of --levels), "
                   "the numbers --hr-dir gives on its HR folder and seed.")
@click.option("--levels", default="1,2,3", show_default=True,
              help="With --hr-dir: the levels to degrade at; with --testset: the set's levels to score.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --hr-dir: the draw of each image's degradations (image i at level L: seed, i, L).")
@click.option("--device", default="auto", show_default=True)
@tile_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (no tables).")
@click.option("--per-image", "per_image", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write each image's scores to this CSV file (level, name, then one column per score).")
@click.option("--save-sr", "save_sr", type=click.Path(path_type=Path, file_okay=False),
              help="Also save each SR image scored, as DIR/level{L}/NAME.png (DIR/NAME.png for given LR "
                   "images): the bytes dasr-sr writes for that LR (RGB: an alpha channel is not scored). DIR "
                   "must be new or an empty folder.")
@click.option("--lpips-alexnet", type=click.Path(path_type=Path, dir_okay=False),
              help="With --lpips-lin: also LPIPS (v0.1, AlexNet). torchvision's AlexNet ImageNet weights file "
                   "(alexnet-owt-7be5be79.pth); nothing is downloaded.")
@click.option("--lpips-lin", type=click.Path(path_type=Path, dir_okay=False),
              help="With --lpips-alexnet: LPIPS's AlexNet linear layers (the lpips package's weights/v0.1/alex.pth).")
@click.option("--niqe-params", type=click.Path(path_type=Path, dir_okay=False),
              help="Also NIQE (no reference; lower: more natural): the pristine model's .npz (BasicSR's "
                   "niqe_pris_params.npz); nothing is downloaded.")
@precision_option
@max_pixels_option
@click.pass_context
def eval_main(ctx, model_path, checkpoint, release_weights, shards, hr_dir, lr_dir, testset, levels, seed, device,
              tile, as_json, per_image, save_sr, lpips_alexnet, lpips_lin, niqe_params, precision,
              max_pixels) -> None:
    """PSNR/SSIM on Y (4-px crop) and RGB PSNR per level, for the model and bicubic; predictor MAE per block;
    LPIPS and NIQE when given their files. Given LR/HR pairs (--lr-dir with --hr-dir) have no level: they are
    reported as level 0; so are real LR images alone (--lr-dir with --niqe-params), scored by NIQE only."""
    require_torch()
    set_max_pixels(max_pixels)
    from dasr_model.evaluate import (
        evaluate_pairs,
        pairs_from_hr_dir,
        pairs_from_lr_dir,
        pairs_from_lr_hr_dirs,
        pairs_from_shards,
        pairs_from_testset,
        sharpened_note,
    )
    from dasr_model.lpips import LPIPS
    from dasr_model.niqe import load_niqe_params

    sources = sum(x is not None for x in (shards, hr_dir or lr_dir, testset))
    if sources != 1:  # (--hr-dir with --lr-dir is one: given pairs)
        hint = ", one of them (--hr-dir with --lr-dir: given pairs)" if sources else ""
        raise click.UsageError("give --shards, --hr-dir, --lr-dir or --testset" + hint)
    if lr_dir is not None and hr_dir is None and niqe_params is None:
        raise click.UsageError("--lr-dir alone has nothing to compare with: add --hr-dir (PSNR, SSIM) or "
                               "--niqe-params (no-reference NIQE)")
    if lr_dir is not None and hr_dir is None and lpips_alexnet is not None:
        raise click.UsageError("LPIPS compares with an HR image: --lr-dir alone has none")
    given = [p for p in ("levels", "seed") if ctx.get_parameter_source(p) is not ParameterSource.DEFAULT]
    held = {"--lr-dir": lr_dir, "--shards": shards, "--testset": testset}
    for option, value in held.items():  # their LR images are given: nothing is drawn
        refused = [f"--{p}" for p in given if value is not None and not (option == "--testset" and p == "levels")]
        if refused:
            raise click.UsageError(f"{' and '.join(refused)} {'choose' if len(refused) > 1 else 'chooses'} how "
                                   f"--hr-dir is degraded; with {option} the LR images are given")
    if (lpips_alexnet is None) != (lpips_lin is None):
        raise click.UsageError("LPIPS needs both --lpips-alexnet and --lpips-lin")
    lv = parse_levels(levels)
    if save_sr is not None:  # the images written must never land on the ones read, nor inside a test set
        from degrade.testset import enclosing_testset

        target = real_path(save_sr)
        for source in (x for x in (shards, hr_dir, lr_dir, testset) if x is not None):
            if target == real_path(source) or real_path(source) in target.parents:
                raise click.UsageError(f"--save-sr {save_sr} lies inside {source}: the images read would be mixed "
                                       "with the ones written; save them elsewhere")
        if (kept := enclosing_testset(save_sr)) is not None:
            raise click.UsageError(f"--save-sr {save_sr} lies inside the test set {kept}: the SR images would be "
                                   "mixed with its files, and could overwrite its HR or LR images; save them "
                                   "elsewhere")
        _check_save_sr(save_sr)
    if per_image is not None:
        _check_per_image(per_image, (model_path, checkpoint, *(release_weights or ()), lpips_alexnet, lpips_lin,
                                     niqe_params, shards, hr_dir, lr_dir, testset))
    rows: list[dict] = []
    saved: list[Path] = []  # --save-sr's images and the folders made for them: a run that fails takes them back
    made: list[Path] = []

    def on_image(index: int, scores: dict, sr) -> None:  # pairs: the evaluation's, named
        name = pairs.names[index]
        if per_image is not None:
            rows.append({"level": scores["level"], "name": name, **{k: v for k, v in scores.items() if k != "level"}})
        if save_sr is not None:
            path = save_sr / (f"level{scores['level']}" if scores["level"] else "") / f"{name}.png"
            made.extend(make_folders(path.parent))
            write_image(path, sr)
            saved.append(path)
    done, claim = False, None
    restore = sigterm_as_exit()  # a scheduler's stop takes the saved images back, as Ctrl-C does
    try:
        if save_sr is not None:  # DIR claimed for this run alone, before any work (another run is refused)
            made.extend(make_folders(save_sr))
            claim = _claim_save_sr(save_sr)
            saved.append(claim)
        model, dev = _load(_one_model(model_path, checkpoint), release_weights, device)
        lpips = LPIPS(lpips_alexnet, lpips_lin).to(dev) if lpips_alexnet is not None else None
        niqe = load_niqe_params(niqe_params) if niqe_params is not None else None
        if shards is not None:
            pairs = pairs_from_shards(shards)
            if pairs.sharpen_hr:  # as dasr-train notes it of a validation set: the scores are not real images'
                err_console.print(sharpened_note(f"the dataset {shards}"), soft_wrap=True)
        elif lr_dir is not None and hr_dir is None:
            pairs = pairs_from_lr_dir(lr_dir)
        elif lr_dir is not None:
            pairs = pairs_from_lr_hr_dirs(lr_dir, hr_dir, model.config.scale)
        elif testset is not None:
            pairs = pairs_from_testset(testset, lv if "levels" in given else None)
        else:
            pairs = pairs_from_hr_dir(hr_dir, lv, seed)
        if save_sr is not None:
            _check_saved_paths(pairs.names)
        with _bar() as bar:
            task = bar.add_task("evaluating", total=len(pairs))
            result = evaluate_pairs(model, pairs, dev, tile=tile, lpips=lpips, niqe_params=niqe,
                                    **precision_kwargs(precision, dev), progress=lambda: bar.advance(task),
                                    on_image=on_image if per_image is not None or save_sr is not None else None)
        if lr_dir is not None and hr_dir is None and not any(r.get("niqe_images") for r in result["levels"].values()):
            # NIQE is all this run measures: none of it is not a result (too small or flat images have no score)
            raise DegradeError(f"NIQE could score none of the {len(pairs)} image(s) in {lr_dir}: each needs two "
                               "textured 96 x 96 blocks at least (the SR image, x4 of the LR)")
        if per_image is not None:  # last: a failed run writes no CSV (an earlier one at that path stays)
            _write_csv(per_image, rows)
        done = True
    except DegradeError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error(exc)) from None
    finally:
        restore()
        if not done:  # a refusal, an error, Ctrl-C, SIGTERM: the SR images saved so far are no run's result
            _take_back(saved, made)
        elif claim is not None:  # the run's images stay; its claim goes
            _take_back([claim], [])
    if as_json:  # strict JSON: an infinite PSNR (SR equal to HR) is null, as JSON has no Infinity
        click.echo(json.dumps(_finite_or_null(result), indent=1, allow_nan=False))
        return
    if hr_dir is not None or shards is not None or testset is not None:
        table = Table(title="evaluation (Y: BT.601, 4-px crop)", title_justify="left")
        for name in ("level", "images", "PSNR-Y", "SSIM-Y", "PSNR-RGB", "bicubic PSNR-Y", "bicubic SSIM-Y"):
            table.add_column(name, justify="right")
        for level, r in result["levels"].items():
            table.add_row(_label(level), str(r["images"]), f"{r['psnr_y']:.2f}", f"{r['ssim_y']:.4f}",
                          f"{r['psnr_rgb']:.2f}", f"{r['bicubic_psnr_y']:.2f}", f"{r['bicubic_ssim_y']:.4f}")
        console.print(table)
    for key, title in (("lpips", "LPIPS (lower: closer)"), ("niqe", "NIQE (no reference; lower: more natural)")):
        if any(key in r for r in result["levels"].values()):  # tables of their own: 80 characters hold no more
            table = Table(title=title, title_justify="left")
            for name in ("level", "images", key.upper(), f"bicubic {key.upper()}"):
                table.add_column(name, justify="right")
            for level, r in result["levels"].items():  # NIQE's count: the images it could score
                table.add_row(_label(level), str(r.get(f"{key}_images", r["images"])),
                              *(f"{r[k]:.4f}" if math.isfinite(r[k]) else "-" for k in (key, "bicubic_" + key)))
            console.print(table)
    console.print("predictor MAE: " + (", ".join(f"{k} {v:.4f}" for k, v in result["mae"].items())
                                       or "none (the pairs carry no true v)"))
    mix = result["mixing"]
    console.print(f"expert mix a: std over images {mix['std']:.4f} (within a level {mix['std_within_level']:.4f}), "
                  f"between level means {mix['between_level']:.4f}")
    for level, mean in mix["mean_by_level"].items():
        console.print(f"  {'level ' + level if level != '0' else 'given images'} mean a: "
                      + " ".join(f"{x:.3f}" for x in mean))


def _check_per_image(path: Path, reads: tuple) -> None:
    """--per-image: its folder must exist; it must be none of the files or folders the evaluation reads
    (`reads`: the model or its run folder, the LPIPS or NIQE weights, the data), and inside one of those
    folders it must be a .csv, which no reader there takes (a test set's manifest, an input image, a run's
    checkpoint or metrics were overwritten)."""
    try:  # what the CSV's write would refuse (a missing or read-only folder, a FIFO): now, not after the evaluation
        check_can_write(path)
    except DegradeError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error(exc)) from None
    target = real_path(path)
    for given in (p for p in reads if p is not None):
        where = real_path(given)
        if target == where:
            raise click.UsageError(f"--per-image {path} is {given}, which the evaluation reads; write it elsewhere")
        if where in target.parents and path.suffix.lower() != ".csv":
            raise click.UsageError(f"--per-image {path} lies inside {given}, which the evaluation reads: name it "
                                   "*.csv, or write it elsewhere")


def _check_save_sr(path: Path) -> None:
    """--save-sr DIR must be new or an empty folder, as make-testset's OUT: the SR images an earlier run left
    there (another model's, or levels this run does not score) would lie beside this run's with nothing to
    tell them apart. An empty DIR is what it is, so no image of this run can land in a folder it reads
    (DIR itself lies in none: checked before)."""
    if path.is_symlink() and not path.exists():
        raise click.ClickException(f"--save-sr {path}: a symbolic link to nothing; the SR images are saved into a "
                                   "new or empty folder")
    if not path.exists():
        return
    if not path.is_dir():
        raise click.ClickException(f"--save-sr {path}: exists and is not a folder; the SR images are saved into a "
                                   "new or empty one")
    try:
        other = next(path.iterdir(), None)
    except OSError as exc:
        raise click.ClickException(os_error(exc)) from None
    if other is not None:
        raise click.ClickException(f"--save-sr {path}: exists and is not an empty folder (it holds {other.name}); "
                                   "the SR images are saved into a new or empty one, so that no earlier run's "
                                   "image is taken for this run's")


SAVE_SR_CLAIM = ".dasr-eval.writing"  # in a --save-sr DIR while a run writes into it


def _claim_save_sr(path: Path) -> Path:
    """Claim the new or empty folder `path` for this run: its marker file, made exclusively, so that of two
    runs given the same DIR (each found it empty) one writes and the other is refused; then DIR must hold
    the marker alone (a run that claimed it, wrote and ended meanwhile left its images). Returns the marker,
    which the run removes when it ends (with its images too, if it failed)."""
    marker = path / SAVE_SR_CLAIM
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        raise click.ClickException(f"--save-sr {path}: another dasr-eval is writing into it (or one that was "
                                   f"killed left {SAVE_SR_CLAIM} there); save into a new or empty folder") from None
    except OSError as exc:
        raise click.ClickException(os_error(exc)) from None
    other = next((p for p in path.iterdir() if p.name != SAVE_SR_CLAIM), None)
    if other is not None:
        marker.unlink()
        raise click.ClickException(f"--save-sr {path}: exists and is not an empty folder (it holds {other.name}, "
                                   "written since this run looked); save into a new or empty one")
    return marker


def _take_back(files: list[Path], folders: list[Path]) -> None:
    """Remove `files` and then `folders` (those this run made; deepest first, each only if empty: one that
    another process put something in meanwhile stays), what a failed dasr-eval saved; a file or folder
    that will not go is left."""
    for f in files:
        with contextlib.suppress(OSError):
            f.unlink()
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _check_saved_paths(names: list[str]) -> None:
    """--save-sr writes NAME.png per pair: refuse, before evaluating, a name whose file would be another's
    folder (x.jpg and x.png/y.png give x.png and x.png/y.png)."""
    files = {f"{n}.png" for n in names}
    for n in names:
        parent = str(Path(n).parent)
        while parent not in (".", ""):
            if parent in files:
                raise DegradeError(f"--save-sr: {parent} would be both an SR image and the folder of {n}.png; "
                                   "rename one of the images")
            parent = str(Path(parent).parent)


def _label(level: str) -> str:
    """A level's name in the tables: given pairs and real LR images have none ("0" in the JSON)."""
    return "given" if level == "0" else level


def _write_csv(path: Path, rows: list[dict]) -> None:
    """The per-image rows as CSV (a score an image has not, or NaN, is an empty cell), written atomically; UTF-8,
    but for a file name that is not (its bytes as they are)."""
    import csv
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    out = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    out.writeheader()
    for row in rows:
        out.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
    # an image name that is not UTF-8 (bytes Python holds as surrogates) is written as the bytes it is
    write_bytes_atomic(path, buf.getvalue().encode("utf-8", "surrogateescape"))


def _finite_or_null(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_null(v) for v in x]
    return x


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@click.command("dasr-export", context_settings=SETTINGS)
@click.version_option(__version__, prog_name="dasr-export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The model file to write (.safetensors).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bf16", show_default=True,
              help="Precision of the stored weights (they are read back as float32).")
def export_main(source, out_file, dtype) -> None:
    """Write the model of SOURCE (a checkpoint, or a run folder: its newest checkpoint) as a small model file:
    predictor + EMA generator + config, safetensors format (no pickle), for dasr-sr / dasr-eval --model."""
    require_torch()
    import torch

    from dasr_model.infer import export_model

    if out_file.suffix != ".safetensors":
        raise click.BadParameter(f"{out_file}: the model file's name must end in .safetensors", param_hint="-o")
    try:
        loaded = export_model(source, out_file, dtype=getattr(torch, DTYPES[dtype]),
                              warn=lambda m: err_console.print(f"warning: {m}"))
    except DegradeError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error(exc)) from None
    err_console.print(loaded.describe(), soft_wrap=True)
    err_console.print(f"wrote {out_file} ({out_file.stat().st_size / 2**20:.1f} MiB, {dtype})")


if __name__ == "__main__":
    sys.exit(sr_main())
