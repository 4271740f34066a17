"""`degrade`: the command-line face of the degradation library.

Commands are thin: they parse options, call the library, and report with rich. Errors a user can
cause (bad files, bad options) end as one line on stderr and exit status 1 (click: 2 for usage).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np
from click.core import ParameterSource
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

import degrade
from cli.common import max_pixels_option, one_line, parse_levels, set_max_pixels, shown, sigterm_as_exit, text_console
from degrade.allocator import tune_allocator
from degrade.errors import DegradeError
from degrade.io import (
    LOSSLESS_SUFFIXES,
    ImageError,
    atomic_writer,
    check_can_write,
    crop_to_multiple,
    encode_image,
    read_regular_file,
    real_path,
)
from degrade.recipe import MIN_HR_SIDE, describe_levels
from degrade.shards.format import COMPRESSIONS, MAX_COUNT, MAX_SHARDS

console = text_console()
PIPED_WIDTH = 400  # columns a table may take when stdout is not a terminal (it is drawn at its natural width)
SAMPLES_PER_JOB = 500  # make-dataset's automatic --jobs: one worker process per this many samples
SHOW_SKIPPED = 20  # make-dataset names at most this many sources skipped as too small
DEFAULT_DATASET = Path("degrade-dataset")  # make-dataset's --out, and what inspect looks at by default
err_console = text_console(stderr=True)


class LevelType(click.ParamType):
    name = "level"

    def convert(self, value, param, ctx):
        try:
            return degrade.parse_level(value)
        except DegradeError as exc:
            self.fail(str(exc), param, ctx)


PARAMS_FILE_BYTES = 1 << 20  # a parameter record is about 600 bytes


def _number(item: str) -> float:
    """One --vector entry as a float; the only ValueError caught is float()'s own, on the user's text."""
    try:
        return float(item)
    except ValueError:
        raise DegradeError(f"--vector: {item!r} is not a number") from None


def parse_vector(text: str) -> np.ndarray:
    """'v0,v1,...,v32' (commas and/or spaces, optional brackets) -> a checked (33,) vector."""
    values = [_number(t) for t in text.replace("[", " ").replace("]", " ").replace(",", " ").split()]
    try:
        return degrade.vector.check_vector(values)
    except DegradeError as exc:  # only the library's refusals: anything else is a bug and keeps its traceback
        raise DegradeError(f"--vector: {exc}") from None


def decode_vector(text: str, noise_seed: int = 0) -> degrade.DegradationParams:
    v = parse_vector(text)
    try:
        return degrade.decode(v, noise_seed=noise_seed)
    except DegradeError as exc:
        raise DegradeError(f"--vector: {exc}") from None


def auto_jobs(count: int) -> int:
    """make-dataset's default --jobs: worker processes pay off only when each has enough samples to make
    (measured on 2 cores: --jobs 2 took 1.11-1.15x as long as --jobs 1 for 256 samples, 0.77-0.85x for 1000)."""
    return max(1, min(os.cpu_count() or 1, count // SAMPLES_PER_JOB))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return real_path(a) == real_path(b) or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(degrade.__version__, prog_name="degrade")
def main() -> None:
    """Synthesise realistic low-resolution images with labelled DASR degradations."""
    tune_allocator()


@main.command()
def levels() -> None:
    """Print the degradation space: the level recipes (docs/degradation.md), from the code."""
    header, rows, notes = describe_levels()
    table = Table(title="degradation levels (DASR ranges)", title_justify="left")
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for note in notes:
        console.print(f"- {note}", soft_wrap=True)


@main.command()
@click.argument("image", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="LR image to write (PNG).")
@click.option("--level", type=LevelType(), default="2", show_default=True, help="1, 2, 3 or mix.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the parameter draw.")
@click.option("--params-out", type=click.Path(path_type=Path), help="Write the parameter record (JSON) here.")
@click.option("--params", "params_in", type=click.Path(path_type=Path), help="Replay a recorded parameter JSON.")
@click.option("--vector", help='Replay a 33-value vector "v0,v1,...,v32" (decoded, see docs).')
@click.option("--noise-seed", type=click.IntRange(0, 2**53 - 1), default=0, show_default=True,
              help="Noise seed for --vector replays.")
@max_pixels_option
@click.pass_context
def apply(ctx: click.Context, image: Path | None, output: Path, level, seed: int, params_out: Path | None,
          params_in: Path | None, vector: str | None, noise_seed: int, max_pixels: int | None) -> None:
    """Degrade IMAGE (default: a bundled sample photo) to a x4-smaller LR image.

    Parameters are drawn at --level with --seed, or replayed from --params or --vector. The image
    is cropped at the bottom/right to a multiple of 4 pixels; 16-bit, gray and alpha inputs are
    converted (see docs/degradation.md).
    """
    explicit = [name for name in ("level", "seed") if ctx.get_parameter_source(name) != ParameterSource.DEFAULT]
    if params_in is not None and vector is not None:
        raise click.UsageError("give --params or --vector, not both")
    if (params_in is not None or vector is not None) and explicit:
        raise click.UsageError(f"--{explicit[0]} draws new parameters; it cannot be combined with a replay")
    if ctx.get_parameter_source("noise_seed") != ParameterSource.DEFAULT and vector is None:
        raise click.UsageError("--noise-seed only applies to --vector replays")
    for target in (t for t in (output, params_out) if t is not None):  # what the writes would refuse, first
        if target.is_dir():
            raise click.ClickException(f"{target}: is a folder")
        try:
            check_can_write(Path(target))
        except (DegradeError, OSError) as exc:
            raise click.ClickException(one_line(exc)) from None
    if image is None:
        image = degrade.sample_images()[0]
        err_console.print(f"no IMAGE given: using the bundled sample {image.name}")
    for other, what in ((output, "the -o image"), (image, "the input image")):
        if params_out is not None and _same_file(params_out, other):
            raise click.ClickException(f"{params_out}: --params-out would overwrite {what}")
    if _same_file(output, image):
        raise click.ClickException(f"{output}: -o would overwrite the input image")
    if output.suffix.lower() not in LOSSLESS_SUFFIXES:  # refused before the work, not after it
        raise click.ClickException(f"{output}: output must be a lossless image ({', '.join(LOSSLESS_SUFFIXES)})")
    set_max_pixels(max_pixels)
    try:
        hr = degrade.read_image(image)
        h, w = hr.shape[:2]
        if min(h, w) < MIN_HR_SIDE:
            raise ImageError(f"{image}: {w}x{h} is too small (both sides must be >= {MIN_HR_SIDE} px)")
        hr = np.ascontiguousarray(crop_to_multiple(hr, degrade.SCALE))
        if hr.shape[:2] != (h, w):
            err_console.print(f"cropped {w}x{h} to {hr.shape[1]}x{hr.shape[0]} (a multiple of {degrade.SCALE})")
        if params_in is not None:
            try:  # a regular file of at most 1 MiB: never a FIFO or /dev/zero
                text = read_regular_file(params_in, PARAMS_FILE_BYTES).decode("utf-8", errors="replace")
            except OSError as exc:
                raise DegradeError(f"{params_in}: cannot read ({exc.strerror or exc})") from None
            except ImageError as exc:  # missing, not a regular file, too large
                raise DegradeError(f"--params: cannot read {exc}") from None
            try:
                params = degrade.DegradationParams.from_json(text)
            except DegradeError as exc:
                raise DegradeError(f"{params_in}: {exc}") from None
        elif vector is not None:
            params = decode_vector(vector, noise_seed)
        else:
            params = degrade.sample_params(level, np.random.default_rng(np.random.SeedSequence(seed)))
        lr = degrade.apply(hr, params)
        png = encode_image(lr, output.suffix)
        # No image without its record: the image goes to a temporary file, written and synced (a full disk
        # or a quota says so here, naming the image), then the record is written and renamed, then the image
        # renamed. A failed write leaves neither changed; only a failed rename of the image, after the
        # record's (its folder changed under the run), could leave the record alone.
        with atomic_writer(output) as image_file:
            image_file.write(png)
            image_file.flush()
            os.fsync(image_file.fileno())
            if params_out is not None:
                with atomic_writer(params_out) as record_file:
                    record_file.write((json.dumps(params.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    except (DegradeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None

    source = "replayed" if (params_in or vector) else f"level {params.level}, seed {seed}"
    console.print(f"wrote {output} ({lr.shape[1]}x{lr.shape[0]}, {source})")
    try:
        v = degrade.encode(params)
        console.print("v = " + ",".join(f"{x:.4g}" for x in v), soft_wrap=True)
    except DegradeError as exc:  # a hand-written record may lie outside the layout's ranges
        err_console.print(f"note: no vector: {exc}")


@main.command("make-dataset")
@click.argument("src", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_DATASET, show_default=True,
              help="Dataset folder (created; an existing one with the same options is resumed).")
@click.option("--level", type=LevelType(), default="2", show_default=True, help="1, 2, 3 or mix.")
@click.option("--count", type=click.IntRange(min=1, max=MAX_COUNT), default=256, show_default=True,
              help=f"Number of samples (at most {MAX_COUNT // 10**6}M, in at most {MAX_SHARDS:,} shards).")
@click.option("--patch-size", type=click.IntRange(min=32), default=256, show_default=True,
              help="HR patch side (multiple of 4); LR is a quarter of it.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), default=None, show_default="auto",
              help="Worker processes (the output does not depend on it). Auto: one per "
                   f"{SAMPLES_PER_JOB} samples, up to all cores (starting workers costs about a second).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Samples per shard.")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True,
              help="HDF5 compression of hr/lr (lzf saves ~17 %, gzip ~28 % on photos; both run in the writing "
                   "process and cap throughput, see docs/benchmarks.md).")
@click.option("--sharpen-hr", is_flag=True,
              help="Degrade the unsharp-masked HR (the DASR release's pairing for its sharpened target; "
                   "trains better, docs/training.md). The stored HR stays plain.")
@click.option("--dask-scheduler", metavar="ADDRESS",
              help="Run the workers on a Dask cluster (needs the 'dask' extra); bytes equal a local run.")
@max_pixels_option
def make_dataset_command(src: tuple[Path, ...], out: Path, level, count: int, patch_size: int, seed: int,
                         jobs: int | None, shard_size: int, compression: str, sharpen_hr: bool,
                         dask_scheduler: str | None, max_pixels: int | None) -> None:
    """Degrade random HR patches of SRC images (files or folders; default: the bundled photos) into shards.

    Each sample picks a source image uniformly, a patch position uniformly, and parameters at
    --level, all from its own random stream (--seed, sample index). Writes DIR/shard-*.h5 and
    DIR/manifest.json (docs/dataset-format.md).
    """
    from degrade import shards as ds
    from degrade.shards.write import JOBS_PER_CORE, check_target

    if max_pixels is None:  # the environment's cap then: a bad one refused once, up front, not per image
        set_max_pixels(None)
    abandoned = ds.abandoned_writes()

    restore = sigterm_as_exit()  # a scheduler's stop ends the run as Ctrl-C does
    try:
        # what needs no source is refused before the scan, which reads every image (3 s for 3 of 48 MP)
        ds.DatasetConfig.check_options(level, count, patch_size, seed, shard_size, compression)
        check_target(out, count, shard_size)
        with _progress() as progress:
            task = progress.add_task("scanning sources", total=None)
            scan = ds.scan_sources(src, patch_size, lambda n, total: progress.update(task, completed=n, total=total),
                                   max_pixels=max_pixels)
            for path, reason in scan.unreadable:  # before the config, which refuses a scan with no usable image
                err_console.print(f"skipped unreadable {shown(path)}: {reason}", soft_wrap=True, markup=False)
            for path in scan.too_small[:SHOW_SKIPPED]:
                err_console.print(f"skipped {shown(path)}: smaller than --patch-size {patch_size}", soft_wrap=True,
                                  markup=False)
            if len(scan.too_small) > SHOW_SKIPPED:
                err_console.print(f"... and {len(scan.too_small) - SHOW_SKIPPED} more smaller than {patch_size} px")
            config = ds.DatasetConfig(level=level, count=count, patch_size=patch_size, seed=seed,
                                      shard_size=shard_size, compression=compression, source_root=scan.root,
                                      sources=tuple(scan.sources), sharpen_hr=sharpen_hr)
            progress.update(task, description=f"{len(scan.sources)} usable source images")
            task = progress.add_task(f"level {level} samples", total=count)
            with _dask_client(dask_scheduler):
                asked = jobs  # None: auto (a cap below is then no news)
                if jobs is None:  # on a Dask cluster as before: as many tasks at once as this machine's cores
                    jobs = (os.cpu_count() or 1) if dask_scheduler else auto_jobs(count)
                # The cap travels with the workers' task (a Dask worker does not see this process's settings).
                report = ds.make_dataset(config, out, jobs=jobs, backend="dask" if dask_scheduler else None,
                                         progress=lambda n: progress.advance(task, n), max_pixels=max_pixels)
    except (DegradeError, OSError) as exc:
        if ds.abandoned_writes() > abandoned:  # HDF5 could crash finalising a failed shard (docs/dataset-format.md)
            click.echo(f"Error: {one_line(exc)}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        raise click.ClickException(one_line(exc)) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: run the same command again to finish the dataset")
        sys.exit(130)
    except SystemExit as exc:
        if exc.code != 143:
            raise
        err_console.print("terminated: run the same command again to finish the dataset")
        sys.exit(143)
    finally:
        restore()

    rate = report.made / report.seconds if report.seconds > 0 else 0.0
    levels = ", ".join(f"level {k}: {v}" for k, v in report.level_counts.items() if v)
    if report.made and asked is not None and report.workers < asked:
        cap = "" if dask_scheduler else f", nor {JOBS_PER_CORE} per usable core (more add memory, not speed)"
        console.print(f"note: {report.workers} {'task(s) at once' if dask_scheduler else 'worker process(es)'}, not "
                      f"--jobs {asked}: no more than the chunks of 16 samples left to make{cap}")
    console.print(f"{out}: {count} samples in {config.shard_count} shard(s), "
                  f"{report.bytes_on_disk / 1e6:.1f} MB on disk")
    if report.made:
        console.print(f"made {report.made} samples ({levels}) in {report.seconds:.1f} s, {rate:.1f} samples/s"
                      + (f"; {report.reused_shards} shard(s) were already complete" if report.reused_shards else ""))
    else:
        console.print(f"nothing to do: all {report.reused_shards} shard(s) were already complete")
    console.print(f"sources: {len(scan.sources)} used, {len(scan.too_small)} smaller than {patch_size} px skipped, "
                  f"{len(scan.unreadable)} unreadable")


@main.command("make-testset")
@click.argument("hr_dir", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="The test set's folder (new, or an empty one).")
@click.option("--levels", default="1,2,3", show_default=True, help="Levels to degrade each image at.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The set's seed (dasr-eval --hr-dir --seed draws the same).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (the bytes do not depend on it); each holds one image at a time.")
@max_pixels_option
def make_testset_command(hr_dir: Path | None, out: Path, levels: str, seed: int, jobs: int,
                         max_pixels: int | None) -> None:
    """Degrade whole HR images (a folder, searched recursively; default: the bundled photos) into a test set
    of image folders: OUT/HR/NAME.png, OUT/LR/level{L}/NAME.png, OUT/params/level{L}/NAME.json and
    OUT/manifest.json (docs/inference.md, "Test sets to keep and share").

    Image i (sorted order) at level L is drawn from (--seed, i, L), as dasr-eval --hr-dir draws it:
    `dasr-eval --testset OUT` scores as `dasr-eval --hr-dir HR_DIR` does, and the folders pair by name for
    any other tool (`dasr-eval --lr-dir OUT/LR/level2 --hr-dir OUT/HR`).
    """
    from degrade.testset import make_testset

    wanted = parse_levels(levels)
    if hr_dir is None:
        hr_dir = degrade.sample_images()[0].parent
        err_console.print(f"no HR_DIR given: using the bundled photos in {hr_dir}")
    set_max_pixels(max_pixels)

    restore = sigterm_as_exit()  # as an exception: make_testset removes its hidden folder
    try:
        with _progress() as progress:
            task = progress.add_task("test images", total=None)
            manifest = make_testset(hr_dir, out, levels=wanted, seed=seed, jobs=jobs,
                                    progress=lambda done, total: progress.update(task, completed=done, total=total))
    except (DegradeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    except KeyboardInterrupt:
        _stopped("interrupted: nothing was written", 130)
    except SystemExit:
        _stopped("terminated: nothing was written", 143)
    finally:
        restore()
    console.print(f"{out}: {len(manifest['images'])} HR images at level(s) {', '.join(map(str, manifest['levels']))}"
                  f", seed {seed}")


def _stopped(message: str, status: int) -> None:
    """End make-testset after a stop, its hidden folder already removed: the message, then the process at
    once. A normal exit runs the native libraries' teardown, which, with their threads caught mid-work by
    the signal, aborted the process now and then (SIGABRT, 'terminate called without an active exception':
    2 of 40 stops under load, before this)."""
    err_console.print(message)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--regenerate", type=click.IntRange(min=0), default=0, show_default=True,
              help="Re-create this many random samples from their sources and compare bit for bit.")
@click.option("--sources", type=click.Path(path_type=Path, file_okay=False),
              help="Folder holding the source images, if not where they were when the dataset was made.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Which samples to regenerate.")
@max_pixels_option
def verify(directory: Path, regenerate: int, sources: Path | None, seed: int, max_pixels: int | None) -> None:
    """Check a dataset: structure, shapes, value ranges, checksums, and optionally regenerate samples."""
    from degrade import shards as ds

    set_max_pixels(max_pixels)  # the sources --regenerate decodes: as make-dataset's (a larger one: its value)
    if directory.is_file():  # a lone shard: its manifest, which verify compares it with, is in its folder
        raise click.UsageError(f"{directory}: verify checks a dataset folder (its manifest and every shard); "
                               f"give the folder, {directory.parent}")
    try:
        problems = ds.verify_dataset(directory, regenerate=regenerate, seed=seed, source_root=sources)
        checked = min(regenerate, len(ds.open_dataset(directory, allow_incomplete=True))) if regenerate else 0
    except (DegradeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    if problems:
        for line in problems:
            err_console.print(f"problem: {line}")
        raise click.ClickException(f"{directory}: {len(problems)} problem(s) found")
    console.print(f"{directory}: OK" + (f" ({checked} samples regenerated bit for bit)" if checked else ""))


@main.command()
@click.argument("target", required=False, type=click.Path(path_type=Path))
@click.option("--index", "index", type=int, help="Show one sample (default: statistics of the whole dataset).")
@click.option("--vector", help='Decode a 33-value vector "v0,...,v32" instead of reading a dataset.')
@click.option("--png", type=click.Path(path_type=Path),
              help="Also draw a picture: the sample (HR, LR, v), a --vector's v, or the dataset's histograms by level.")
@click.option("--grid", type=click.IntRange(min=1, max=64),
              help="With --png, draw a contact sheet of this many random HR/LR pairs instead of histograms.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Which samples --grid shows.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON instead of tables.")
@click.option("--checksums", is_flag=True,
              help="First compare every shard's SHA-256 with the manifest (reads the whole dataset once).")
def inspect(target: Path | None, index: int | None, vector: str | None, png: Path | None, grid: int | None,
            seed: int, as_json: bool, checksums: bool) -> None:
    """Show what v says: for one sample (--index), a whole dataset, or any --vector.

    TARGET is a dataset folder or a single shard file; without it and without --vector, the folder
    make-dataset writes by default (./degrade-dataset).
    """
    from degrade import inspect as insp
    from degrade import shards as ds

    if target is not None and vector is not None:
        raise click.UsageError("give a dataset (folder or shard) or --vector, not both")
    if target is None and vector is None:
        target = DEFAULT_DATASET
        if not target.exists():
            raise click.UsageError(f"give a dataset (folder or shard) or --vector; there is no ./{target} here "
                                   "(make one with `degrade make-dataset`)")
    if vector is not None and (index is not None or grid):
        raise click.UsageError("--index and --grid need a dataset")
    if grid is not None and (png is None or index is not None):
        raise click.UsageError("--grid needs --png (the contact sheet's file) and no --index")
    try:
        if png is not None:
            _check_picture_path(png, target)
            _plots()._pyplot()  # without matplotlib: say so before any table is printed
        if vector is not None:
            params = decode_vector(vector)
            v = parse_vector(vector)
            rows = insp.read_fields(v, params)
            _report_sample(rows, params, None, "decoded vector", as_json)
            if png:
                size = _plots().sample_figure(png, None, None, v, params, f"a vector: {insp.caption(params)}")
                err_console.print(f"wrote {png} ({size[0]}x{size[1]})")
            return
        data = ds.open_dataset(target, allow_incomplete=True, checksums=checksums)
        if data.config is not None and 0 < len(data) < data.config.count:  # (none: the error below says so)
            err_console.print(f"note: {target} is incomplete: {len(data)} of its {data.config.count} samples are made "
                              "(run its make-dataset command again to finish it)")
        if index is not None:
            n, first = len(data), data.stored_index(0) if len(data) else 0
            if data.config is None and first and not -n <= index < n:  # a lone later shard: --index is a
                # position, its labels not (its samples are one run; a folder's may have gaps)
                raise DegradeError(f"--index {index} is out of range: {target} holds samples {first} to "
                                   f"{first + n - 1}, at positions 0 to {n - 1}; --index takes the position")
            sample = data[index]
            stored = data.stored_index(index)  # the sample's own index (a lone later shard: not its position)
            label = f"sample {stored}" + (f" (position {index})" if stored != index else "")
            try:
                rows = insp.read_fields(sample.v, sample.params)
            except DegradeError as exc:  # the stored v, not a --vector: said where it is
                raise DegradeError(f"{target} {label}: its stored v: {exc} (a damaged shard: degrade verify checks "
                                   "each one)") from None
            _report_sample(rows, sample.params, sample.hr.shape[0], f"{target} {label}", as_json,
                           extra={"index": stored})
            if png:
                insp_png = _plots().sample_figure(png, sample.hr, sample.lr, sample.v, sample.params,
                                                  f"{target.name} #{stored}: {insp.caption(sample.params)}")
                err_console.print(f"wrote {png} ({insp_png[0]}x{insp_png[1]})")
            return
        stats = insp.dataset_stats(data)
        _report_dataset(stats, target, as_json)
        if png and grid:
            picks = np.random.default_rng(seed).choice(len(data), size=min(grid, len(data)), replace=False)
            size = _plots().contact_sheet(png, data, sorted(int(i) for i in picks))
            err_console.print(f"wrote {png} ({size[0]}x{size[1]})")
        elif png:
            size = _plots().histogram_figure(png, stats)
            err_console.print(f"wrote {png} ({size[0]}x{size[1]})")
    except (DegradeError, OSError) as exc:  # a sample index out of range is a DatasetError too
        raise click.ClickException(one_line(exc)) from None


def _check_picture_path(png: Path, target: Path | None) -> None:
    """--png writes a new picture: a .png name, never the dataset it shows (a shard, the manifest, any file
    in its folder), which the write would replace."""
    if png.suffix.lower() != ".png":
        raise click.BadParameter(f"{png}: the picture's name must end in .png", param_hint="--png")
    if target is not None and (_same_file(png, target)
                               or (target.is_dir() and real_path(target) in real_path(png).parents)):
        raise click.BadParameter(f"{png}: would overwrite part of the dataset {target}; write the picture "
                                 "elsewhere", param_hint="--png")
    try:  # before any statistics are computed and printed: what the write would refuse (a folder there)
        check_can_write(png)
    except (DegradeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None


def _plots():
    from degrade import plots

    return plots


def _report_sample(rows, params, hr_size: int | None, title: str, as_json: bool, extra: dict | None = None) -> None:
    from degrade import inspect as insp

    steps = insp.pipeline_steps(params, hr_size)
    if as_json:
        out = {**(extra or {}), "level": params.level, "pipeline": steps, "fields": insp.readings_to_json(rows)}
        click.echo(json.dumps(out, indent=1))
        return
    # the heading is a line of its own, not the table's title, which rich folds at the table's width (a long
    # path broken mid-name)
    console.print(f"{title}: level {params.level if params.level else 'not recorded (decoded)'}", soft_wrap=True,
                  markup=False)
    table = Table()
    for name in ("index", "block", "field", "stored v", "value"):
        table.add_column(name)
    for r in rows:
        stored = ", ".join(f"{x:.4f}" for x in r.stored)
        table.add_row(r.index, r.block, r.name, stored, r.text if r.present else Text("absent", style="dim"))
    _print_table(table)
    console.print("pipeline: " + " -> ".join(steps), soft_wrap=True)


def _report_dataset(stats: dict, target: Path, as_json: bool) -> None:
    from degrade import inspect as insp

    if as_json:
        click.echo(json.dumps(stats, indent=1))
        return
    levels = ", ".join(f"level {k}: {n}" if k != "other" else f"other levels: {n}" for k, n in stats["levels"].items())
    console.print(f"{target}: {stats['samples']} samples ({levels})", soft_wrap=True, markup=False)
    table = Table()
    for name in ("index", "field", "min", "mean", "max", "present", "histogram [0, 1]"):
        table.add_column(name, justify="right" if name in ("min", "mean", "max", "present") else "left",
                         no_wrap=True)
    for f in stats["fields"]:
        num = {k: "-" if f[k] is None else f"{f[k]:.3f}" for k in ("min", "mean", "max")}
        table.add_row(str(f["index"]), f["field"], num["min"], num["mean"], num["max"],
                      f"{100 * f['present_share']:.0f}%", insp.sparkline(f["histogram"]))
    _print_table(table)
    console.print("min / mean / max and the histogram are over the samples where the field is present")
    outside = sum(f.get("outside", 0) for f in stats["fields"])
    if outside or "other" in stats["levels"]:
        err_console.print(f"warning: a damaged dataset: {outside} stored v value(s) outside [0, 1] "
                          f"or NaN (not in the histograms), {stats['levels'].get('other', 0)} sample(s) of a level "
                          "other than 1-3; degrade verify lists the rows")


def _print_table(table: Table) -> None:
    """A table at its natural width: on a terminal as wide as the terminal allows; when piped (where rich
    would assume 80 columns) never cut, so numbers are not truncated to '0.3…'."""
    if console.is_terminal:
        console.print(table)
        return
    wide = text_console(width=PIPED_WIDTH, no_color=True)
    with wide.capture() as captured:
        wide.print(table)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console)


DASK_CONNECT_TIMEOUT = "10s"  # how long --dask-scheduler waits for the scheduler before saying it is unreachable


@contextmanager
def _dask_client(address: str | None):
    if address is None:
        yield None
        return
    try:
        from dask.distributed import Client
    except ImportError:
        raise click.ClickException("--dask-scheduler needs the dask extra: pip install '.[dask]' in the checkout") \
            from None
    try:
        client = Client(address, timeout=DASK_CONNECT_TIMEOUT)
    except OSError as exc:
        raise click.ClickException(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    with client:
        yield client


if __name__ == "__main__":
    sys.exit(main())
