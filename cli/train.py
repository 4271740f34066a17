"""`dasr-train`: train DASR on `degrade make-dataset` shards (a thin shell over dasr_model.train)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from cli.common import os_error, require_torch, text_console
from degrade._version import __version__
from degrade.errors import DegradeError
from degrade.io import real_path

err_console = text_console(stderr=True)


# What a --resume does not take from its checkpoint: the data and folder (given), where and how fast this call
# runs, its time budget, and the start (the trainer keeps the run's record of it); the model is handled apart
PER_CALL = {"shards", "out", "device", "workers", "max_minutes", "init_from", "init_release", "model", "cuda_graph"}
# TrainConfig's bounds, spelt out: importing dasr_model.train would import torch (tested equal)
MAX_STEPS, MAX_MINUTES = 10**15, 10**7
# Far past any useful mix (the recipe's 0.1 and 1), short of the ones that turn the first step's loss NaN (1e-300,
# 1e300); a model read from a file keeps its own
MIN_TEMPERATURE, MAX_GAIN = 1e-3, 1e3
OPTION_OF = {"lr": "learning_rate", "sharpen_gt": "sharpen", "compile": "compile_mode"}
OFF_SWITCH = {"val_shards": "no_val", "vgg_weights": "no_vgg"}  # flags that clear a path a resume would keep
# The model's settings that have an option (DASRConfig field: parameter): a resume or a source gives those not typed
MODEL_OPTIONS = {"num_experts": "experts", "num_block": "blocks", "num_feat": "features", "mixing": "mixing",
                 "mixing_temperature": "mixing_temperature", "mapping_gain": "mapping_gain",
                 "predictor_input": "predictor_input"}


def _flag(param: str) -> str:
    """A parameter's option as typed: no_val -> --no-val."""
    return "--" + param.replace("_", "-")


def resumed_config(ctx: click.Context, cfg, before) -> tuple:
    """`cfg` with each setting the command line did not give taken from `before` (the checkpoint's config),
    so a resume continues the run it resumes (its seed, schedule, losses, steps) without retyping them; and
    the options so taken that differ from this call's defaults, as text, the model's first (its settings not
    given are the checkpoint's already: `cfg.model`). A flag given either way (--gan or --no-gan) counts as
    given; --no-val / --no-vgg clear the validation set / VGG weights the run had."""
    params = {p.name: p for p in ctx.command.params}

    def given(name: str) -> bool:
        return name in params and ctx.get_parameter_source(name) is not ParameterSource.DEFAULT

    keep, kept = {}, []
    defaults = {f.name: f.default for f in dataclasses.fields(before.model)}
    for name in [*MODEL_OPTIONS, *(n for n in defaults if n not in MODEL_OPTIONS)]:  # the options as --help has them
        option = MODEL_OPTIONS.get(name)
        value = getattr(before.model, name)
        if not given(option) and value != (params[option].default if option else defaults[name]):
            kept.append(f"{params[option].opts[0] if option else name} {value}")
    for f in dataclasses.fields(cfg):
        option = OPTION_OF.get(f.name, f.name)
        if f.name in PER_CALL or given(option) or given(OFF_SWITCH.get(f.name, "")):
            continue
        value = keep[f.name] = getattr(before, f.name)
        if value != getattr(cfg, f.name):
            p = params.get(option)
            if isinstance(value, bool) and p is not None and p.secondary_opts:  # an on/off pair: the one in force
                kept.append(p.opts[0] if value else p.secondary_opts[0])
            else:
                kept.append(f"{p.opts[0] if p is not None else f.name} {value}")
    return dataclasses.replace(cfg, **keep), kept


def absolute(path: Path | None) -> str | None:
    """A path option as the run records it: absolute (not resolved: a link stays a link), so that a resume
    started from another folder reads the same validation set, VGG weights and data."""
    return None if path is None or str(path) == "" else os.path.abspath(path)


def out_of_memory_text(cfg, where: str) -> str:
    """The line for a run that ran out of memory on device `where`: the options of `cfg` (the run's, resumed
    ones included) that set how much it holds; the validation samples stay on the device for the whole run."""
    knobs = [f"--batch-size {cfg.batch_size}"] + ([f"--lr-crop {cfg.lr_crop}"] if cfg.lr_crop is not None else [])
    if cfg.val_shards is not None:
        knobs.append(f"--val-samples {cfg.val_samples} (the validation set is held whole from the start)")
    return f"out of memory on {where} at {', '.join(knobs)}; lower {'one of them' if len(knobs) > 1 else 'it'}"


