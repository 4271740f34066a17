"""The DASR training loop (spec model.md section 4), readable top to bottom.

Losses: L1(SR, unsharp-masked GT) + L1(v_hat, v), weights 1 and 1; optionally + 0.1 GAN (U-Net SN
discriminator, `gan`) and + 1 perceptual (VGG19, only when a local weights file is given). Adam (1e-4,
betas 0.9/0.99) over G, P and the mapping net together; EMA 0.999 of G. bf16 autocast on CUDA,
float32 on CPU. Batches are a pure function of (seed, step) (dasr_model.data), so `resume` continues
exactly. Under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel and each
rank takes its slice of the global batch; rank 0 writes metrics and checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dasr_model.data import PairedShards, StepBatchSampler, block_mae, unsharp_mask
from dasr_model.infer import MODEL_FILE, export_model, to_image
from dasr_model.metrics import psnr_y
from dasr_model.losses import UNetDiscriminatorSN, VGGPerceptualLoss, gan_loss
from dasr_model.model import DASR, DASRConfig, set_expert_impl


@dataclass(frozen=True)
class TrainConfig:
    shards: str
    out: str
    steps: int = 1000
    batch_size: int = 16
    lr_crop: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    pixel_weight: float = 1.0
    regression_weight: float = 1.0
    ema_decay: float = 0.999
    teacher_steps: int = 0  # steps at the start whose expert mix comes from the true v, not v_hat
    sharpen_gt: bool = True
    val_shards: str | None = None
    val_every: int = 500
    val_samples: int = 64
    ckpt_every: int = 1000
    max_minutes: float | None = None  # wall-clock budget of this invocation: save and stop when spent
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    gan: bool = False
    gan_weight: float = 0.1
    vgg_weights: str | None = None
    perceptual_weight: float = 1.0
    expert_impl: str = "grouped"  # how expert convs compute (model.set_expert_impl); exact either way
    model: DASRConfig = field(default_factory=DASRConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["model"] = DASRConfig(**d["model"])
        d["betas"] = tuple(d["betas"])
        return cls(**d)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_checkpoint(path: Path, cfg: TrainConfig, model: DASR, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                    step: int, disc: torch.nn.Module | None = None, opt_d: torch.optim.Optimizer | None = None) -> None:
    """Everything to continue exactly: config, weights, EMA, optimisers, step (the data is keyed by step)."""
    tmp = path.with_suffix(".tmp")
    state = {"config": cfg.to_dict(), "model": model.state_dict(), "ema_generator": ema.state_dict(),
             "optimizer": opt.state_dict(), "step": step, "torch_rng": torch.get_rng_state()}
    if disc is not None and opt_d is not None:
        state["discriminator"], state["optimizer_d"] = disc.state_dict(), opt_d.state_dict()
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_step(path: Path) -> int:
    """The step of RUN/ckpt-STEP.pt."""
    return int(path.stem.split("-")[1])


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(out.glob("ckpt-*.pt"), key=checkpoint_step)
    return ckpts[-1] if ckpts else None


@torch.no_grad()
def validate(model: DASR, ema_generator: torch.nn.Module, val: PairedShards, device: torch.device,
             n: int) -> dict[str, Any]:
    """PSNR-Y (4-px crop) per level of the EMA generator, bicubic PSNR, and predictor MAE per block."""
    model.eval()
    psnr: dict[int, list[float]] = {1: [], 2: [], 3: []}
    bicubic: dict[int, list[float]] = {1: [], 2: [], 3: []}
    v_hats, vs = [], []
    for i in range(min(n, len(val))):
        item = val[(0, 0, i)]
        lr, hr = item["lr"][None].to(device), item["hr"][None].to(device)
        v_hat, a = model.predict(lr)
        sr = ema_generator(lr, a)
        level = int(item["level"])
        hr_img = to_image(hr)
        psnr[level].append(psnr_y(to_image(sr), hr_img))
        bic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
        bicubic[level].append(psnr_y(to_image(bic), hr_img))
        v_hats.append(v_hat.cpu())
        vs.append(item["v"][None])
    model.train()
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "psnr_y": {str(k): mean(v) for k, v in psnr.items() if v},
        "bicubic_psnr_y": {str(k): mean(v) for k, v in bicubic.items() if v},
        "mae": block_mae(torch.cat(v_hats), torch.cat(vs)),
    }


def train(cfg: TrainConfig, *, resume: bool = False,
          progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train as `cfg` says; returns the last metrics. Ctrl-C (SIGINT) or the `max_minutes` budget saves a
    checkpoint, then stops. The last step also writes RUN/model.pt (predictor + EMA generator, bf16)."""
    out = Path(cfg.out)
    if not resume and (latest_checkpoint(out) is not None or (out / "metrics.jsonl").exists()):
        raise ValueError(f"{out} already holds a run; continue it with --resume or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    use_bf16 = device.type == "cuda"
    main_rank = rank == 0

    # --- model, EMA, optimisers (or their state from the latest checkpoint) ---
    torch.manual_seed(cfg.seed)
    model = set_expert_impl(DASR(cfg.model), cfg.expert_impl).to(device)
    ema = copy.deepcopy(model.generator).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    disc = UNetDiscriminatorSN().to(device) if cfg.gan else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas) if disc is not None else None
    perceptual = VGGPerceptualLoss(cfg.vgg_weights).to(device) if cfg.vgg_weights else None
    step = 0
    ckpt_path = latest_checkpoint(out) if resume else None
    if resume and ckpt_path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        if TrainConfig.from_dict(ckpt["config"]).model != cfg.model:
            raise ValueError(f"{ckpt_path}: the checkpoint's model config differs from this run's")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema_generator"])
        opt.load_state_dict(ckpt["optimizer"])
        if disc is not None and opt_d is not None:
            if "discriminator" not in ckpt:
                raise ValueError(f"{ckpt_path}: no discriminator in the checkpoint; resume without --gan")
            disc.load_state_dict(ckpt["discriminator"])
            opt_d.load_state_dict(ckpt["optimizer_d"])
        torch.set_rng_state(ckpt["torch_rng"])
        step = int(ckpt["step"])
    if main_rank:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
        if disc is not None:
            disc = DistributedDataParallel(disc)
    parts = StepParts(net=net, model=model, ema=ema, opt=opt, disc=disc, opt_d=opt_d, perceptual=perceptual)

    # --- data: batches keyed by step, each rank its slice ---
    train_set = PairedShards(cfg.shards, lr_crop=cfg.lr_crop, seed=cfg.seed)
    val_set = PairedShards(cfg.val_shards, lr_crop=None, augment=False) if cfg.val_shards and main_rank else None
    sampler = StepBatchSampler(len(train_set), cfg.batch_size, start=step, stop=cfg.steps, seed=cfg.seed,
                               rank=rank, world_size=world)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)

    stop = {"now": False}
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # finish the step, save, then stop
        stop["now"] = True

    signal.signal(signal.SIGINT, on_sigint)
    metrics_file = open(out / "metrics.jsonl", "a") if main_rank else open(os.devnull, "w")
    last: dict[str, Any] = {}
    t0, seen = time.perf_counter(), 0
    try:
        for batch in loader:
            lr_img = batch["lr"].to(device, non_blocking=True)
            hr = batch["hr"].to(device, non_blocking=True)
            v = batch["v"].to(device, non_blocking=True)
            target = unsharp_mask(hr) if cfg.sharpen_gt else hr

            losses = train_step(parts, cfg, lr_img, target, v, use_bf16, teacher=step < cfg.teacher_steps)
            if not math.isfinite(losses["loss"]):
                raise FloatingPointError(f"loss became {losses['loss']} at step {step}")
            step += 1
            seen += lr_img.shape[0]

            last = {"step": step, **losses, "samples_per_s": seen / (time.perf_counter() - t0)}
            if val_set is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                last["val"] = validate(model, ema, val_set, device, cfg.val_samples)
            if main_rank:
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
            if progress:
                progress(step, last)
            if cfg.max_minutes is not None and time.perf_counter() - t0 >= 60 * cfg.max_minutes:
                stop["now"] = True
            final = step == cfg.steps or stop["now"]
            if main_rank and (step % cfg.ckpt_every == 0 or final):
                save_checkpoint(out / f"ckpt-{step}.pt", cfg, model, ema, opt, step,
                                _unwrap(disc) if disc is not None else None, opt_d)
            if main_rank and final:
                export_model(model, ema, out / MODEL_FILE)
            if stop["now"]:
                break
    finally:
        metrics_file.close()
        signal.signal(signal.SIGINT, previous)
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return last


