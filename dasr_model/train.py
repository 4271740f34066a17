"""The DASR training loop, readable top to bottom (docs/training.md).

Losses: L1(SR, unsharp-masked GT) + L1(v_hat, v), weights 1 and 1; optionally + 0.1 GAN (U-Net SN
discriminator, `gan`) and + 1 perceptual (VGG19, only when a local weights file is given). Adam (1e-4,
betas 0.9/0.99) over G, P and the mapping net together; EMA 0.999 of G. bf16 autocast on CUDA,
float32 on CPU (`precision`). Batches are a pure function of (seed, step) (dasr_model.data), so `resume` continues
exactly. Under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel and each
rank takes its slice of the global batch; rank 0 writes metrics (the loss terms averaged over the ranks,
samples/s counting every rank's samples) and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import numbers
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dasr_model.checkpoints import (
    checkpoint_step,
    latest_intact,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from dasr_model.data import PairedShards, StepBatchSampler, as_float, unsharp_mask
from dasr_model.errors import DASRError
from dasr_model.evaluate import ValidationSet, pairs_from_shards, sharpened_note
from dasr_model.graphstep import GraphedStep, plain_optimizer_state
from dasr_model.infer import LoadedModel, load_model, out_of_memory
from dasr_model.losses import UNetDiscriminatorSN, VGGPerceptualLoss, gan_loss, l1_loss
from dasr_model.model import DASR, EXPERT_IMPLS, DASRConfig, is_channels_last, set_expert_impl
from dasr_model.modelfile import MODEL_FILE, read_model_file, save_model_file
from dasr_model.runs import (
    RUN_FILES,
    RUN_LOCK,
    describe_device,
    foreign_run_file,
    half_written,
    logs_a_step,
    pick_device,
    run_files,
    start_over,
    truncate_metrics,
)
from degrade.errors import DegradeError
from degrade.io import exclusive_lock, make_folders, real_path, write_bytes_atomic
from degrade.shards.executor import usable_cores


@dataclass(frozen=True)
class TrainConfig:
    shards: str
    out: str
    steps: int = 1000
    batch_size: int = 16
    lr_crop: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    # The learning rate over the steps (lr_at): "constant" (the release's), or "cosine", from lr down to 0 at
    # the schedule's end: `steps`, or with max_minutes the step that the speed measured over the run's first
    # steps reaches within the budget (fit_schedule; kept by every checkpoint). warmup_steps: a linear ramp
    # up to lr first (the discriminator's Adam, with gan, follows the same rates).
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    pixel_weight: float = 1.0
    regression_weight: float = 1.0
    ema_decay: float = 0.999
    # The EMA's decay at update t (0, 1, ...) is min(ema_decay, (1 + t) / (10 + t)), the warm-up of
    # TensorFlow's ExponentialMovingAverage: early on the EMA follows the model instead of keeping the
    # initial weights (with 0.999 alone they would still weigh 0.999^t: 6 % after 2750 steps).
    ema_warmup: bool = True
    teacher_steps: int = 0  # steps at the start whose expert mix comes from the true v, not v_hat
    sharpen_gt: bool = True
    val_shards: str | None = None
    val_every: int = 500
    val_samples: int = 64
    ckpt_every: int = 1000
    # Read the loss values back (a host-device sync) and write a metrics line every N steps, and at every
    # validation, checkpoint and final step; between them the GPU never waits for the host.
    log_every: int = 1
    keep_checkpoints: int = 3  # the newest N ckpt-*.pt stay, older ones are deleted; 0 keeps all
    max_minutes: float | None = None  # wall-clock budget of this invocation: save and stop when spent
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    gan: bool = False
    gan_weight: float = 0.1
    vgg_weights: str | None = None
    perceptual_weight: float = 1.0
    # How expert convs compute (model.set_expert_impl; exact either way), or "auto": on a GPU the fastest
    # of AUTO_CANDIDATES timed at the run's batch shape before the first step (memory format included), but
    # GRAPH_CHOICE untimed where bf16 steps replay a CUDA graph with K > 1; on a CPU "grouped" (the fastest
    # there: docs/benchmarks.md)
    expert_impl: str = "auto"
    # Batches, the predictor and the discriminator in channels_last (NHWC) memory: what tensor-core
    # convolutions read natively. The expert weights are 5-D and keep theirs; "dense" and "stacked" carry
    # channels_last through the generator, "grouped" and "bmm" turn it back into NCHW at every layer.
    # With expert_impl "auto" on a GPU, the probe picks the format too (True: channels_last candidates only).
    channels_last: bool = False
    # torch.compile the network of the step (predictor + generator): "off", or an inductor mode, one of
    # COMPILE_MODES ("reduce-overhead" adds CUDA graphs). The discriminator and the optimiser stay eager.
    compile: str = "off"
    # The whole step (forward, backward, optimisers, EMA, discriminator) recorded once as a CUDA graph and
    # replayed (dasr_model.graphstep): one launch per step instead of a host-bound stream of small ones.
    # CUDA and a single process; compile "off", or asked for (True) with a compile mode of GRAPH_COMPILE_MODES
    # (the network's inductor kernels inside the step's graph: an experiment, not yet timed on a GPU); None
    # ("auto"): on wherever it can be with compile "off" (1.04 to 5.0x faster per step in every row measured on
    # an H200: docs/benchmarks.md).
    cuda_graph: bool | None = None
    # "bf16": the step under bfloat16 autocast (weights, optimiser state and EMA stay float32); "fp32"; "auto":
    # bf16 on CUDA, fp32 elsewhere (bf16 on a CPU runs, mostly slower; it is there to test the GPU's path)
    precision: str = "auto"
    # Weights to start from instead of a random init (a fresh run only; a resume takes its checkpoint's): a
    # model file, checkpoint or run folder (`init_from`; its EMA generator), or the released G and P files
    # (`init_release`). Their predictor and generator, with this run's architecture (start_from); the
    # optimisers, the discriminator and the step start afresh: a second stage, or fine-tuning on new data.
    init_from: str | None = None
    init_release: tuple[str, str] | None = None
    model: DASRConfig = field(default_factory=DASRConfig)

    def __post_init__(self) -> None:
        """Every value of its type and within its bounds (DASRError): a config read from a checkpoint is data,
        and a bad one failed far from its cause (a batch size of 0: IndexError; 10^11: a 745 GiB allocation;
        a log_every of 0: ZeroDivisionError)."""
        for f in fields(self):
            value, kind = getattr(self, f.name), _FIELD_KINDS.get(f.name)
            if kind is None:
                continue
            # numbers of any real type (numpy's too) become the field's own; bools are not numbers here
            if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
                try:
                    value = float(value)
                except OverflowError:  # 10**400 from a checkpoint's config
                    raise DASRError(f"train config: {f.name} must be a finite number, got an integer too large "
                                    "for a float") from None
                object.__setattr__(self, f.name, value)
            elif kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
                value = int(value)
                object.__setattr__(self, f.name, value)
            optional = f.name in _OPTIONAL
            if not (type(value) is kind or (optional and value is None)):
                raise DASRError(f"train config: {f.name} must be {kind.__name__}{' or null' if optional else ''}, "
                                f"got {value!r}")
            low, high = _BOUNDS.get(f.name, (None, None))
            if value is not None and ((low is not None and not value >= low) or (high is not None and not value <= high)
                                      or (kind is float and not math.isfinite(value))):
                bound = f"at least {low}" if high is None else f"from {low} to {high}"
                raise DASRError(f"train config: {f.name} must be a finite number {bound}, got {value!r}"
                                if kind is float else f"train config: {f.name} must be {bound}, got {value!r}")
        if not (len(self.betas) == 2 and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1
                                             for b in self.betas)):
            raise DASRError(f"train config: betas must be two numbers in [0, 1), got {self.betas!r}")
        # floats, as the other fields: Adam wants two of one type, a checkpoint's weights-only reader no numpy
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("compile", COMPILE_MODES), ("precision", PRECISIONS),
                              ("expert_impl", ("auto", *EXPERT_IMPLS))):
            value = getattr(self, name)
            if value not in allowed:
                raise DASRError(f"train config: {name} must be one of {', '.join(allowed)}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> TrainConfig:
        """A config read from a checkpoint: unknown keys, a missing or bad model config and values of the
        wrong type or out of bounds are refused (DASRError), but for what configs saved before the bounds
        may hold past them: a count of _CLAMPED reads as its bound (the same run), a max_minutes as None
        (the saving call's budget: a resume takes its own call's)."""
        if not isinstance(d, dict):
            raise DASRError("train config: expected a mapping")
        unknown = sorted(set(d) - {f.name for f in fields(cls)}, key=str)
        if unknown:
            raise DASRError(f"train config: unknown field(s) {', '.join(map(str, unknown))}")
        if "model" not in d:
            raise DASRError("train config: no model config")
        d = dict(d)
        d["model"] = DASRConfig.from_dict(d["model"])
        for name in _CLAMPED:
            value, high = d.get(name), _BOUNDS[name][1]
            if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > high:
                d[name] = high
        budget = d.get("max_minutes")
        if isinstance(budget, numbers.Real) and not isinstance(budget, bool) and not 0 <= budget <= MAX_MINUTES:
            d["max_minutes"] = None  # also inf and nan, which the older --max-minutes took
        d.setdefault("ema_warmup", False)  # configs written before the warm-up existed trained without it
        try:
            if "betas" in d:
                d["betas"] = tuple(float(b) for b in d["betas"])
                if len(d["betas"]) != 2:
                    raise ValueError("betas must be two numbers")
            if d.get("init_release") is not None:
                d["init_release"] = tuple(d["init_release"])
                if len(d["init_release"]) != 2 or not all(isinstance(x, str) for x in d["init_release"]):
                    raise ValueError("init_release must be two paths (G and P)")
            return cls(**d)
        except DASRError:  # the config's own checks: their message says "train config:" already
            raise
        except (TypeError, ValueError, OverflowError) as exc:  # a field missing, betas not two numbers, 10**400
            raise DASRError(f"train config: {exc}") from None


# TrainConfig's checks: each scalar field's type, the fields that may be None, and bounds (None: open)
_FIELD_KINDS: dict[str, type] = {
    **dict.fromkeys(("shards", "out", "lr_schedule", "val_shards", "device", "vgg_weights", "expert_impl", "compile",
                     "precision", "init_from"), str),
    **dict.fromkeys(("steps", "batch_size", "lr_crop", "warmup_steps", "teacher_steps", "val_every", "val_samples",
                     "ckpt_every", "log_every", "keep_checkpoints", "seed", "workers"), int),
    **dict.fromkeys(("lr", "pixel_weight", "regression_weight", "ema_decay", "max_minutes", "gan_weight",
                     "perceptual_weight"), float),
    **dict.fromkeys(("ema_warmup", "sharpen_gt", "gan", "channels_last", "cuda_graph"), bool),
}
# lr_crop None: the whole stored patches
_OPTIONAL = {"lr_crop", "val_shards", "vgg_weights", "init_from", "max_minutes", "cuda_graph"}
# Step counts and the budget bounded far above any run (a huge --steps with --max-minutes is how a cosine
# fit is asked for) yet where floats stay exact: 10^400 steps overflowed the rate schedule, the cosine fit
# and the progress bar (tracebacks at the first step)
MAX_STEPS, MAX_MINUTES = 10**15, 10**7
_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "steps": (1, MAX_STEPS), "batch_size": (1, 65536), "lr_crop": (4, 65536), "warmup_steps": (0, MAX_STEPS),
    "teacher_steps": (0, MAX_STEPS), "val_every": (1, MAX_STEPS), "val_samples": (1, 10**6),
    "ckpt_every": (1, MAX_STEPS), "log_every": (1, MAX_STEPS), "keep_checkpoints": (0, 10**6),
    "seed": (0, 2**64 - 1), "workers": (0, 1024), "lr": (0, None), "pixel_weight": (0, None),
    "regression_weight": (0, None), "ema_decay": (0, 1), "max_minutes": (0, MAX_MINUTES), "gan_weight": (0, None),
    "perceptual_weight": (0, None),
}
# Counts that configs saved before the bounds may hold past them (their options were unbounded), read from a
# checkpoint as their bound: each is compared with a step or a count that no run reaches (10^15 steps, 10^6
# checkpoints kept), so the run goes on as it was. val_samples scores the shards' first min(n, val_samples):
# the same where they hold at most 10^6. steps is also an unfitted cosine's end (a fitted one is
# min(steps, fitted)): the rates agree to the bit for 5.8 million steps past the warm-up, within 3e-14 of lr
# at 10^8. warmup_steps is not one: the warm-up's rate divides by it (lr_at), clamping would raise every step's rate.
# workers is the saving call's (a resume takes its own call's): its bound stands in for it.
_CLAMPED = ("steps", "teacher_steps", "val_every", "ckpt_every", "log_every", "keep_checkpoints", "val_samples",
            "workers")

# (strategy, channels_last) pairs that expert_impl "auto" times on a GPU: each strategy in its best layout
AUTO_CANDIDATES = (("grouped", False), ("dense", True), ("stacked", True), ("bmm", False), ("folded", True))
# What expert_impl "auto" takes for a run whose bf16 steps replay a CUDA graph (and K > 1), untimed: the
# probe times eager steps, whose host-side launch cost the graph removes, so its ranking is not the graph's.
# Graphed, folded in channels_last was the fastest of grouped, folded and itself (the strategies timed that
# way) at every batch (48, 16, 6) with and without GAN on an H200 with 5 experts (docs/benchmarks.md);
# eager, its rank among those three varied from first to third.
GRAPH_CHOICE = ("folded", True)
STOP_AGREE_EVERY = 20  # under DDP, the ranks agree on stopping at least every this many steps
PRECISIONS = ("auto", "bf16", "fp32")
LR_SCHEDULES = ("constant", "cosine")
# A cosine schedule fitted to max_minutes: the speed is measured over FIT_STEPS steps from the FIT_FROM-th of
# the run (the first ones compile, tune cuDNN and start the loader) and the end set where FIT_MARGIN of the
# budget left would run out (validations and checkpoints take the rest; the budget still stops the run).
FIT_FROM, FIT_STEPS, FIT_MARGIN = 5, 50, 0.95
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# options a resume may change that change what its steps see or compute (beside the rate, the EMA, the batch
# size and the device, which have notes of their own): said in one note
RESUME_DATA_OPTIONS = (("seed", "--seed"), ("shards", "--shards"), ("precision", "--precision"),
                       ("lr_crop", "--lr-crop"), ("sharpen_gt", "--sharpen"))
# the compile modes a whole-step CUDA graph can hold (reduce-overhead and max-autotune record graphs of their own)
GRAPH_COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")
# model settings that only shape a new run's random initial weights: a run started from weights, a checkpoint's
# or a model's, may name another value (its weights replace that init)
INIT_ONLY = ("mapping_gain",)
ERROR_PREFIX = re.compile(r"^[\w.]+(Error|Exception): ")  # "degrade.errors.DatasetError: " in a worker's message

def init_source(cfg: TrainConfig, warn: Callable[[str], None] | None = None) -> LoadedModel | None:
    """The model `cfg.init_from` or `cfg.init_release` names (None when neither does; both: DASRError)."""
    if cfg.init_from is not None and cfg.init_release is not None:
        raise DASRError("start from a model (init_from) or from the release weights (init_release), not both")
    if cfg.init_from is None and cfg.init_release is None:
        return None
    return load_model(cfg.init_from, cfg.init_release, warn=warn)


def start_from(model: DASR, source: LoadedModel) -> None:
    """Copy the predictor and generator of `source` into `model`, whose architecture must be the source's:
    every model setting but mapping_gain (a scale of the random init, which this replaces), else DASRError."""
    ours, theirs = asdict(model.config), asdict(source.model.config)
    differ = [f"{k} {theirs[k]!r} (this run: {ours[k]!r})" for k in ours
              if k not in INIT_ONLY and ours[k] != theirs[k]]
    if differ:
        raise DASRError(f"{source.path}: its model cannot start this run: " + ", ".join(differ))
    with torch.no_grad():
        model.load_state_dict(source.model.state_dict())


def refuse_deleting(cfg: TrainConfig, out: Path) -> None:
    """DASRError if --restart would delete the weights the run starts from (`out` itself, or its run files)."""
    files = {real_path(p) for p in run_files(out)}
    for path in (Path(p) for p in ([cfg.init_from] if cfg.init_from else cfg.init_release or ())):
        if real_path(path) == real_path(out) or real_path(path) in files:
            raise DASRError(f"{path}: --restart would delete the weights this run starts from; copy them out of "
                            f"{out} first, or choose another --out")


def workers_note(workers: int, cores: int, world: int = 1) -> str | None:
    """A note where the loader processes of all `world` ranks on this machine outnumber its `cores`: each
    is a process with its own memory and start-up (a thousand on two cores took a minute for one step);
    the batches are the same with any number."""
    if workers * world <= cores:
        return None
    return (f"note: {workers * world} loader processes on {cores} cores: each costs memory and start-up time "
            "and adds no speed past the cores (--workers; the batches are the same with any number)")


@contextlib.contextmanager
def hold_run_folder(out: str | Path) -> Iterator[None]:
    """Hold run folder `out` for a dasr-train (rank 0's; other ranks hold nothing, rank 0 alone writes the
    run's files): `out` is made if missing and RUN/.dasr-train.lock held (:func:`degrade.io.exclusive_lock`)
    until the block ends, then deleted. A second dasr-train on the same folder, a scheduler's requeue
    while the first still runs say, is refused at once (DASRError) instead of interleaving checkpoints and
    metrics with it, or resuming from a checkpoint the first is about to supersede. Folders this call made
    and the block left empty are removed: a run refused before writing anything leaves none."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    out = Path(out)
    if out.is_file():
        raise DASRError(f"{out}: is a file, not a run folder")
    if out.is_symlink() and not out.exists():
        raise DASRError(f"{out}: is a symlink to nothing; point it at a folder, or choose another --out")
    made: list[Path] = []  # each folder this call made, once, deepest first
    try:
        with contextlib.ExitStack() as held:
            for attempt in range(5):  # runs starting on the same new folder: one's clean-up may undo another's
                try:  # mkdir between the other's checks, as long as none holds the folder yet
                    made += [f for f in make_folders(out) if f not in made]
                    held.enter_context(exclusive_lock(
                        out / RUN_LOCK, maker="dasr-train", error=DASRError, remove=True,
                        busy=f"{out}: another dasr-train is running in this folder; wait for it or stop it"))
                    break
                except FileNotFoundError:  # a folder on the way removed meanwhile: make it again
                    if attempt == 4:
                        raise
            yield
    finally:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty (the run wrote there), or gone: leave it and what holds it
                pass


def train(cfg: TrainConfig, *, resume: bool = False, restart: bool = False,
          progress: Callable[[int, dict[str, Any]], None] | None = None,
          notify: Callable[[str], None] | None = None, source: LoadedModel | None = None,
          checkpoint: tuple[Path, dict[str, Any]] | None = None, held: bool = False) -> dict[str, Any]:
    """Train as `cfg` says (:func:`_train`) inside :func:`hold_run_folder`; `held`: the caller holds it
    already (dasr-train takes it before it reads the folder's checkpoints)."""
    kwargs = dict(resume=resume, restart=restart, progress=progress, notify=notify, source=source,
                  checkpoint=checkpoint)
    if held:
        return _train(cfg, **kwargs)
    with hold_run_folder(cfg.out):
        return _train(cfg, **kwargs)


def _train(cfg: TrainConfig, *, resume: bool = False, restart: bool = False,
           progress: Callable[[int, dict[str, Any]], None] | None = None,
           notify: Callable[[str], None] | None = None, source: LoadedModel | None = None,
           checkpoint: tuple[Path, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train as `cfg` says; returns the last metrics. SIGINT, SIGTERM or the `max_minutes` budget saves a
    checkpoint, then stops (`last["stopped_by"]` says which). The last step also writes RUN/model.safetensors
    (predictor + EMA generator, bf16). `notify` receives one-line notes: what runs where, where a resume
    starts, a damaged checkpoint skipped. A run folder that already holds a run needs `resume`, or `restart`,
    which deletes that run's files (:func:`start_over`) once the data and the model have passed their checks.
    `source`: the model cfg.init_from / init_release names, where the caller has loaded it already;
    `checkpoint`: for a resume, the run's newest intact checkpoint (latest_intact), where the caller has read
    it already (a release-size one is about 130 MB)."""
    out = Path(cfg.out)
    say = notify or (lambda message: None)
    if resume and restart:
        raise DASRError("resume continues a run, restart deletes it: not both")
    if not resume and not restart:  # a folder that holds a run: a checkpoint, a model file or a logged step
        if list_checkpoints(out) or (out / MODEL_FILE).exists():
            raise DASRError(f"{out} already holds a run; continue it with --resume, start it over with --restart, "
                            "or choose a new --out")
        if logs_a_step(out / "metrics.jsonl"):  # steps logged, none saved
            raise DASRError(f"{out} holds a run that stopped before its first checkpoint: start it over with "
                            "--restart, or choose a new --out")
    if not resume and (foreign := foreign_run_file(out)) is not None:  # a run writes (or --restart deletes)
        raise DASRError(f"{out / foreign} is not a file of a dasr-train run, and a run would "  # both: never
                        f"{'delete' if restart else 'overwrite'} it: choose a new --out")  # someone else's
    if cfg.lr_schedule == "cosine" and cfg.warmup_steps >= cfg.steps:
        raise DASRError(f"--warmup-steps {cfg.warmup_steps} leaves no step of --steps {cfg.steps} to anneal")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.compile in ("reduce-overhead", "max-autotune"):  # both record CUDA graphs
        raise DASRError(f"--compile {cfg.compile} records CUDA graphs, which this trainer does not run under "
                        "DDP (several processes); use --compile default or max-autotune-no-cudagraphs")
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(cfg.device)
    graph_ok = graph_possible(device, world, cfg.compile)
    use_graph = graph_ok and cfg.compile == "off" if cfg.cuda_graph is None else cfg.cuda_graph
    if use_graph and not graph_ok:
        why = (f"--compile {', '.join(GRAPH_COMPILE_MODES[:-1])} or {GRAPH_COMPILE_MODES[-1]} ({cfg.compile} "
               "records CUDA graphs of its own)" if cfg.compile not in GRAPH_COMPILE_MODES else
               f"a CUDA device (this run: {device.type})" if device.type != "cuda" else
               "a single process (DDP's hooks run outside a recording)")
        raise DASRError(f"--cuda-graph needs {why}")
    main_rank = rank == 0

    # --- data first: a bad dataset or crop is refused before anything is built or written ---
    train_set = PairedShards(cfg.shards, lr_crop=cfg.lr_crop, seed=cfg.seed)
    check_crop(train_set, cfg.lr_crop, cfg.shards, sharpen=cfg.sharpen_gt, gan=cfg.gan)
    try:  # its labels checked now: a damaged one would otherwise stop the run at its first validation
        val_pairs = pairs_from_shards(cfg.val_shards, limit=cfg.val_samples) if cfg.val_shards and main_rank else None
    except DegradeError as exc:
        raise DASRError(f"validation data: {exc}") from None
    if val_pairs is not None and val_pairs.sharpen_hr:
        say(sharpened_note(f"the validation set {cfg.val_shards}"))

    # --- model, EMA, optimisers (or their state from the newest intact checkpoint) ---
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    val_set: list[ValidationSet] = []  # its samples on the device for the run (uint8 HR and float32 LR): below
    with torch.random.fork_rng(devices=[]):  # the weights' init comes from cfg.seed; the caller's RNG is untouched
        torch.manual_seed(cfg.seed)
        model = DASR(cfg.model)
        disc = UNetDiscriminatorSN().to(device) if cfg.gan else None
        if resume:  # a resume's weights are its checkpoint's
            source = None
        elif source is None:
            source = init_source(cfg, warn=say)
    if source is not None:
        if restart:
            refuse_deleting(cfg, out)
        start_from(model, source)
        if main_rank:
            say(f"starting from the weights of {source.path} ({source.kind}"
                + (f", step {source.step})" if source.step is not None else ")"))
        del source
    model.to(device)  # "grouped" until "auto" has chosen (below)
    if cfg.expert_impl != "auto":
        set_expert_impl(model, cfg.expert_impl)
    fmt = lay_out(cfg.channels_last, model.predictor, disc)
    ema = copy.deepcopy(model.generator).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas) if disc is not None else None
    perceptual = VGGPerceptualLoss(cfg.vgg_weights).to(device) if cfg.vgg_weights else None
    parts = StepParts(net=model, model=model, ema=ema, opt=opt, disc=disc, opt_d=opt_d, perceptual=perceptual)
    step = 0
    fitted: int | None = None  # the schedule's end fitted to --max-minutes (below), or kept by the checkpoint
    end = cfg.steps  # the schedule's last step, where the run ends (schedule_end)
    if restart and main_rank:  # rank 0 alone writes the run's files, and alone deletes them
        gone = start_over(out)
        if gone:
            say(f"--restart: deleted {len(gone)} file(s) of the earlier run in {out}")
    nothing_left = False  # a resume already at its end
    if resume:
        found = checkpoint if checkpoint is not None else latest_intact(out, warn=say)
        if found is None and not list_checkpoints(out) and not any((out / name).exists() for name in RUN_FILES):
            # no run's file there (a new folder, a typo): nothing to start over
            raise DASRError(f"--resume: {out} holds no checkpoint to resume; start a run there without --resume")
        if found is None:
            raise DASRError(f"--resume: no readable checkpoint in {out} (start it over with --restart)")
        step = parts.load_state_dict(found[1], cfg, found[0])
        fitted = schedule_steps(found[1], found[0])
        before = TrainConfig.from_dict(found[1]["config"])
        if (cfg.init_from, cfg.init_release) not in ((None, None), (before.init_from, before.init_release)):
            say(f"note: {found[0].name} continues a run that started from "
                f"{before.init_from or before.init_release or 'a random init'}; its weights are the checkpoint's")
        cfg = replace(cfg, init_from=before.init_from, init_release=before.init_release)  # the record
        if (before.lr, before.lr_schedule, before.warmup_steps) != (cfg.lr, cfg.lr_schedule, cfg.warmup_steps):
            say(f"note: {found[0].name} was trained with {schedule_text(before)}; continuing with "
                f"{schedule_text(cfg)}")
        for note in resume_notes(found[0].name, found[1], before, cfg, device, world) if main_rank else ():
            say(note)
        if (before.ema_decay, before.ema_warmup) != (cfg.ema_decay, cfg.ema_warmup):
            say(f"note: {found[0].name} was trained with EMA decay {before.ema_decay}"
                f"{'' if before.ema_warmup else ' without'} warm-up; continuing with {cfg.ema_decay}"
                f"{'' if cfg.ema_warmup else ' without'} warm-up")
        for tmp in half_written(out) if main_rank else []:  # a kill during a save (rank 0 alone writes them)
            tmp.unlink(missing_ok=True)
        for newer in list_checkpoints(out) if main_rank else []:  # damaged ones latest_intact skipped: out of
            if checkpoint_step(newer) > step:  # pruning's way (rank 0 alone: ranks renaming at once would collide)
                newer.replace(newer.with_name(newer.name + ".damaged"))
                say(f"set {newer.name} aside as {newer.name}.damaged")
        end = schedule_end(cfg, fitted)
        was = schedule_end(before, fitted)
        if cfg.lr_schedule == before.lr_schedule == "cosine" and end != was and step < end:  # where the cosine
            # ends sets the rate of every step: a longer run jumps back up (at step 10 of 10: 2.4e-6 -> 5e-5);
            # a change of schedule has its note above
            say(f"note: the rate's schedule ended at step {was} and now ends at {end}: the next step's rate is "
                f"{lr_at(step, cfg, end):.3g}, where the checkpoint's schedule gave {lr_at(step, before, was):.3g}")
        if step >= end:
            why = f"--steps {cfg.steps}" if end == cfg.steps else f"its schedule fitted to --max-minutes ends at {end}"
            say(f"{out} is already at step {step} ({why}): nothing to train")
            there = model_file_step(out / MODEL_FILE) if main_rank else step
            if there is None or there < step:  # its last write failed (a full disk), or a kill came between it
                write_model_file(parts, out, step)  # and the checkpoint's
                say(f"wrote {MODEL_FILE} from {found[0].name}: it was missing or of an older step")
            elif there > step:  # the newer checkpoint it was written with was damaged, and set aside
                say(f"note: {MODEL_FILE} is of step {there}, newer than {found[0].name}: left as it is")
            if world == 1:
                return {"step": step, "nothing_to_train": True}
            nothing_left = True  # under torchrun once the ranks agree on the step (below): one alone would
            # leave the others waiting for it
        else:
            say(f"resuming from {found[0].name} (step {step} of {end})")
    if cfg.teacher_steps >= end > step and main_rank:  # a run that never trains with its own predictor's mix
        say(f"note: --teacher-steps {cfg.teacher_steps} covers every step to {end}: the expert mix comes from the "
            "true v throughout, never from the predictor")
    if val_pairs is not None and not nothing_left:  # read before the first step: a damaged pixel found at the
        try:  # first validation would stop the run with the steps since its last checkpoint lost
            val_set.append(ValidationSet(val_pairs, device))
        except DegradeError as exc:
            raise DASRError(f"validation data: {exc}") from None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))  # torchrun's processes on this machine
    if main_rank and (note := workers_note(cfg.workers, usable_cores(), local)) is not None:
        say(note)
    run_info = {"device": describe_device(device), "dtype": "bfloat16 autocast" if use_bf16 else "float32",
                "expert_impl": cfg.expert_impl, "memory_format": "channels_last" if cfg.channels_last else "NCHW",
                "compile": cfg.compile, "cuda_graph": use_graph,
                "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
                "world_size": world, "samples": len(train_set), "start_step": step, "schedule_steps": end}
    say(f"{run_info['device']}, {run_info['dtype']}, {run_info['parameters']:,} parameters "
        f"({cfg.model.num_experts} experts x {cfg.model.num_block} blocks x {cfg.model.num_feat} features), "
        f"{len(train_set)} training samples" + (", each step replayed from a CUDA graph (recorded after 3 eager "
                                                 "steps; --no-cuda-graph runs eagerly)" if use_graph else ""))

    def write_config() -> None:  # the full config and what this run runs on (rewritten once "auto" has chosen)
        write_bytes_atomic(out / "config.json", json.dumps({**cfg.to_dict(), "run": run_info}, indent=1).encode())

    if main_rank and not nothing_left:
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out / "metrics.jsonl", step)
        write_config()
    # --- data: batches keyed by step, each rank its slice ---
    sampler = StepBatchSampler(len(train_set), cfg.batch_size, start=step, stop=cfg.steps, seed=cfg.seed,
                               rank=rank, world_size=world)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed),
                        worker_init_fn=_worker_ignores_stops)

    stop: dict[str, str | None] = {"by": None}
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in handled}
    in_main_thread = threading.current_thread() is threading.main_thread()

    def on_signal(signum, frame):  # finish the step, save, then stop
        stop["by"] = signal.Signals(signum).name

    if in_main_thread:
        for sig in handled:
            signal.signal(sig, on_signal)
    metrics_file = open(out / "metrics.jsonl", "a") if main_rank else open(os.devnull, "w")
    last: dict[str, Any] = {}
    started = t0 = time.perf_counter()  # the --max-minutes budget counts from `started`; samples/s from t0
    paused = [0.0]  # seconds since t0 spent validating: left out of samples/s (not out of the budget)
    seen = 0
    # A cosine run with a budget fits its end once, over FIT_STEPS steps from the FIT_FROM-th of this process
    # (a run resumed before its fit, e.g. after a preemption, fits then); its rates until then follow `steps`
    start_step = step
    fitting = (cfg.lr_schedule == "cosine" and cfg.max_minutes is not None and fitted is None
               and step < FIT_FROM + FIT_STEPS and end > step + FIT_FROM + FIT_STEPS)
    fit_t = started
    # Every step has the same shapes (batch x crop): let cuDNN time its algorithms once and keep the fastest.
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark or device.type == "cuda"
    def record(losses: dict[str, torch.Tensor], step: int, validating: bool) -> dict[str, Any]:
        """Read a step's loss values (the one host-device sync of a step), check them, write its line (with
        the learning rate its update took). Under DDP every rank records the same steps, and the values are
        the mean of the ranks' (each over its slice of the batch: the global batch's loss), in one all-reduce."""
        if world > 1:
            import torch.distributed as dist

            terms = torch.stack([t.float() for t in losses.values()])  # the same terms, in order, on every rank
            dist.all_reduce(terms)
            values = dict(zip(losses, (terms / world).tolist()))
        else:
            values = {k: float(t) for k, t in losses.items()}
        if not math.isfinite(values["loss"]):  # checked before any checkpoint can hold it
            raise FloatingPointError(f"loss became {values['loss']} "  # steps counted from 1, as metrics.jsonl
                                     + (f"at step {step}" if cfg.log_every == 1 else  # its loss read at logged
                                        f"by step {step} (read every --log-every {cfg.log_every} steps)"))
        line = {"step": step, **values, "lr": rate,
                "samples_per_s": seen / (time.perf_counter() - t0 - paused[0])}
        if validating:
            clock = time.perf_counter()
            line["val"] = val_set[0](model, ema)
            line["val_s"] = time.perf_counter() - clock
            paused[0] += line["val_s"]
        if main_rank:
            metrics_file.write(json.dumps(line) + "\n")
            metrics_file.flush()
        return line

    batches = _batches(loader)  # its workers start at the first batch; the finally below ends them
    ended = False  # the loop ran to its end (or a stop): every rank is alive for the barrier below
    grouped = False  # a process group is up: the finally below ends it (left to the interpreter's exit, it
    # can abort the process with SIGABRT)
    try:
        if world > 1:
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            grouped = True
            check_ranks_start_together(step, device)
            if nothing_left:
                ended = True  # every rank is here: the barrier below, then the group's end
                return {"step": step, "nothing_to_train": True}
        if cfg.expert_impl == "auto":  # before DDP and compile wrap the model
            lr_hw = (cfg.lr_crop, cfg.lr_crop) if cfg.lr_crop else tuple(train_set.data[0].lr.shape[:2])
            impl, channels_last, probe = choose_expert_impl(parts, cfg, device, use_bf16, lr_hw, world,
                                                            graphed=use_graph)
            for module in (model, ema):
                set_expert_impl(module, impl)
            fmt = lay_out(channels_last, model.predictor, disc)
            run_info.update(expert_impl=impl, memory_format="channels_last" if channels_last else "NCHW")
            if probe:
                run_info["expert_impl_probe_ms"] = probe
                say("--expert-impl auto: " + ", ".join(f"{k} {v:.1f} ms" for k, v in probe.items())
                    + f" per training step; training with {impl}, {run_info['memory_format']}")
            elif device.type == "cuda":
                say(f"--expert-impl auto: {impl}, {run_info['memory_format']} (the fastest with CUDA graphs "
                    "where measured; not timed here)")
            if main_rank:
                write_config()
            t0, paused[0] = time.perf_counter(), 0.0  # samples/s is the training's, without the probe's seconds
        if world > 1:
            parts.net = DistributedDataParallel(model)
            if disc is not None:
                parts.disc = DistributedDataParallel(disc)
        if cfg.compile != "off":  # compiled at the first step (and once more where --teacher-steps ends)
            parts.net = compile_net(parts.net, cfg.compile)
        graphed: GraphedStep | None = None  # with cuda_graph: the step's graph (one per teacher setting)
        graphed_teacher = False
        for batch in batches:
            lr_img = as_float(batch["lr"], device).contiguous(memory_format=fmt)
            hr = as_float(batch["hr"], device).contiguous(memory_format=fmt)
            v = batch["v"].to(device, non_blocking=True)
            target = unsharp_mask(hr) if cfg.sharpen_gt else hr
            rate = lr_at(step, cfg, end)  # set every step: a resume restores the checkpoint's rate with Adam's state
            teacher = step < cfg.teacher_steps
            if use_graph:
                if graphed is None or graphed_teacher != teacher:
                    graphed, graphed_teacher = None, teacher  # the teacher phase's graph (and its memory) goes first
                    graphed = graphed_train_step(parts, cfg, use_bf16, device, teacher=teacher)
                losses = graphed(lr_img, target, v, rate=rate, ema_decay=ema_decay_at(step, cfg))
            else:
                for group in (g for o in (opt, opt_d) if o is not None for g in o.param_groups):
                    group["lr"] = rate
                losses = train_step(parts, cfg, lr_img, target, v, use_bf16, teacher=teacher,
                                    ema_decay=ema_decay_at(step, cfg))
            step += 1
            seen += lr_img.shape[0] * world  # every rank's slice of the global batch (all the same size)
            if fitting and step - start_step in (FIT_FROM, FIT_FROM + FIT_STEPS):
                if device.type == "cuda":  # the device's time, not the host's: queued work finishes first
                    torch.cuda.synchronize(device)
                if step - start_step == FIT_FROM:
                    fit_t = time.perf_counter()
                else:
                    fitting = False
                    end = fitted = fit_schedule(step, FIT_STEPS / (time.perf_counter() - fit_t),
                                                60 * cfg.max_minutes - (time.perf_counter() - started), cfg.steps,
                                                world, device)
                    run_info["schedule_steps"] = end
                    if main_rank:
                        write_config()
                    say(f"--lr-schedule cosine fitted to --max-minutes {cfg.max_minutes:g}: it ends at step {end}"
                        + (f"; warning: inside the {cfg.warmup_steps}-step warm-up, so the rate never anneals "
                           "(use fewer --warmup-steps)" if end <= cfg.warmup_steps else ""))

            # a validation step is a logged step on every rank (each records it: the loss is their mean), though
            # rank 0 alone validates
            scoring = bool(cfg.val_shards) and (step % cfg.val_every == 0 or step == end)
            validating = scoring and val_pairs is not None
            due = step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or step == end or scoring
            if due:
                last = record(losses, step, validating)
            if progress:  # where the run ends (a fit can move it), and the seconds of --max-minutes left
                progress(step, {**last, "end": end, **({"budget_left": 60 * cfg.max_minutes - (
                    time.perf_counter() - started)} if cfg.max_minutes is not None else {})})
            if cfg.max_minutes is not None and time.perf_counter() - started >= 60 * cfg.max_minutes:
                stop["by"] = stop["by"] or "max_minutes"
            stopped_by = stop["by"]  # read once: a signal arriving below waits for the next step
            if world > 1:  # every rank stops at the same step, or the others would wait in the next all-reduce
                # The ranks agree at logged steps (at least every STOP_AGREE_EVERY), checkpoint and last steps
                # only: steps every rank knows alike, and the flag's read is a host sync. A stop asked for in
                # between waits for the next of them (at most 19 steps: well within torchrun's 30 s between
                # passing on a signal and killing the workers).
                if (step % min(cfg.log_every, STOP_AGREE_EVERY) == 0 or step % cfg.ckpt_every == 0
                        or step == end):
                    flag = torch.tensor([0 if stopped_by is None else 1], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    if flag.item() and stopped_by is None:
                        stopped_by = "another rank"
                else:
                    stopped_by = None
            final = step == end or stopped_by is not None
            if final and not due:  # a stop between two logged steps: its line (and check) before its checkpoint
                last = record(losses, step, False)
            if main_rank and (step % cfg.ckpt_every == 0 or final):
                # the loss is read at logged steps only (no host sync per step): weights that blew up since
                # are not saved as a checkpoint to resume from
                if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
                    raise FloatingPointError(f"the weights became NaN or infinite by step {step}")
                os.fsync(metrics_file.fileno())  # the log up to the checkpoint survives a power loss with it
                save_checkpoint(out / f"ckpt-{step}.pt", parts.state_dict(cfg, step, fitted))
                prune_checkpoints(out, cfg.keep_checkpoints)
            if main_rank and final:
                write_model_file(parts, out, step)
            if stopped_by is None and final and end < cfg.steps:  # only a fitted end is below --steps
                stopped_by = "schedule"  # the end fitted to --max-minutes
            if stopped_by is not None:
                last["stopped_by"] = stopped_by
                break
        ended = True
    finally:
        try:
            batches.close()  # the loader's workers end
        finally:  # whatever that did
            torch.backends.cudnn.benchmark = cudnn_benchmark
            metrics_file.close()
            if in_main_thread:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            if grouped:
                if ended:  # a normal end: wait until rank 0 has saved, then tear down together. (Should rank 0
                    # fail in that last save, the others wait here until torchrun, seeing rank 0 fail, stops
                    # them.)
                    dist.barrier()
                parts.net, parts.disc = model, disc  # the DDP wrappers hold the group: release them first
                dist.destroy_process_group()
    return last


def graphed_train_step(parts: StepParts, cfg: TrainConfig, bf16: bool, device: torch.device, *,
                       teacher: bool = False, warmup: int = 3) -> GraphedStep:
    """:func:`train_step` on `parts` as a CUDA graph (dasr_model.graphstep): call it with (lr, target, v,
    rate=..., ema_decay=...); its first `warmup` steps run eagerly. DASRError without CUDA."""
    return GraphedStep(functools.partial(train_step, parts, cfg, bf16=bf16, teacher=teacher, autocast_cache=False),
                       [o for o in (parts.opt, parts.opt_d) if o is not None], device, warmup=warmup)


def resume_notes(name: str, ckpt: dict[str, Any], before: TrainConfig, cfg: TrainConfig, device: torch.device,
                 world: int) -> list[str]:
    """What a resume of checkpoint `name` (`ckpt`, trained as `before`) as `cfg` does otherwise than the
    uninterrupted run would: other batches (another global batch), other rounding (another device, thread
    count or torch), other data or arithmetic (RESUME_DATA_OPTIONS), a discriminator dropped."""
    notes = []
    was_batch = ckpt.get("global_batch")  # (older checkpoints record neither it nor computed_on)
    was_on, now_on = ckpt.get("computed_on"), computed_on(device, world)
    if type(was_batch) is int and was_batch != cfg.batch_size * world:  # --batch-size is per process
        notes.append(f"note: {name} was trained with batches of {was_batch} samples; this resume takes "
                     f"{cfg.batch_size * world} ({world} process(es) x --batch-size {cfg.batch_size}), so its "
                     "batches, and its result, differ from an uninterrupted run's"
                     + (f" (--batch-size {was_batch // world} gives the same batches)" if was_batch % world == 0
                        else ""))
    elif isinstance(was_on, str) and was_on != now_on:
        notes.append(f"note: {name} was computed on {was_on}, this resume on {now_on}: its result equals an "
                     "uninterrupted run's to float rounding, not bit for bit (sums split over other threads or "
                     "kernels round otherwise; on a CPU, OMP_NUM_THREADS sets the threads)")

    def shown(value: Any) -> str:
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    def same(key: str) -> bool:  # the shards' folder by where it leads (one folder, two spellings)
        was, now = getattr(before, key), getattr(cfg, key)
        return real_path(was) == real_path(now) if key == "shards" else was == now

    changed = [f"{flag} {shown(getattr(before, key))} -> {shown(getattr(cfg, key))}"
               for key, flag in RESUME_DATA_OPTIONS if not same(key)]
    if changed:
        notes.append(f"note: {name} continues with {', '.join(changed)}: its steps from here differ from an "
                     "uninterrupted run's")
    if before.gan and not cfg.gan:  # the checkpoints written from now on hold no discriminator
        notes.append(f"note: {name} has a discriminator, which this resume without --gan drops with its "
                     "optimiser's state: the checkpoints it writes cannot resume with --gan again")
    return notes


def model_file_step(path: Path) -> int | None:
    """The step of the readable model file `path`; None for none (missing, unreadable, no step)."""
    try:
        step = read_model_file(path)[1].get("step", "")
    except (DASRError, OSError):
        return None
    return int(step) if step.isdigit() and len(step) < 20 else None


def write_model_file(parts: StepParts, out: Path, step: int) -> None:
    """RUN/model.safetensors of the run at `step` (its checkpoint saved already); a failure says so."""
    try:
        save_model_file(parts.model, out / MODEL_FILE, ema_generator=parts.ema, step=step, source=f"ckpt-{step}.pt")
    except OSError as exc:
        raise DASRError(f"{out / MODEL_FILE}: not written ({exc.strerror or exc}); ckpt-{step}.pt is saved: "
                        f"once that is mended, --resume writes the model file (or dasr-export {out})") from None


def computed_on(device: torch.device, world: int = 1) -> str:
    """What a step's float rounding depends on beside the run's own settings, as a checkpoint records it:
    the device's kind (on a CPU its thread count: the backward's sums are split over the threads; a GPU's
    model, not its index, which DDP's ranks differ in), the processes of a DDP run, torch's version. A CPU
    resume computed otherwise equals the uninterrupted run to rounding only."""
    kind = describe_device(device)
    if device.type == "cuda":  # 'cuda:1 (NVIDIA H100 ...)' -> 'cuda (NVIDIA H100 ...)'
        kind = "cuda" + kind[kind.index(" "):]
    return f"{kind}{f', {world} processes' if world > 1 else ''}, torch {torch.__version__}"


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def graph_possible(device: torch.device, world: int, compile_mode: str) -> bool:
    """Whether a run's steps can replay a CUDA graph (GraphedStep): CUDA, one process, and no torch.compile
    mode that records CUDA graphs of its own (GRAPH_COMPILE_MODES)."""
    return device.type == "cuda" and world == 1 and compile_mode in GRAPH_COMPILE_MODES


def choose_expert_impl(parts: StepParts, cfg: TrainConfig, device: torch.device, bf16: bool, lr_hw: tuple[int, int],
                       world: int = 1, graphed: bool = False) -> tuple[str, bool, dict[str, float]]:
    """expert_impl "auto": (strategy, channels_last, probe ms per candidate). On a CPU, "grouped" in the
    configured format without timing anything (the K-times-the-work strategies are ~4x slower there). On a
    GPU, the fastest of AUTO_CANDIDATES (channels_last ones only with cfg.channels_last) by
    :func:`probe_expert_impls`, on a batch (per process) of LR crops `lr_hw`; under DDP every candidate
    counts at its slowest rank's time (a rank where it ran out of memory rules it out), so all ranks choose
    the same. `graphed` (the steps will replay a CUDA graph) in bf16 with more than one expert:
    GRAPH_CHOICE, untimed (an empty probe dict), the only setting where it was measured graphed."""
    if device.type != "cuda":
        return "grouped", cfg.channels_last, {}
    if graphed and bf16 and cfg.model.num_experts > 1:
        return *GRAPH_CHOICE, {}
    candidates = [(impl, cl or cfg.channels_last) for impl, cl in AUTO_CANDIDATES]
    shape = (cfg.batch_size, 3, *lr_hw)  # --batch-size is per process
    times = probe_expert_impls(parts, cfg, shape, bf16, candidates)
    if world > 1:
        import torch.distributed as dist

        where = "cpu" if dist.get_backend() == "gloo" else device  # NCCL reduces on the GPU, gloo on the CPU
        worst = torch.tensor([times.get(c, math.inf) for c in candidates], dtype=torch.float64, device=where)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        times = {c: t for c, t in zip(candidates, worst.tolist()) if math.isfinite(t)}
    if not times:
        raise DASRError(f"--expert-impl auto: every strategy ran out of GPU memory at batch {shape[0]}, "
                        f"LR crop {lr_hw[0]}x{lr_hw[1]}; use a smaller --batch-size or --lr-crop")
    best = min(times, key=times.get)
    return best[0], best[1], {f"{impl}{' channels_last' if cl else ''}": 1000 * t for (impl, cl), t in times.items()}


class _NoStep:
    """An optimiser stand-in for the probe: zero_grad clears the gradients, step changes nothing."""

    def __init__(self, params) -> None:
        self.params = list(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        pass


def probe_expert_impls(parts: StepParts, cfg: TrainConfig, shape: tuple[int, int, int, int], bf16: bool,
                       candidates=AUTO_CANDIDATES, *, repeats: int = 3,
                       clock: Callable[[], float] = time.perf_counter) -> dict[tuple[str, bool], float]:
    """Median seconds of the training step (:func:`train_step`: G and P, with the GAN and perceptual terms
    and the discriminator's step where the run has them, bf16 autocast if `bf16`) on a random batch of LR
    `shape` for each (strategy, channels_last) candidate, after one untimed step (where cuDNN times its
    algorithms). Nothing is learnt: the optimisers are stand-ins that do not step, the EMA update is aimed
    at the generator itself (a lerp of x to x), the discriminator's power-iteration vectors are put back,
    gradients are left None, and the strategy and memory formats are restored. So the time is the step's
    less the two Adam updates, which no candidate changes, and the memory is the step's but for Adam's
    state. A candidate that runs out of GPU memory is left out."""
    model, disc = parts.model, parts.disc
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)  # the global RNG is untouched
    n, c, h, w = shape
    lr = torch.rand(shape, generator=gen, device=device)
    target = torch.rand((n, c, 4 * h, 4 * w), generator=gen, device=device)
    v = torch.rand((n, model.predictor.MappingNet[0].in_features), generator=gen, device=device)
    probe = StepParts(net=model, model=model, ema=model.generator, opt=_NoStep(model.parameters()), disc=disc,
                      opt_d=_NoStep(disc.parameters()) if disc is not None else None, perceptual=parts.perceptual)
    impl_before = model.generator.conv_first.impl
    channels_last_before = is_channels_last(model.predictor.ConvNet[0].weight)
    disc_state = {k: t.clone() for k, t in disc.state_dict().items()} if disc is not None else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[tuple[str, bool], float] = {}
    try:
        for impl, channels_last in candidates:
            set_expert_impl(model, impl)
            fmt = lay_out(channels_last, model.predictor, disc)
            x, y = lr.contiguous(memory_format=fmt), target.contiguous(memory_format=fmt)
            samples: list[float] = []
            try:
                for i in range(repeats + 1):
                    sync()
                    start = clock()
                    train_step(probe, cfg, x, y, v, bf16)
                    sync()
                    if i:
                        samples.append(clock() - start)
                times[(impl, channels_last)] = sorted(samples)[len(samples) // 2]
            except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
                if not out_of_memory(exc):
                    raise
            finally:
                x = y = None  # noqa: F841 (freed before the cache is emptied)
                probe.opt.zero_grad()
                if probe.opt_d is not None:
                    probe.opt_d.zero_grad()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        set_expert_impl(model, impl_before)
        lay_out(channels_last_before, model.predictor, disc)
        if disc is not None:
            disc.load_state_dict(disc_state)
            disc.requires_grad_(True)  # train_step freezes it for G's step: a failure there must not leave it so
    return times


def lay_out(channels_last: bool, *modules: torch.nn.Module | None) -> torch.memory_format:
    """Put the 4-D weights of `modules` (the predictor, the discriminator; None is skipped) in channels_last
    or the standard layout; returns that memory format, for the batches. The experts' 5-D weights have no
    channels_last layout: "dense" and "stacked" carry it through the generator from its input."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for module in modules:
        if module is not None:
            module.to(memory_format=fmt)
    return fmt


def check_ranks_start_together(step: int, device: torch.device) -> None:
    """Under torchrun, every rank must start from the same step: rank 0 reads the run's newest checkpoint
    holding the run folder, the others read it without (they write nothing), so one that read just before
    the run's previous process saved a newer one would resume elsewhere (its optimiser state, its batches).
    DASRError on every rank where they differ (one all-reduce)."""
    import torch.distributed as dist

    bounds = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    latest, earliest = int(bounds[0]), -int(bounds[1])
    if latest != earliest:
        raise DASRError(f"the processes start from different steps ({earliest} and {latest}): a checkpoint was "
                        "saved while they read the run folder; run the command again")


def compile_net(net: torch.nn.Module, mode: str, backend: str = "inductor") -> torch.nn.Module:
    """`net` compiled by torch.compile with inductor in `mode` (one of COMPILE_MODES but "off"); shapes are
    static (every step has the same batch and crop). The parameters stay `net`'s own: checkpoints, the EMA
    and validation use the uncompiled model. Another `backend` (e.g. "aot_eager": the same tracing, no
    code generation; for dry runs) ignores `mode`."""
    if backend != "inductor":
        return torch.compile(net, backend=backend, dynamic=False)
    return torch.compile(net, mode=None if mode == "default" else mode, dynamic=False)


def check_crop(data: PairedShards, lr_crop: int | None, where: str, *, sharpen: bool = False,
               gan: bool = False) -> None:
    """Refuse, before the first step, an empty dataset or an LR crop the step cannot take: larger than the
    dataset's LR patches; with `sharpen`, under 7 (the sharpening blur's reflect padding, 25 px a side,
    needs an HR side over 25); with `gan`, odd (the U-Net discriminator halves the HR side three times
    and adds the skips back: 4 x side must divide by 8). Without a crop, the patches' own LR size."""
    if len(data) == 0:
        raise DASRError(f"{where}: the dataset holds no samples")
    h, w = data.data[0].lr.shape[:2]
    if lr_crop is not None and lr_crop > min(h, w):
        raise DASRError(f"--lr-crop {lr_crop} is larger than the dataset's LR patches ({w}x{h}); "
                        f"use at most {min(h, w)}")
    what = f"--lr-crop {lr_crop}" if lr_crop is not None else f"the dataset's LR patches ({w}x{h}, no --lr-crop)"
    sides = (lr_crop,) if lr_crop is not None else (h, w)
    if sharpen and min(sides) < 7:
        raise DASRError(f"{what}: the sharpened target needs an LR side of at least 7 (HR over 25 px); "
                        "use a larger --lr-crop, or --no-sharpen")
    if gan and any(side % 2 for side in sides):
        raise DASRError(f"{what}: the GAN's discriminator needs an even LR side (HR a multiple of 8); "
                        "use an even --lr-crop")


def _worker_ignores_stops(worker_id: int) -> None:
    """In each loader worker: SIGTERM and SIGINT are the training's to handle (finish the step, save, stop,
    then end the workers), not the worker's. torchrun's stop and a scheduler's preemption signal the whole
    process group, and PyTorch's workers died of it, ending the run in a traceback without a checkpoint.
    A worker still ends when the training does, or when its parent dies (PyTorch's watchdog)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _batches(loader: DataLoader):
    """The loader's batches; a refusal raised inside a loader worker (a damaged shard) becomes one line.
    Its worker processes end when the batches do, however they end: the last batch, a stop, an error here
    or in the step (`train` closes this generator)."""
    it = iter(loader)
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except (DegradeError, OSError) as exc:  # from a worker, the message ends with the original's last line
                message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                raise DASRError("training data: " + ERROR_PREFIX.sub("", message)) from exc
            yield batch
    finally:
        # A worker's error holds the iterator in its traceback (the frames of PyTorch's `_next_data`), so
        # it outlives this generator; PyTorch then ends the workers only when Python's cycle collector
        # reaches it, which first closes the queues the shutdown speaks through: the shutdown then waits
        # 5 s per worker, then kills it. So end them here (a single-process iterator has none to end).
        end_workers = getattr(it, "_shutdown_workers", None)
        if end_workers is not None:
            end_workers()


@dataclass
class StepParts:
    """What one optimisation step touches, and the training state a checkpoint holds. `net` is `model`,
    or its DistributedDataParallel wrapper."""

    net: torch.nn.Module
    model: DASR
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    disc: torch.nn.Module | None = None
    opt_d: torch.optim.Optimizer | None = None
    perceptual: torch.nn.Module | None = None

    def state_dict(self, cfg: TrainConfig, step: int, fitted: int | None = None) -> dict[str, Any]:
        """Everything to continue exactly: config, weights, EMA, optimisers, step (the data is keyed by step;
        no global RNG state is needed: nothing in a step draws from torch's RNG), and the cosine schedule's end
        where it was fitted to max_minutes (whatever this run's steps: a later resume may ask for more)."""
        world = _world_size()
        state = {"config": cfg.to_dict(), "model": self.model.state_dict(), "ema_generator": self.ema.state_dict(),
                 "optimizer": plain_optimizer_state(self.opt.state_dict()), "step": step,
                 "computed_on": computed_on(next(self.model.parameters()).device, world),
                 "global_batch": cfg.batch_size * world}
        if fitted is not None:
            state["schedule_steps"] = fitted
        if self.disc is not None and self.opt_d is not None:
            state["discriminator"] = _unwrap(self.disc).state_dict()
            state["optimizer_d"] = plain_optimizer_state(self.opt_d.state_dict())
        return state

    def load_state_dict(self, ckpt: dict[str, Any], cfg: TrainConfig, path: Path) -> int:
        """Load a checkpoint's state (:meth:`state_dict`); returns its step. A mismatch is a DASRError."""
        theirs = TrainConfig.from_dict(ckpt["config"]).model
        differ = [f"{k} {v!r} (asked: {getattr(cfg.model, k)!r})" for k, v in asdict(theirs).items()
                  if k not in INIT_ONLY and v != getattr(cfg.model, k)]
        if differ:
            raise DASRError(f"{path}: the checkpoint's model differs from the one asked for: " + ", ".join(differ)
                            + "; a resume takes its model from the checkpoint: leave those options out")
        if self.disc is not None and "discriminator" not in ckpt:
            raise DASRError(f"{path}: no discriminator in the checkpoint; resume without --gan")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema_generator"])
            self.opt.load_state_dict(ckpt["optimizer"])
            _check_adam(self.opt, "optimizer")
            if self.disc is not None and self.opt_d is not None:
                _unwrap(self.disc).load_state_dict(ckpt["discriminator"])
                self.opt_d.load_state_dict(ckpt["optimizer_d"])
                _check_adam(self.opt_d, "optimizer_d")
            return int(ckpt["step"])
        except DASRError as exc:  # the state is damaged (_check_adam): said as it is
            raise DASRError(f"{path}: {exc}") from None
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:  # a checkpoint is data: its contents can lie
            raise DASRError(f"{path}: does not fit this run ({str(exc).splitlines()[0]})") from None


def _check_adam(opt: torch.optim.Optimizer, what: str) -> None:
    """A loaded Adam state that fits its parameters (ValueError): torch checks the groups' sizes, not the state
    tensors' shapes or the betas, which then failed at the first step (a RuntimeError, a ValueError)."""
    for group in opt.param_groups:
        betas = group.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"{what}: betas {betas!r} are not two numbers in [0, 1)")
        for p in group["params"]:
            for key, t in opt.state.get(p, {}).items():
                if key != "step" and isinstance(t, torch.Tensor) and t.shape != p.shape:
                    raise ValueError(f"{what}: its {key} of shape {tuple(t.shape)} is for another parameter than "
                                     f"one of shape {tuple(p.shape)}")
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise DASRError(f"damaged: its {what} state's {key} holds NaN or infinite values (the first "
                                    "step would turn the weights to NaN)")


def lr_at(step: int, cfg: TrainConfig, end: int) -> float:
    """The learning rate of update `step` (0-based) in a schedule that ends at `end` steps: cfg.lr * (step + 1) /
    cfg.warmup_steps during the warm-up, then cfg.lr ("constant") or cfg.lr * (1 + cos(pi * p)) / 2 with p
    going from 0 at the warm-up's end to 1 at `end` ("cosine")."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    p = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
    return cfg.lr * (1 + math.cos(math.pi * p)) / 2


def schedule_end(cfg: TrainConfig, fitted: int | None) -> int:
    """The step a run ends at: cfg.steps, or for a cosine schedule the end fitted to max_minutes when that is
    earlier (a constant rate ignores a fitted end: resuming with it trains on to cfg.steps)."""
    return min(cfg.steps, fitted) if fitted is not None and cfg.lr_schedule == "cosine" else cfg.steps


def schedule_text(cfg: TrainConfig) -> str:
    """'lr 0.0002, cosine, 200 warm-up steps': how a config sets the rate, for notes."""
    return f"lr {cfg.lr:g}, {cfg.lr_schedule}, {cfg.warmup_steps} warm-up steps"


def fit_schedule(step: int, steps_per_s: float, seconds_left: float, steps: int, world: int,
                 device: torch.device) -> int:
    """The schedule's end for a run at `step` with `seconds_left` of its budget, at `steps_per_s`: where
    FIT_MARGIN of the time left runs out, at most `steps`, at least the next step. Under DDP every rank calls
    it at the same step and all take the smallest answer."""
    end = max(step + 1, min(steps, step + int(FIT_MARGIN * steps_per_s * max(0.0, seconds_left))))
    if world > 1:
        import torch.distributed as dist

        agreed = torch.tensor([end], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        end = int(agreed.item())
    return end


def schedule_steps(ckpt: dict[str, Any], path: Path) -> int | None:
    """The fitted schedule end a checkpoint holds (None: its config's steps). A checkpoint is data: a value
    that is not a positive integer is a DASRError."""
    end = ckpt.get("schedule_steps")
    if end is not None and (type(end) is not int or end < 1):
        raise DASRError(f"{path}: schedule_steps must be a positive integer, got {end!r}")
    return end


def ema_decay_at(step: int, cfg: TrainConfig) -> float:
    """The EMA decay of update `step` (0-based): cfg.ema_decay, or with cfg.ema_warmup the smaller
    (1 + step) / (10 + step) while that is below it (0.1 at step 0, 0.99 at 890, 0.999 from 8990 on)."""
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def train_step(p: StepParts, cfg: TrainConfig, lr: torch.Tensor, target: torch.Tensor, v: torch.Tensor,
               bf16: bool, *, teacher: bool = False, ema_decay: float | None = None,
               ema_weight: torch.Tensor | None = None, autocast_cache: bool = True) -> dict[str, torch.Tensor]:
    """One step: G (and P) on L1 + regression (+ perceptual, + GAN), then D, then the EMA of G.

    lr (B, 3, h, w), target (B, 3, 4h, 4w), v (B, 33), all on the device. `teacher`: the expert mix
    comes from the true v (the predictor still learns v from the regression term). Returns the loss terms
    as detached 0-d tensors: reading them (float) makes the host wait for the device, so the loop does it
    only when it logs. `ema_decay`: this update's decay (:func:`ema_decay_at`; default cfg.ema_decay);
    `ema_weight`, in its place, 1 - decay as a 0-d float32 tensor on the device (what a CUDA graph reads:
    dasr_model.graphstep). `autocast_cache`: autocast's cache of cast weights (off while a CUDA graph
    records: a replay must cast afresh).
    """
    device_type = lr.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=autocast_cache):
        sr, v_hat = p.net(lr, return_v=True, v_mix=v if teacher else None)
        sr, v_hat = sr.float(), v_hat.float()
        terms = {"l1": l1_loss(sr, target), "regression": F.l1_loss(v_hat, v)}
        loss = cfg.pixel_weight * terms["l1"] + cfg.regression_weight * terms["regression"]
        if p.perceptual is not None:
            terms["perceptual"] = p.perceptual(sr, target)
            loss = loss + cfg.perceptual_weight * terms["perceptual"]
        if p.disc is not None:
            p.disc.requires_grad_(False)
            terms["gan"] = gan_loss(p.disc(sr).float(), real=True)
            loss = loss + cfg.gan_weight * terms["gan"]
    p.opt.zero_grad(set_to_none=True)
    loss.backward()
    p.opt.step()
    if p.disc is not None and p.opt_d is not None:
        p.disc.requires_grad_(True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=autocast_cache):
            d_loss = gan_loss(p.disc(target).float(), real=True) + gan_loss(p.disc(sr.detach()).float(), real=False)
        p.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        p.opt_d.step()
        terms["discriminator"] = d_loss
    with torch.no_grad():
        if ema_weight is not None:  # a lerp_ per parameter: a foreach op would read the weight on the host
            for mine, theirs in zip(p.ema.parameters(), p.model.generator.parameters()):
                mine.lerp_(theirs, ema_weight)
        else:  # one multi-tensor kernel for all parameters, the same numbers as a lerp_ per parameter
            decay = cfg.ema_decay if ema_decay is None else ema_decay
            torch._foreach_lerp_(list(p.ema.parameters()), list(p.model.generator.parameters()), 1 - decay)
    return {"loss": loss.detach(), **{k: t.detach() for k, t in terms.items()}}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)
