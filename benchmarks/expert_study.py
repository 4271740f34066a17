#!/usr/bin/env python
"""Small-scale CPU study: do 5 experts beat 1 at the same steps, and which lever makes them specialise?

Trains a tiny DASR (4 blocks x 16 features, predictor 32 features) with `dasr_model.train.train`
for a fixed number of steps per run, on level-`mix` shards made from the training photos, then scores
the EMA model on held-out photos (never trained on: benchmarks/_study.py) per level: PSNR-Y / SSIM-Y
(4-px crop) beside bicubic, predictor MAE per block of v, the spread of the expert mix a across
samples and levels, and how different the experts became (cosine between their updates).

Runs (`--runs`, each for every `--seeds`):
  single            1 expert (a plain SRResNet with the predictor beside it)
  release           5 experts, the released mapping: linear, starting at a = 1/K, a from v_hat
  teacher           5 experts, linear mapping at full init scale, a from the true v for the first half
  softmax           5 experts, a = softmax(mapping / 0.1), full init scale, a from v_hat
  softmax_teacher   softmax and teacher together
  hp_<run>          the same with the predictor fed the LR's high-pass residual (--predictor-input highpass)
  <run>+usmlr       the same, trained on LR degraded from the sharpened HR (the release's pairing)
  <run>+plain       the same, trained against the plain HR (no unsharp-masked target)
  <run>@<opts>      the same with other optimiser settings, '-'-separated: cos (--lr-schedule cosine),
                    x<F> (--lr times F, a plain decimal), w<N> (--warmup-steps N); e.g. single+usmlr@cos-x2-w100

Each finished run is written to WORK/results/<run>-s<seed>.json, so a rerun only does what is missing.
Usage: python benchmarks/expert_study.py --photos DIR --work DIR [--steps 600] [--seeds 0,1,2]
       [--runs single,release,teacher] [--jobs 2] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import make_dataset, make_sharpened_lr_copy, split_photos  # noqa: E402

LEVERS = {
    "single": {"num_experts": 1},
    "release": {},
    "teacher": {"mapping_gain": 1.0, "teacher": True},
    "softmax": {"mixing": "softmax", "mixing_temperature": 0.1, "mapping_gain": 1.0},
    "softmax_teacher": {"mixing": "softmax", "mixing_temperature": 0.1, "mapping_gain": 1.0, "teacher": True},
    "hp_single": {"num_experts": 1, "predictor_input": "highpass"},
    "hp_release": {"predictor_input": "highpass"},
    "hp_softmax_teacher": {"mixing": "softmax", "mixing_temperature": 0.1, "mapping_gain": 1.0, "teacher": True,
                           "predictor_input": "highpass"},
}


def run_one(name: str, seed: int, a: dict) -> dict:
    """Train and score one run in this (worker) process; returns the result record."""
    import torch

    torch.set_num_threads(a["threads"])
    from dasr_model.diagnostics import expert_stats
    from dasr_model.evaluate import evaluate_pairs, pairs_from_shards
    from dasr_model.infer import load_checkpoint_model
    from dasr_model.model import DASR, DASRConfig
    from dasr_model.train import TrainConfig, train

    base, optim = split_optim(name)
    lever, _, variant = base.partition("+")
    opts = dict(LEVERS[lever])
    teacher = opts.pop("teacher", False)
    model_cfg = DASRConfig(num_feat=a["features"], num_block=a["blocks"], predictor_feat=a["predictor_feat"],
                           **{"num_experts": 5, **opts})
    out = Path(a["work"]) / "runs" / f"{name}-s{seed}"
    shards = a["train_usmlr"] if variant == "usmlr" else a["train"]
    cfg = TrainConfig(shards=shards, out=str(out), steps=a["steps"], batch_size=a["batch"], lr_crop=a["crop"],
                      lr=a["lr"] * optim["scale"], lr_schedule=optim["schedule"],
                      warmup_steps=optim["warmup"], ema_decay=a["ema"], teacher_steps=a["steps"] // 2 if teacher else 0,
                      sharpen_gt=variant != "plain", ckpt_every=a["steps"], seed=seed, workers=0, device="cpu",
                      model=model_cfg)
    shutil.rmtree(out, ignore_errors=True)  # a run is redone whole (dasr-train refuses to overwrite one)
    t0 = time.perf_counter()
    last = train(cfg)
    seconds = time.perf_counter() - t0
    torch.manual_seed(seed)  # train() builds its model right after this call: the same initial weights
    initial = DASR(model_cfg).generator.state_dict()
    model = load_checkpoint_model(out / f"ckpt-{a['steps']}.pt")
    pairs = (p for level in (1, 2, 3) for p in pairs_from_shards(a[f"val{level}"]))
    result = evaluate_pairs(model, pairs, torch.device("cpu"))
    return {"run": name, "seed": seed, "train_seconds": seconds, "final_loss": last.get("loss"),
            "experts": expert_stats(model.generator, initial), "mixing_true_v": true_v_mixing(model, a), **result}


def split_optim(name: str) -> tuple[str, dict]:
    """'single+usmlr@cos-x2-w100' -> ('single+usmlr', {'schedule': 'cosine', 'scale': 2.0, 'warmup': 100});
    a bad option is a ValueError."""
    base, _, spec = name.partition("@")
    optim = {"schedule": "constant", "scale": 1.0, "warmup": 0}
    for token in spec.split("-") if spec else []:
        if token == "cos":
            optim["schedule"] = "cosine"
        elif token[:1] == "x":  # a plain decimal: '-' separates the options, so no 1e-3
            optim["scale"] = float(token[1:])
            if not (math.isfinite(optim["scale"]) and optim["scale"] > 0):
                raise ValueError(f"the learning-rate factor in {name!r} must be a positive number")
        elif token[:1] == "w":
            optim["warmup"] = int(token[1:])
        else:
            raise ValueError(f"unknown optimiser option {token!r} in {name!r}")
    return base, optim


def true_v_mixing(model, a: dict) -> dict:
    """The mix the mapping net gives for the held-out samples' TRUE v: what the experts could be steered by,
    whatever the predictor has learnt."""
    import numpy as np
    import torch

    import degrade
    from dasr_model.diagnostics import mixing_stats

    vs, levels = [], []
    for level in (1, 2, 3):
        for s in degrade.open_dataset(a[f"val{level}"]):
            vs.append(s.v)
            levels.append(level)
    with torch.no_grad():
        mix = model.mix(torch.from_numpy(np.stack(vs)))
    return mixing_stats(mix, torch.tensor(levels))


def summarise(results: list[dict], runs: list[str]) -> str:
    """A Markdown table: one row per run (mean over seeds, min-max), bicubic beside."""
    lines = ["| run | seeds | L1 PSNR-Y | L2 PSNR-Y | L3 PSNR-Y | SSIM-Y L1/L2/L3 | a std (within level) "
             "| a between levels | a std from true v | expert update cosine | predictor MAE |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in runs:
        rs = [r for r in results if r["run"] == name]
        if not rs:
            continue

        def cell(level: str, key: str = "psnr_y") -> str:
            xs = [r["levels"][level][key] for r in rs]
            m = statistics.mean(xs)
            return f"{m:.2f} ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else f"{m:.2f}"

        def mean(get) -> str:
            xs = [get(r) for r in rs]
            xs = [x for x in xs if x is not None]
            return f"{statistics.mean(xs):.3f}" if xs else "-"

        ssim = "/".join(f"{statistics.mean(r['levels'][lv]['ssim_y'] for r in rs):.3f}" for lv in "123")
        lines.append(
            f"| {name} | {len(rs)} | {cell('1')} | {cell('2')} | {cell('3')} | {ssim} "
            f"| {mean(lambda r: r['mixing']['std'])} ({mean(lambda r: r['mixing']['std_within_level'])}) "
            f"| {mean(lambda r: r['mixing']['between_level'])} | {mean(lambda r: r['mixing_true_v']['std'])} "
            f"| {mean(lambda r: r['experts'].get('update_cosine'))} | {mean(lambda r: r['mae']['all'])} |")
    r0 = results[0]["levels"]
    lines.append(f"| bicubic | - | {r0['1']['bicubic_psnr_y']:.2f} | {r0['2']['bicubic_psnr_y']:.2f} "
                 f"| {r0['3']['bicubic_psnr_y']:.2f} | " + "/".join(f"{r0[lv]['bicubic_ssim_y']:.3f}" for lv in "123")
                 + " | | | | | |")
    return "\n".join(lines)


def mae_table(results: list[dict], runs: list[str]) -> str:
    blocks = ["all", "kernel", "resize", "noise", "jpeg"]
    lines = ["| run | " + " | ".join(blocks) + " |", "|---" * (len(blocks) + 1) + "|"]
    for name in runs:
        rs = [r for r in results if r["run"] == name]
        if rs:
            lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(r['mae'][b] for r in rs):.4f}"
                                                     for b in blocks) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, help="Photo folder (default: the bundled samples, --smoke only).")
    ap.add_argument("--work", type=Path, required=True, help="Datasets, runs and results go here.")
    ap.add_argument("--runs", default="single,release,teacher,softmax,softmax_teacher")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=24, help="LR crop (HR patches are 4x).")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--predictor-feat", type=int, default=32)
    ap.add_argument("--train-count", type=int, default=8000)
    ap.add_argument("--val-count", type=int, default=64, help="Held-out samples per level (192-px HR patches).")
    ap.add_argument("--jobs", type=int, default=2, help="Runs trained at once (one thread each).")
    ap.add_argument("--smoke", action="store_true", help="Tiny sizes, bundled photos: checks the path in a minute.")
    a = ap.parse_args(argv)
    if a.smoke:
        a.steps, a.train_count, a.val_count, a.features, a.blocks, a.predictor_feat = 4, 48, 4, 8, 1, 8
    runs, seeds = a.runs.split(","), [int(s) for s in a.seeds.split(",")]
    for name in runs:
        try:
            base, _ = split_optim(name)
        except ValueError as exc:
            ap.error(str(exc))
        lever, _, variant = base.partition("+")
        if lever not in LEVERS or variant not in ("", "usmlr", "plain"):
            ap.error(f"unknown run {name!r}")
    if a.photos is None:
        if not a.smoke:
            ap.error("--photos is required (except with --smoke)")
        import degrade

        a.photos = Path(degrade.sample_images()[0]).parent
    train_files, held = split_photos(a.photos)
    work = a.work
    (work / "results").mkdir(parents=True, exist_ok=True)
    # datasets on 2 processes; the smoke run's (48 + 3 x 4 samples) on one: a worker pool's start-up costs more
    # there than it saves
    jobs_make = 1 if a.smoke else 2
    print(f"photos: {len(train_files)} for training, {len(held)} held out; making datasets in {work}", flush=True)
    cfg = vars(a) | {"work": str(work), "threads": 1}
    cfg["train"] = str(make_dataset(train_files, work / "train", level="mix", count=a.train_count, patch=4 * a.crop,
                                    seed=1, jobs=jobs_make))
    for level in (1, 2, 3):
        cfg[f"val{level}"] = str(make_dataset(held, work / f"val-L{level}", level=str(level), count=a.val_count,
                                              patch=192 if not a.smoke else 64, seed=100 + level, jobs=jobs_make))
    if any(split_optim(r)[0].endswith("+usmlr") for r in runs):
        cfg["train_usmlr"] = str(make_sharpened_lr_copy(work / "train", work / "train-usmlr"))
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()}

    todo = [(r, s) for r in runs for s in seeds if not (work / "results" / f"{r}-s{s}.json").exists()]
    print(f"{len(todo)} run(s) to train ({len(runs) * len(seeds) - len(todo)} already done)", flush=True)
    from rich.progress import Progress

    with Progress() as bar, ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as ex:
        task = bar.add_task("runs", total=len(todo))
        futures = {ex.submit(run_one, r, s, cfg): (r, s) for r, s in todo}
        for fut in as_completed(futures):
            res = fut.result()
            (work / "results" / f"{res['run']}-s{res['seed']}.json").write_text(json.dumps(res, indent=1))
            lv = res["levels"]
            bar.console.print(f"{res['run']} seed {res['seed']}: PSNR-Y " + " / ".join(
                f"{lv[k]['psnr_y']:.2f}" for k in "123") + f" in {res['train_seconds']:.0f} s")
            bar.advance(task)

    results = [json.loads((work / "results" / f"{r}-s{s}.json").read_text()) for r in runs for s in seeds]
    for res in results:  # results written before this statistic existed: score it from the saved checkpoint
        if "mixing_true_v" not in res:
            from dasr_model.infer import load_checkpoint_model

            ckpt = work / "runs" / f"{res['run']}-s{res['seed']}" / f"ckpt-{a.steps}.pt"
            res["mixing_true_v"] = true_v_mixing(load_checkpoint_model(ckpt), cfg)
            (work / "results" / f"{res['run']}-s{res['seed']}.json").write_text(json.dumps(res, indent=1))
    machine = platform.processor() or platform.machine()
    print(f"\n# Expert study (benchmarks/expert_study.py), {datetime.date.today()}, {machine}")
    print(f"command: python benchmarks/expert_study.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{a.steps} steps, batch {a.batch}, LR crop {a.crop}, Adam {a.lr:g}, EMA {a.ema}, "
          f"{a.blocks} blocks x {a.features} features, held-out PSNR-Y mean (min-max over seeds)\n")
    print(summarise(results, runs))
    print("\nPredictor MAE of v_hat per block (held-out, all levels):\n")
    print(mae_table(results, runs))
    print("\n" + constant_mae(cfg))


def constant_mae(cfg: dict) -> str:
    """The MAE of a predictor that knows nothing: the per-entry median v of the training set, for every image."""
    import numpy as np
    import torch

    import degrade
    from dasr_model.data import block_mae

    train_v = np.stack([s.v for s in degrade.open_dataset(cfg["train"])])
    val_v = np.concatenate([np.stack([s.v for s in degrade.open_dataset(cfg[f"val{lv}"])]) for lv in (1, 2, 3)])
    guess = np.broadcast_to(np.median(train_v, axis=0), val_v.shape)
    mae = block_mae(torch.from_numpy(np.ascontiguousarray(guess)), torch.from_numpy(val_v))
    return "Reference, the training set's median v for every image: " + ", ".join(
        f"{k} {v:.4f}" for k, v in mae.items())


if __name__ == "__main__":
    main()