@dataclass
class StepParts:
    """What one optimisation step touches. `net` is `model`, or its DistributedDataParallel wrapper."""

    net: torch.nn.Module
    model: DASR
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    disc: torch.nn.Module | None = None
    opt_d: torch.optim.Optimizer | None = None
    perceptual: torch.nn.Module | None = None


def train_step(p: StepParts, cfg: TrainConfig, lr: torch.Tensor, target: torch.Tensor, v: torch.Tensor,
               bf16: bool, *, teacher: bool = False) -> dict[str, float]:
    """One step: G (and P) on L1 + regression (+ perceptual, + GAN), then D, then the EMA of G.

    lr (B, 3, h, w), target (B, 3, 4h, 4w), v (B, 33), all on the device. `teacher`: the expert mix
    comes from the true v (the predictor still learns v from the regression term). Returns the loss terms.
    """
    device_type = lr.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        sr, v_hat = p.net(lr, return_v=True, v_mix=v if teacher else None)
        sr, v_hat = sr.float(), v_hat.float()
        terms = {"l1": F.l1_loss(sr, target), "regression": F.l1_loss(v_hat, v)}
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
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            d_loss = gan_loss(p.disc(target).float(), real=True) + gan_loss(p.disc(sr.detach()).float(), real=False)
        p.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        p.opt_d.step()
        terms["discriminator"] = d_loss
    with torch.no_grad():
        for pe, pm in zip(p.ema.parameters(), p.model.generator.parameters()):
            pe.lerp_(pm, 1 - cfg.ema_decay)
    return {"loss": float(loss.detach()), **{k: float(t.detach()) for k, t in terms.items()}}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)
