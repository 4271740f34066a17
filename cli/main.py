"""`degrade`: the command-line face of the degradation library.

Commands are thin: they parse options, call the library, and report with rich. Errors a user can
cause (bad files, bad options) end as one line on stderr and exit status 1 (click: 2 for usage).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

import degrade
from degrade.io import ImageError, crop_to_multiple, write_bytes_atomic
from degrade.pipeline import MIN_HR_SIDE
from degrade.recipe import describe_levels

console = Console()
err_console = Console(stderr=True)


class LevelType(click.ParamType):
    name = "level"

    def convert(self, value, param, ctx):
        try:
            return degrade.parse_level(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def parse_vector(text: str) -> np.ndarray:
    """'v0,v1,...,v32' (commas and/or spaces, optional brackets) -> a checked (33,) vector."""
    items = [t for t in text.replace("[", " ").replace("]", " ").replace(",", " ").split() if t]
    values = []
    for item in items:
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"--vector: {item!r} is not a number") from None
    return degrade.vector.check_vector(values)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(degrade.__version__, prog_name="degrade")
def main() -> None:
    """Synthesise realistic low-resolution images with labelled DASR degradations."""


@main.command()
def levels() -> None:
    """Print the degradation space: the level recipes of spec section 3, from the code."""
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
@click.pass_context
def apply(ctx: click.Context, image: Path | None, output: Path, level, seed: int, params_out: Path | None,
          params_in: Path | None, vector: str | None, noise_seed: int) -> None:
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
    if image is None:
        image = degrade.sample_images()[0]
        err_console.print(f"no IMAGE given: using the bundled sample {image.name}")
    try:
        hr = degrade.read_image(image)
        h, w = hr.shape[:2]
        if min(h, w) < MIN_HR_SIDE:
            raise ImageError(f"{image}: {w}x{h} is too small (both sides must be >= {MIN_HR_SIDE} px)")
        hr = np.ascontiguousarray(crop_to_multiple(hr, degrade.SCALE))
        if hr.shape[:2] != (h, w):
            err_console.print(f"cropped {w}x{h} to {hr.shape[1]}x{hr.shape[0]} (a multiple of {degrade.SCALE})")
        if params_in is not None:
            try:
                text = params_in.read_text()
            except OSError as exc:
                raise ValueError(f"{params_in}: cannot read ({exc.strerror})") from None
            params = degrade.DegradationParams.from_json(text)
        elif vector is not None:
            params = degrade.decode(parse_vector(vector), noise_seed=noise_seed)
        else:
            params = degrade.sample_params(level, np.random.default_rng(np.random.SeedSequence(seed)))
        lr = degrade.apply(hr, params)
        degrade.write_image(output, lr)
        if params_out is not None:
            write_bytes_atomic(params_out, (json.dumps(params.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    except ValueError as exc:  # ImageError is a ValueError
        raise click.ClickException(str(exc)) from None

    source = "replayed" if (params_in or vector) else f"level {params.level}, seed {seed}"
    console.print(f"wrote {output} ({lr.shape[1]}x{lr.shape[0]}, {source})")
    try:
        v = degrade.encode(params)
        console.print("v = " + ",".join(f"{x:.4g}" for x in v), soft_wrap=True)
    except ValueError as exc:  # a hand-written record may lie outside the layout's ranges
        err_console.print(f"note: no vector: {exc}")


if __name__ == "__main__":
    sys.exit(main())
