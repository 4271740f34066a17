"""`dasr-sr` (super-resolve images, steer through v) and `dasr-eval` (score a model per level)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cli.main import _os_error

console = Console()
err_console = Console(stderr=True)


def _model(checkpoint: Path | None, release: tuple[Path, Path] | None, device: str):
    import torch

    from dasr_model.infer import load_model
    from dasr_model.train import pick_device

    dev = pick_device(device)
    model = load_model(checkpoint, tuple(release) if release else None).to(dev)
    return model, dev, torch


@click.command("dasr-sr", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="A dasr-train checkpoint (ckpt-*.pt) or its exported RUN/model.pt.")
@click.option("--release-weights", nargs=2, type=click.Path(path_type=Path), help="Released G.pth and P.pth.")
@click.option("--device", default="auto", show_default=True)
@click.option("--tile", type=click.IntRange(min=8), help="Process the LR image in tiles of this size (same v/a).")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="Override a field of the predicted v in physical units, e.g. noise1.strength=5.")
@click.option("--mix", help="Set the expert coefficients a directly: a0,a1,...")
@click.option("--print-v", is_flag=True, help="Print each image's predicted v, decoded.")
def sr_main(inputs, out_dir, checkpoint, release_weights, device, tile, settings, mix, print_v) -> None:
    """Super-resolve INPUT images or folders x4 into OUT_DIR as PNG."""
    import degrade
    from degrade.dataset import IMAGE_SUFFIXES
    from degrade.inspect import pipeline_steps
    from dasr_model.infer import edit_vector, parse_settings, predict, super_resolve, to_image, to_tensor

    try:
        files = []
        for p in inputs:
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            elif p.is_file():
                files.append(p)
            else:
                raise ValueError(f"{p}: no such file or folder")
        if not files:
            raise ValueError("no input images")
        overrides = parse_settings(list(settings))
        model, dev, torch = _model(checkpoint, release_weights, device)
        a_fixed = None
        if mix is not None:
            try:
                a_fixed = torch.tensor([[float(x) for x in mix.split(",")]], device=dev)
            except ValueError:
                raise ValueError(f"--mix {mix!r}: expected comma-separated numbers") from None
            if a_fixed.shape[1] != model.config.num_experts:
                raise ValueError(f"--mix needs {model.config.num_experts} values, got {a_fixed.shape[1]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task("super-resolving", total=len(files))
            for f in files:
                lr = to_tensor(degrade.read_image(f)).to(dev)
                with torch.no_grad():
                    v_hat, a = predict(model, lr)
                    if overrides:
                        v_hat = edit_vector(v_hat, overrides)
                        a = model.mix(v_hat)
                    if a_fixed is not None:
                        a = a_fixed
                    sr = super_resolve(model, lr, a, tile=tile)
                degrade.write_image(out_dir / f"{f.stem}_x4.png", to_image(sr))
                if print_v:
                    v = v_hat[0].clamp(0, 1).cpu().numpy()
                    steps = pipeline_steps(degrade.decode(v))
                    console.print(f"{f.name}: v = " + ",".join(f"{x:.3f}" for x in v), soft_wrap=True)
                    console.print(f"  reads as: {' -> '.join(steps)}", soft_wrap=True)
                bar.advance(task)
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(_os_error(exc)) from None
    err_console.print(f"wrote {len(files)} image(s) to {out_dir}")


@click.command("dasr-eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(path_type=Path), help="A dasr-train checkpoint or RUN/model.pt.")
@click.option("--release-weights", nargs=2, type=click.Path(path_type=Path))
@click.option("--shards", type=click.Path(path_type=Path), help="Evaluate on a dataset's (HR, LR, v) samples.")
@click.option("--hr-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Degrade these HR images at each --levels with fixed seeds and evaluate.")
@click.option("--levels", default="1,2,3", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def eval_main(checkpoint, release_weights, shards, hr_dir, levels, seed, device, as_json) -> None:
    """PSNR/SSIM on Y (4-px crop) and RGB PSNR per level, for the model and bicubic; predictor MAE per block."""
    from dasr_model.evaluate import evaluate_pairs, pairs_from_hr_dir, pairs_from_shards

    try:
        if (shards is None) == (hr_dir is None):
            raise click.UsageError("give --shards or --hr-dir")
        model, dev, _ = _model(checkpoint, release_weights, device)
        if shards is not None:
            pairs = pairs_from_shards(shards)
        else:
            lv = [int(x) for x in levels.split(",")]
            if not set(lv) <= {1, 2, 3}:
                raise ValueError(f"--levels {levels!r}: expected a subset of 1,2,3")
            pairs = pairs_from_hr_dir(hr_dir, lv, seed)
        result = evaluate_pairs(model, pairs, dev)
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(_os_error(exc)) from None
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    table = Table(title="evaluation (Y: BT.601, 4-px crop)", title_justify="left")
    for name in ("level", "images", "PSNR-Y", "SSIM-Y", "PSNR-RGB", "bicubic PSNR-Y", "bicubic SSIM-Y"):
        table.add_column(name, justify="right")
    for level, r in result["levels"].items():
        table.add_row(level, str(r["images"]), f"{r['psnr_y']:.2f}", f"{r['ssim_y']:.4f}", f"{r['psnr_rgb']:.2f}",
                      f"{r['bicubic_psnr_y']:.2f}", f"{r['bicubic_ssim_y']:.4f}")
    console.print(table)
    console.print("predictor MAE: " + ", ".join(f"{k} {v:.4f}" for k, v in result["mae"].items()))
    mix = result["mixing"]
    console.print(f"expert mix a: std over images {mix['std']:.4f} (within a level {mix['std_within_level']:.4f}), "
                  f"between level means {mix['between_level']:.4f}")
    for level, mean in mix["mean_by_level"].items():
        console.print(f"  level {level} mean a: " + " ".join(f"{x:.3f}" for x in mean))


if __name__ == "__main__":
    sys.exit(sr_main())