def blow_up_settings(model) -> list[str]:
    """Beside the rate, the settings of `model` (a DASRConfig) that can make a run's loss NaN, where it has
    them: a softmax mix sharper than the default temperature (1), a mapping initialised above gain 1."""
    said = []
    if model.mixing == "softmax" and model.mixing_temperature < 1:
        said.append(f"a higher --mixing-temperature than {model.mixing_temperature:g}")
    if model.mapping_gain > 1:
        said.append(f"a lower --mapping-gain than {model.mapping_gain:g}")
    return said


class TimeLeftColumn(TimeRemainingColumn):
    """The time left: the estimate from the steps' speed, but never past the --max-minutes budget's end (the
    task's `deadline`, on the progress display's clock), where the run stops whatever --steps says (a
    constant-rate run of --steps 1000000 --max-minutes 30 showed hours)."""

    def render(self, task: Any) -> Text:
        deadline = task.fields.get("deadline")
        if deadline is None or task.finished:
            return super().render(task)
        left = max(0.0, deadline - task.get_time())
        if task.time_remaining is not None:
            left = min(left, task.time_remaining)
        minutes, seconds = divmod(int(left), 60)
        return Text(f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}", style="progress.remaining")


def default_workers() -> int:
    """--workers when not given: half the cores this process may use, shared among the processes torchrun
    started on this machine (LOCAL_WORLD_SIZE), at least 1, at most 8."""
    from degrade.shards.executor import usable_cores

    cores = usable_cores()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(8, max(1, cores // (2 * local)))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dasr-train")
@click.option("--shards", required=True, type=click.Path(path_type=Path), help="Training dataset folder.")
@click.option("--val-shards", type=click.Path(path_type=Path), help="Held-out dataset folder for validation.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder (checkpoints, metrics).")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 65536), default=16, show_default=True)
@click.option("--lr-crop", type=click.IntRange(4, 65536), default=64, show_default=True,
              help="LR crop side (HR: x4).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--resume", is_flag=True,
              help="Continue from the newest intact RUN/ckpt-*.pt, with the run's own options (model, seed, "
                   "steps, rate, losses, ...) for those not given again; --device, --workers and --max-minutes "
                   "are this call's.")
@click.option("--restart", is_flag=True,
              help="Delete the run's checkpoints, metrics, config and model file in --out, then start over.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True)
@click.option("--workers", type=click.IntRange(0, 1024), default=None,
              help="Data loader processes (the batches do not depend on it).  [default: half the cores, shared "
                   "among torchrun's processes on this machine, 1 to 8]")
@click.option("--val-every", type=click.IntRange(1, MAX_STEPS), default=500, show_default=True)
@click.option("--val-samples", type=click.IntRange(1, 10**6), default=64, show_default=True,
              help="Validation samples scored at each --val-every.")
@click.option("--ckpt-every", type=click.IntRange(1, MAX_STEPS), default=1000, show_default=True)
@click.option("--log-every", type=click.IntRange(1, MAX_STEPS), default=1, show_default=True,
              help="Read the losses back and write a metrics line every N steps (and at validation, checkpoint "
                   "and final steps); on a GPU, N > 1 spares the device a wait for the host at every step.")
@click.option("--keep-checkpoints", type=click.IntRange(0, 10**6), default=3, show_default=True,
              help="Keep the newest N ckpt-*.pt (about 130 MB each at the default size); 0 keeps all.")
@click.option("--experts", type=click.IntRange(min=1), default=5, show_default=True,
              help="1 = plain SRResNet baseline.")
@click.option("--blocks", type=click.IntRange(min=1), default=16, show_default=True, help="Residual blocks.")
@click.option("--features", type=click.IntRange(min=4), default=64, show_default=True, help="Feature channels.")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, max=1, min_open=True), default=1e-4,
              show_default=True,
              help="Adam learning rate (the peak, with --lr-schedule cosine or --warmup-steps).")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="constant (as released), or cosine: from --lr down to 0 at --steps; with --max-minutes, at the "
                   "step the speed measured over the first steps reaches within the budget (a short run then ends "
                   "annealed instead of cut off; --resume keeps that end).")
@click.option("--warmup-steps", type=click.IntRange(0, MAX_STEPS), default=0, show_default=True,
              help="First steps whose learning rate ramps linearly up to --lr.")
@click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=0.999, show_default=True)
@click.option("--ema-warmup/--no-ema-warmup", default=True, show_default=True,
              help="--no-ema-warmup: use --ema-decay from the first step (the warm-up: min(decay, (1 + t) / (10 + t)) "
                   "at update t, so a short run's EMA does not keep its initial weights).")
@click.option("--mixing", type=click.Choice(["linear", "softmax"]), default="linear", show_default=True,
              help="How v becomes the expert mix: linear (as released) or softmax(. / --mixing-temperature).")
@click.option("--mixing-temperature", type=click.FloatRange(min=MIN_TEMPERATURE), default=1.0, show_default=True,
              help="With --mixing softmax: lower is a sharper mix, nearer one expert per image.")
@click.option("--mapping-gain", type=click.FloatRange(min=0, max=MAX_GAIN, min_open=True), default=0.1,
              show_default=True,
              help="Init scale of the mapping net's last layer (0.1: a starts at 1/K for every image).")
@click.option("--predictor-input", type=click.Choice(["lr", "highpass"]), default="lr", show_default=True,
              help="What the degradation predictor sees: the LR (as released) or its high-pass residual.")
@click.option("--teacher-steps", type=click.IntRange(0, MAX_STEPS), default=0, show_default=True,
              help="First steps whose expert mix comes from the true v instead of the predicted one.")
@click.option("--expert-impl", type=click.Choice(["auto", "grouped", "dense", "stacked", "bmm", "folded"]),
              default="auto",
              show_default=True,  # auto + dasr_model.config.EXPERT_IMPLS, spelt out: importing it would import torch
              help="How expert convolutions are computed (exact either way; speed differs by device). auto: on a "
                   "GPU with CUDA graphs in bf16 (the default) and more than one expert, folded in channels_last "
                   "(the fastest graphed on an H200), untimed; otherwise on a GPU the fastest, timed at this "
                   "run's batch shape before the first step (memory format "
                   "included); on a CPU grouped.")
@click.option("--channels-last/--no-channels-last", default=False,
              help="Batches, predictor and discriminator in channels_last memory (with --expert-impl dense or "
                   "stacked, the generator too): what GPU tensor cores read natively.")
@click.option("--compile", "compile_mode",
              type=click.Choice(["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]),
              default="off", show_default=True,  # dasr_model.train.COMPILE_MODES
              help="torch.compile the network (predictor + generator) in this inductor mode; reduce-overhead adds "
                   "CUDA graphs. Compiling takes a minute or more at the first step, within --max-minutes.")
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="Record the whole step (forward, backward, optimisers, EMA) once as a CUDA graph and replay it: "
                   "one launch per step instead of hundreds. Needs CUDA, one process, and --compile off, default or "
                   "max-autotune-no-cudagraphs (the network's compiled kernels inside the graph: asked for only, "
                   "not yet timed). Default: on wherever it can be with --compile off.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="The step's arithmetic: bf16 autocast (weights, optimiser state and EMA stay float32) or "
                   "float32. auto: bf16 on CUDA, fp32 on a CPU.")
@click.option("--max-minutes", type=click.FloatRange(0, MAX_MINUTES, min_open=True),
              help="Wall-clock budget: save a checkpoint and stop when it is spent.")
@click.option("--sharpen/--no-sharpen", default=True, show_default=True,
              help="Train against the unsharp-masked HR (DASR's target), or the plain one.")
@click.option("--gan/--no-gan", default=False, help="Add the GAN term (0.1, U-Net SN discriminator).")
@click.option("--vgg-weights", type=click.Path(path_type=Path, dir_okay=False),
              help="Local VGG19 weights (torchvision layout) for the perceptual term; without it the term is off.")
@click.option("--no-vgg", is_flag=True, help="No perceptual term, even where the resumed run had --vgg-weights.")
@click.option("--no-val", is_flag=True, help="No validation, even where the resumed run had --val-shards.")
@click.option("--init-from", type=click.Path(path_type=Path),
              help="Start from this model's weights (a model file, checkpoint or run folder: its EMA generator and "
                   "predictor) instead of a random init, e.g. a GAN stage after a PSNR one. The model options "
                   "default to its own; optimisers and step start afresh.")
@click.option("--init-release", nargs=2, type=click.Path(path_type=Path, dir_okay=False),
              metavar="G P", help="Start from the released DASR weights (G.pth and P.pth), as --init-from does.")
@click.pass_context
def main(ctx, shards, val_shards, out, steps, batch_size, lr_crop, device, resume, restart, seed, workers, val_every,
         val_samples, ckpt_every, log_every, keep_checkpoints, experts, blocks, features, learning_rate, lr_schedule,
         warmup_steps, ema_decay,
         ema_warmup, mixing, mixing_temperature, mapping_gain, predictor_input, teacher_steps, expert_impl,
         channels_last, compile_mode, cuda_graph, precision, max_minutes, sharpen, gan, vgg_weights, no_vgg, no_val,
         init_from, init_release) -> None:
    """Train DASR (degradation predictor + expert MSRResNet) on HDF5 shards.

    Losses: L1 + v regression, plus GAN with --gan and perceptual with --vgg-weights. Several GPUs:
    torchrun --nproc_per_node N $(which dasr-train) ... (--batch-size is per process). Ctrl-C or SIGTERM
    saves a checkpoint and exits 130 / 143; --resume continues exactly.
    """
    require_torch()
    # under torchrun, rank 0 alone prints the notes, the progress bar and the last line (every rank's error shows)
    console = err_console if int(os.environ.get("RANK", "0")) == 0 else text_console(stderr=True, quiet=True)
    if resume and restart:
        raise click.UsageError("--resume continues a run, --restart deletes it: give one")
    for field, off in OFF_SWITCH.items():
        if ctx.params[off] and ctx.params[field] is not None:
            raise click.UsageError(f"{_flag(off)} and {_flag(field)} contradict each other: give one")
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"{out}: is a file, not a run folder")

    from dasr_model.model import DASRConfig
    from dasr_model.runs import pick_device
    from dasr_model.train import INIT_ONLY, TrainConfig, hold_run_folder, train

    if init_from is not None and init_release:
        raise click.UsageError("start from --init-from or from --init-release, not both")
    try:  # the run folder held from here to the end: its checkpoints read below are the ones the run continues
        ctx.with_resource(hold_run_folder(out))
    except DegradeError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error(exc)) from None
    source = None  # the model --init-from / --init-release names, once read
    options = {name: (option, ctx.params[option]) for name, option in MODEL_OPTIONS.items()}
    starting = init_from is not None or bool(init_release)
    found = None  # with --resume, the run's newest intact checkpoint: the options not given again are its own
    try:
        if resume:
            from dasr_model.checkpoints import latest_intact

            # read once: the trainer resumes from it (None: the trainer looks again and says there is none,
            # with the same warnings, so they are printed here only when one was found)
            skipped: list[str] = []
            found = latest_intact(out, warn=skipped.append)
            for message in skipped if found is not None else []:
                console.print(message)
        # From a source or a checkpoint, the model options not given are its own (a GAN stage keeps its PSNR
        # stage's network; a resume its run's)
        given = {name: value for name, (option, value) in options.items()
                 if not (starting or found) or ctx.get_parameter_source(option) is not ParameterSource.DEFAULT}
        if found is not None:  # a resume's model is its checkpoint's (the source it started from may be gone)
            model_cfg = TrainConfig.from_dict(found[1]["config"]).model
            for name in INIT_ONLY:  # shaped the run's first weights only: the run's own value stays on record
                if name in given and given.pop(name) != getattr(model_cfg, name):
                    console.print(f"note: --{options[name][0].replace('_', '-')} only scales a new run's initial "
                                  f"weights: this resume keeps its run's ({getattr(model_cfg, name)})")
            model_cfg = dataclasses.replace(model_cfg, **given)
        elif starting:  # loaded once: the trainer starts from it too
            from dasr_model.infer import load_model

            source = load_model(init_from, tuple(map(str, init_release)) if init_release else None,
                                warn=lambda m: console.print(f"warning: {m}"))
            model_cfg = dataclasses.replace(source.model.config, **given)
        else:
            model_cfg = DASRConfig(**given)
    except DegradeError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error(exc)) from None
    if workers is None:  # enough to feed a fast GPU step on a 16-core machine, without crowding a small one
        workers = default_workers()
    try:  # the config checks each value's type and bounds (a DASRError): one line, not a traceback
        cfg = TrainConfig(
            shards=absolute(shards), out=str(out), steps=steps, batch_size=batch_size, lr_crop=lr_crop,
            val_shards=absolute(val_shards), val_every=val_every, val_samples=val_samples,
            ckpt_every=ckpt_every, log_every=log_every, keep_checkpoints=keep_checkpoints, seed=seed,
            workers=workers, device=device, sharpen_gt=sharpen, gan=gan,
            vgg_weights=absolute(vgg_weights), lr=learning_rate, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, ema_decay=ema_decay, ema_warmup=ema_warmup, teacher_steps=teacher_steps,
            max_minutes=max_minutes, expert_impl=expert_impl, channels_last=channels_last, compile=compile_mode,
            cuda_graph=cuda_graph, precision=precision, init_from=absolute(init_from),
            init_release=tuple(map(absolute, init_release)) if init_release else None, model=model_cfg)
    except DegradeError as exc:
        raise click.ClickException(str(exc)) from None
    if found is not None:
        cfg, kept = resumed_config(ctx, cfg, TrainConfig.from_dict(found[1]["config"]))
        if kept:
            console.print(f"resuming with the run's own options ({found[0].name}; given ones win): "
                          + ", ".join(kept), soft_wrap=True)
        for field, off in OFF_SWITCH.items():  # an inherited path must still be there
            path = getattr(cfg, field)
            if path is None or ctx.get_parameter_source(field) is not ParameterSource.DEFAULT:
                continue
            if not Path(path).exists():
                raise click.ClickException(f"{_flag(field)} {path} (the run's, from {found[0].name}): no such file "
                                           f"or folder; give {_flag(field)} again, or {_flag(off)}")
            if not Path(path).is_absolute():  # recorded as typed by an earlier version: read from this folder,
                cfg = dataclasses.replace(cfg, **{field: absolute(Path(path))})  # and recorded so from here on
                console.print(f"note: {_flag(field)} {path} (the run's) was recorded relative to the folder it "
                              f"started in; this resume reads, and records, {getattr(cfg, field)}")
    if cfg.vgg_weights is not None and not Path(cfg.vgg_weights).is_file():
        raise click.ClickException(f"{cfg.vgg_weights}: no such file")
    try:
        import degrade

        made = degrade.open_dataset(shards).config
    except (DegradeError, OSError):
        made = None  # the trainer reports a bad dataset folder itself
    if made is not None and cfg.sharpen_gt and not made.sharpen_hr:
        console.print("note: these shards degrade the plain HR; with the sharpened target, shards made with "
                      "`degrade make-dataset --sharpen-hr` trained better (docs/training.md)")
    if cfg.vgg_weights is None:
        console.print("perceptual loss off: no --vgg-weights given (VGG19 weights cannot be downloaded here)")
    columns = (TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}", markup=False),
               TimeLeftColumn())

    where = device  # the device the run uses, once picked: an out-of-memory error names it
    try:
        where = pick_device(device).type
        if where == "cpu":
            console.print("note: training on the CPU is slow; a real run (100k steps) needs a CUDA GPU "
                          "(docs/training.md)")
        with Progress(*columns, console=console) as bar:
            # hidden until the first step: a run refused (or with nothing to train) draws no 'step 0/N' line
            task = bar.add_task("train", total=cfg.steps, completed=0, info="", visible=False, deadline=None)
            first = [True]

            def report(step: int, m: dict) -> None:
                if first[0]:  # a resumed run starts at its checkpoint's step: no false speed for the ETA
                    bar.reset(task, total=m["end"], completed=step - 1, visible=True)
                    first[0] = False
                elif m["end"] != bar.tasks[0].total:  # the end fitted to --max-minutes (--lr-schedule cosine)
                    bar.update(task, total=m["end"])
                if "budget_left" in m:  # --max-minutes: the time left is never past the budget's end
                    bar.update(task, deadline=bar.get_time() + m["budget_left"])
                if "loss" not in m:  # --log-every N: nothing read back yet
                    bar.update(task, completed=step)
                    return
                info = f"loss {m['loss']:.4f}  {m['samples_per_s']:.1f} samples/s (step {m['step']})"
                if "val" in m and m["step"] == step:  # a line of its own, above the bar (whose line is cut to the
                    # terminal); once: with --log-every N the last logged line comes with each step until the next
                    val = m["val"]
                    bar.console.print(f"step {m['step']}: val PSNR-Y " + ", ".join(
                        f"L{k} {v:.2f} (bicubic {val['bicubic_psnr_y'][k]:.2f})" for k, v in val["psnr_y"].items())
                        + f"; predictor MAE {val['mae']['all']:.4f}", soft_wrap=True)
                bar.update(task, completed=step, info=info)

            last = train(cfg, resume=resume, restart=restart, progress=report, source=source, checkpoint=found,
                         notify=lambda m: console.print(m, soft_wrap=True), held=True)
    except DegradeError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error(exc)) from None
    except FloatingPointError as exc:
        from dasr_model.checkpoints import list_checkpoints

        saved = list_checkpoints(out)
        # beside the rate, where the run has them; not for a run started from weights, whose mix is its source's
        # (another temperature is refused) and whose gain shaped no weight
        other = "" if cfg.init_from or cfg.init_release else " or ".join(blow_up_settings(cfg.model))
        kept = (f"the last checkpoint is {saved[-1].name} (its weights may have begun to diverge already: if a "
                "--resume with a lower --lr fails too, start again with --restart"
                + (f", with {other})" if other else ")") if saved
                else f"no checkpoint was written (lower --lr, or try {other})" if other
                else "no checkpoint was written (lower --lr?)")
        raise click.ClickException(f"{exc}; {kept}") from None
    except (RuntimeError, MemoryError) as exc:  # an allocation failure (CUDA's OutOfMemoryError is a RuntimeError)
        from dasr_model.infer import out_of_memory

        if not out_of_memory(exc):  # anything else is a bug: its traceback stays
            raise
        raise click.ClickException(out_of_memory_text(cfg, where)) from None
    if not last or last.get("nothing_to_train"):
        return
    stopped = last.get("stopped_by")
    if stopped in ("SIGINT", "SIGTERM"):
        console.print(f"{stopped}: saved ckpt-{last['step']}.pt in {out}; continue with --resume")
        sys.exit(130 if stopped == "SIGINT" else 143)
    reason = {"max_minutes": " (--max-minutes spent)",
              "schedule": " (the end of --lr-schedule, fitted to --max-minutes)"}.get(stopped, "")
    console.print(f"stopped at step {last['step']}{reason}; checkpoints and metrics.jsonl in {out}")


if __name__ == "__main__":
    sys.exit(main())


@click.command("dasr-curves", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dasr-curves")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The picture to write (.png).")
@click.option("--label", "labels", multiple=True,
              help="A name for each RUN, in order (default: the run folder's name, or the file's stem).")
@click.option("--smooth", type=click.IntRange(min=1), default=50, show_default=True,
              help="The training loss is a running mean over this many logged steps.")
def curves_main(runs, out_file, labels, smooth) -> None:
    """Draw training curves from RUNS (dasr-train run folders, or their metrics.jsonl files): the loss, the
    predictor's error, the learning rate, and validation PSNR-Y per level against bicubic, a line per run.
    Needs matplotlib (the plot extra: pip install '.[plot]' in the checkout)."""
    from dasr_model.curves import metrics_path, plot_curves, read_metrics

    if out_file.suffix.lower() != ".png":
        raise click.BadParameter(f"{out_file}: the picture's name must end in .png", param_hint="-o")
    if labels and len(labels) != len(runs):
        raise click.BadParameter(f"{len(labels)} label(s) for {len(runs)} run(s)", param_hint="--label")
    names = list(labels) or [real_path(run).parent.name if run.name == "metrics.jsonl"  # runs/a/metrics.jsonl: a
                             else run.stem if run.is_file() else real_path(run).name for run in runs]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"two runs are both called {next(n for n in names if names.count(n) > 1)!r}; "
                                 "name them with --label", param_hint="--label")
    if any(real_path(metrics_path(run)) == real_path(out_file) for run in runs):
        raise click.BadParameter(f"{out_file}: would overwrite a run's metrics", param_hint="-o")
    try:
        series = {name: read_metrics(run) for name, run in zip(names, runs)}
        width, height = plot_curves(series, out_file, window=smooth)
    except DegradeError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error(exc)) from None
    err_console.print(f"wrote {out_file} ({width}x{height})", soft_wrap=True)
