"""dasr-train --cuda-graph: the step recorded once as a CUDA graph trains exactly as the eager step does.

On a CPU: the pieces the graph needs (the EMA from a device-side weight, autocast without its cache, an
optimiser state that resumes anywhere) give the eager step's numbers, and the refusals are clear. With
CUDA: the graphed step against the eager one, step by step, alone and inside the trainer."""

from __future__ import annotations

import copy
import functools
import json

import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402

from cli.train import main as train_cli  # noqa: E402
from dasr_model.checkpoints import load_checkpoint  # noqa: E402
from dasr_model.errors import DASRError  # noqa: E402
from dasr_model.graphstep import GraphedStep, plain_optimizer_state  # noqa: E402
from dasr_model.losses import UNetDiscriminatorSN  # noqa: E402
from dasr_model.model import DASR, DASRConfig  # noqa: E402
from dasr_model.train import (  # noqa: E402
    StepParts,
    TrainConfig,
    ema_decay_at,
    graphed_train_step,
    train,
    train_step,
)

from .conftest import make_small_dataset  # noqa: E402

SMALL = DASRConfig(num_experts=3, num_feat=8, num_block=1, predictor_feat=8)
cuda = pytest.mark.cuda  # skipped without a CUDA device (conftest.py)


@pytest.fixture
def deterministic_cudnn():
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = before


def _parts(device, gan: bool, seed: int = 0) -> tuple[StepParts, TrainConfig]:
    torch.manual_seed(seed)
    cfg = TrainConfig(shards="", out="", gan=gan, model=SMALL, lr=2e-3)
    model = DASR(cfg.model).to(device)
    disc = UNetDiscriminatorSN(num_feat=8).to(device) if gan else None
    parts = StepParts(net=model, model=model, ema=copy.deepcopy(model.generator).requires_grad_(False),
                      opt=torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas), disc=disc,
                      opt_d=torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas) if disc else None)
    return parts, cfg


def _batch(i: int, device, batch: int = 3, side: int = 8):
    g = torch.Generator().manual_seed(100 + i)
    lr = torch.rand(batch, 3, side, side, generator=g)
    hr = torch.rand(batch, 3, 4 * side, 4 * side, generator=g)
    return lr.to(device), hr.to(device), torch.rand(batch, 33, generator=g).to(device)


def _state(parts: StepParts) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in parts.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in parts.ema.state_dict().items()})
    if parts.disc is not None:
        out.update({f"disc.{k}": v for k, v in parts.disc.state_dict().items()})
    return out


@pytest.mark.parametrize("decay", [0.999, 0.1, 0.5, 0.75])
def test_ema_from_a_device_weight_equals_the_float_decay_bit_for_bit(decay):
    a, cfg = _parts("cpu", gan=False)
    b = copy.deepcopy(a)
    train_step(a, cfg, *_batch(0, "cpu"), False, ema_decay=decay)
    train_step(b, cfg, *_batch(0, "cpu"), False, ema_weight=torch.tensor(1 - decay))
    ema_a, ema_b = a.ema.state_dict(), b.ema.state_dict()
    assert any(not torch.equal(ema_a[k], a.model.generator.state_dict()[k]) for k in ema_a)  # a real lerp
    for name, tensor in ema_a.items():
        assert torch.equal(tensor, ema_b[name]), name


@pytest.mark.parametrize("gan", [False, True])
def test_autocast_without_its_cache_trains_alike(gan):
    """The generator's weights are each cast once per step: bit for bit. The discriminator's step runs it
    twice (real, fake): with the cache both share one bf16 cast, whose gradients meet in bf16; without it,
    two casts whose gradients meet in float32. So its weights agree to rounding, not bit for bit, and from
    the second step on so does the generator, which the discriminator's GAN term steers."""
    a, cfg = _parts("cpu", gan=gan)
    b = copy.deepcopy(a)
    for i in range(2):
        la = train_step(a, cfg, *_batch(i, "cpu"), True)
        lb = train_step(b, cfg, *_batch(i, "cpu"), True, autocast_cache=False)
        for k in la:
            if i == 0 or k not in ("loss", "gan", "discriminator"):  # step 2's GAN terms see step 1's D
                assert float(la[k]) == float(lb[k]), (i, k)
    sa, sb = _state(a), _state(b)
    for name, tensor in sa.items():
        if gan:
            torch.testing.assert_close(sb[name], tensor, rtol=0, atol=1e-5, msg=name)
        else:
            assert torch.equal(tensor, sb[name]), name


def test_a_graphed_runs_optimizer_state_is_saved_as_an_eager_one_and_resumes_on_a_cpu():
    a, cfg = _parts("cpu", gan=False)
    train_step(a, cfg, *_batch(0, "cpu"), False)
    for group in a.opt.param_groups:  # what a GraphedStep leaves in the groups (it cannot step on a CPU)
        group["lr"], group["capturable"] = torch.tensor(1e-3), True
    saved = plain_optimizer_state(a.opt.state_dict())
    assert all(type(g["lr"]) is float and g["lr"] == pytest.approx(1e-3) and g["capturable"] is False
               for g in saved["param_groups"])
    assert all(isinstance(g["lr"], torch.Tensor) for g in a.opt.param_groups)  # the live optimiser is untouched
    b, _ = _parts("cpu", gan=False)
    b.opt.load_state_dict(saved)
    train_step(b, cfg, *_batch(1, "cpu"), False)  # a capturable group would refuse a CPU here


def test_a_cuda_graph_is_refused_without_cuda(tmp_path):
    parts, cfg = _parts("cpu", gan=False)
    step = functools.partial(train_step, parts, cfg, bf16=False, autocast_cache=False)
    with pytest.raises(DASRError, match="needs a CUDA device"):
        GraphedStep(step, [parts.opt], torch.device("cpu"))
    shards = make_small_dataset(tmp_path / "ds", count=4, seed=1, shard_size=4)
    base = dict(shards=shards, steps=1, batch_size=2, lr_crop=8, workers=0, model=SMALL, cuda_graph=True)
    with pytest.raises(DASRError, match="--cuda-graph needs a CUDA device"):
        train(TrainConfig(out=str(tmp_path / "run"), device="cpu", **base))
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "run"), "--device", "cpu",
                                            "--cuda-graph", "--workers", "0"])
    assert result.exit_code != 0 and "--cuda-graph needs a CUDA device" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_auto_with_a_bf16_graph_takes_folded_channels_last_untimed_and_times_the_rest(monkeypatch):
    import dasr_model.train as train_module

    timed = []
    monkeypatch.setattr(train_module, "probe_expert_impls",
                        lambda parts, cfg, shape, bf16, candidates: timed.append(shape) or {("stacked", True): 0.001})
    cuda_device = torch.device("cuda")  # a name only: nothing runs on it here
    cfg = TrainConfig(shards="", out="", model=SMALL)
    assert train_module.choose_expert_impl(None, cfg, cuda_device, True, (8, 8), graphed=True) == ("folded", True, {})
    assert not timed
    # float32 steps: not measured graphed, so timed
    assert train_module.choose_expert_impl(None, cfg, cuda_device, False, (8, 8), graphed=True)[0] == "stacked"
    timed.clear()
    one = TrainConfig(shards="", out="", model=DASRConfig(num_experts=1, num_feat=8, num_block=1, predictor_feat=8))
    impl, cl, ms = train_module.choose_expert_impl(None, one, cuda_device, True, (8, 8), graphed=True)
    assert (impl, cl) == ("stacked", True) and timed  # K = 1: nothing measured with graphs, so timed eagerly
    assert train_module.choose_expert_impl(None, cfg, cuda_device, True, (8, 8))[0] == "stacked"  # no graph: timed


def test_cuda_graph_is_a_per_call_setting_a_resume_does_not_inherit():
    from cli.train import PER_CALL

    assert "cuda_graph" in PER_CALL


@cuda
@pytest.mark.parametrize("gan", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_graphed_step_trains_like_the_eager_step(gan, bf16, deterministic_cudnn):
    """The reference is the same GraphedStep that never records (its warm-up outlasts the run): the same
    step, optimiser settings (Adam capturable, its rate a tensor), EMA weight and side stream, run
    eagerly. So the graph alone differs, and with deterministic kernels the runs agree to 1e-6. (Against
    the plain eager step, with GAN, the weights differed by more than 1e-4 after 7 steps on an H200, in
    float32 and bf16, while this held: the eager setups differ there, not the graph.)"""
    device = torch.device("cuda")
    eager_parts, cfg = _parts(device, gan)
    graph_parts = copy.deepcopy(eager_parts)
    init = {k: v.clone() for k, v in _state(eager_parts).items()}
    eager = graphed_train_step(eager_parts, cfg, bf16, device, warmup=10**9)
    graphed = graphed_train_step(graph_parts, cfg, bf16, device)
    for i in range(7):  # 3 eager warm-up steps, the recording, then replays; the rate and decay change
        rate, decay = cfg.lr * (1 + i) / 7, ema_decay_at(i, cfg)
        lo = {k: float(v) for k, v in eager(*_batch(i, device), rate=rate, ema_decay=decay).items()}
        lg = {k: float(v) for k, v in graphed(*_batch(i, device), rate=rate, ema_decay=decay).items()}
        assert lg == pytest.approx(lo, rel=1e-5, abs=1e-7), i
    assert graphed.graph is not None and graphed.eager_steps == graphed.warmup and eager.graph is None
    a = _state(eager_parts)
    moved = max((a[k].float() - init[k].float()).abs().max().item() for k in a if k.startswith("model."))
    assert moved > 3e-3, f"the steps barely trained ({moved:.2g}): the comparison would say nothing"
    _assert_alike(eager_parts, graph_parts, 1e-6)
    steps = [s["step"] for s in graph_parts.opt.state.values()]
    assert all(s.device.type == "cuda" and float(s) == 7 for s in steps)


def _assert_alike(a: StepParts, b: StepParts, atol: float) -> None:
    sa, sb = _state(a), _state(b)
    for name, tensor in sa.items():
        torch.testing.assert_close(sb[name], tensor, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@cuda
def test_the_graphed_step_trains_like_the_plain_eager_step_without_gan(deterministic_cudnn):
    """Against the trainer's own eager step (Adam with a float rate, the default stream, autocast's cache):
    equal to rounding, which without the GAN term stays well inside 1e-4 over 7 steps (on an H200,
    2026-11-26; with GAN it did not, see above)."""
    device = torch.device("cuda")
    plain, cfg = _parts(device, gan=False)
    other = copy.deepcopy(plain)
    graphed = graphed_train_step(other, cfg, True, device)
    for i in range(7):
        rate, decay = cfg.lr * (1 + i) / 7, ema_decay_at(i, cfg)
        for group in plain.opt.param_groups:
            group["lr"] = rate
        train_step(plain, cfg, *_batch(i, device), True, ema_decay=decay)
        graphed(*_batch(i, device), rate=rate, ema_decay=decay)
    _assert_alike(plain, other, 1e-4)


@cuda
def test_a_batch_of_another_shape_runs_eagerly_after_the_recording_and_the_replays_go_on_right(deterministic_cudnn):
    """The eager step re-points the gradients (set_to_none); the graph must go on reading and updating its
    own, and train like the same sequence of steps run eagerly."""
    device = torch.device("cuda")
    parts, cfg = _parts(device, gan=False)
    ref_parts = copy.deepcopy(parts)
    graphed = graphed_train_step(parts, cfg, True, device, warmup=1)
    eager = graphed_train_step(ref_parts, cfg, True, device, warmup=10**9)
    batches = [_batch(0, device), _batch(1, device), _batch(2, device), _batch(3, device, batch=2),
               _batch(4, device), _batch(5, device)]
    for i, batch in enumerate(batches):
        got = graphed(*batch, rate=cfg.lr, ema_decay=0.999)
        want = eager(*batch, rate=cfg.lr, ema_decay=0.999)
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5, abs=1e-7), i
    assert graphed.graph is not None and graphed.eager_steps == 2  # the warm-up and the odd batch
    _assert_alike(ref_parts, parts, 1e-6)


@cuda
def test_dasr_train_cuda_graph_trains_like_eager_and_resumes_either_way(tmp_path, deterministic_cudnn):
    shards = make_small_dataset(tmp_path / "ds", count=12, seed=1, shard_size=12)
    # teacher steps 0-4: 3 eager, step 3 recorded, step 4 replayed; then a second graph: 5-7 eager, 8 recorded
    base = dict(shards=shards, steps=10, batch_size=3, lr_crop=8, workers=0, model=SMALL, device="cuda",
                ckpt_every=5, teacher_steps=5, lr=2e-3, expert_impl="grouped")
    train(TrainConfig(out=str(tmp_path / "eager"), cuda_graph=False, **base))
    train(TrainConfig(out=str(tmp_path / "graph"), cuda_graph=True, **base))
    train(TrainConfig(out=str(tmp_path / "half"), cuda_graph=True, **{**base, "steps": 9}))  # its last, 8, recorded
    train(TrainConfig(out=str(tmp_path / "half"), cuda_graph=False, **base), resume=True)  # graphed, then eager
    assert json.loads((tmp_path / "graph" / "config.json").read_text())["run"]["cuda_graph"] is True
    eager = load_checkpoint(tmp_path / "eager" / "ckpt-10.pt")
    graph = load_checkpoint(tmp_path / "graph" / "ckpt-10.pt")
    half = load_checkpoint(tmp_path / "half" / "ckpt-10.pt")
    for other in (graph, half):
        for key in ("model", "ema_generator"):
            for name, tensor in eager[key].items():
                torch.testing.assert_close(other[key][name], tensor, rtol=0, atol=1e-3, msg=f"{key} {name}")
    groups = load_checkpoint(tmp_path / "half" / "ckpt-9.pt")["optimizer"]["param_groups"]
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in groups)



@cuda
def test_dasr_train_cuda_graph_with_the_network_compiled_trains_like_eager(tmp_path, monkeypatch, deterministic_cudnn):
    """--compile default --cuda-graph: the compiled network's calls recorded inside the step's graph (dynamo's
    guards run once, at the recording; the replays skip them). Traced through aot_eager, which keeps the test
    short (inductor's own kernels in that graph are the speed run's net+graph rows)."""
    import dasr_model.train as train_module

    real_compile = torch.compile
    shards = make_small_dataset(tmp_path / "ds", count=12, seed=1, shard_size=12)
    base = dict(shards=shards, steps=6, batch_size=3, lr_crop=8, workers=0, model=SMALL, device="cuda", lr=2e-3,
                gan=True, expert_impl="folded", channels_last=True)
    train(TrainConfig(out=str(tmp_path / "eager"), cuda_graph=False, **base))
    monkeypatch.setattr(train_module.torch, "compile",
                        lambda net, mode=None, dynamic=None: real_compile(net, backend="aot_eager", dynamic=dynamic))
    torch._dynamo.reset()
    try:
        train(TrainConfig(out=str(tmp_path / "graph"), cuda_graph=True, compile="default", **base))
    finally:
        torch._dynamo.reset()
    eager, graph = load_checkpoint(tmp_path / "eager" / "ckpt-6.pt"), load_checkpoint(tmp_path / "graph" / "ckpt-6.pt")
    for key in ("model", "ema_generator", "discriminator"):
        for name, tensor in eager[key].items():
            torch.testing.assert_close(graph[key][name], tensor, rtol=0, atol=1e-3, msg=f"{key} {name}")


def test_by_default_a_cpu_run_trains_eagerly_and_records_that(tmp_path):
    shards = make_small_dataset(tmp_path / "ds", count=4, seed=1, shard_size=4)
    cfg = TrainConfig(shards=shards, out=str(tmp_path / "run"), steps=1, batch_size=2, lr_crop=8, workers=0,
                      model=SMALL, device="cpu")
    assert cfg.cuda_graph is None  # auto: on wherever it can be, which a CPU is not
    train(cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["cuda_graph"] is False


@cuda
def test_dasr_train_by_default_on_a_gpu_takes_folded_channels_last_and_the_graph(tmp_path, deterministic_cudnn):
    """The default GPU path: expert_impl auto and cuda_graph auto give folded in channels_last, graphed,
    without the eager probe; it trains like the same settings run eagerly."""
    shards = make_small_dataset(tmp_path / "ds", count=12, seed=1, shard_size=12)
    base = dict(shards=shards, steps=6, batch_size=3, lr_crop=8, workers=0, model=SMALL, device="cuda", lr=2e-3)
    notes: list[str] = []
    train(TrainConfig(out=str(tmp_path / "auto"), **base), notify=notes.append)
    train(TrainConfig(out=str(tmp_path / "eager"), expert_impl="folded", channels_last=True, cuda_graph=False,
                      **base))
    run = json.loads((tmp_path / "auto" / "config.json").read_text())["run"]
    assert (run["expert_impl"], run["memory_format"], run["cuda_graph"]) == ("folded", "channels_last", True)
    assert "expert_impl_probe_ms" not in run and any("not timed here" in n for n in notes)
    assert any("each step replayed from a CUDA graph" in n for n in notes)
    auto, eager = load_checkpoint(tmp_path / "auto" / "ckpt-6.pt"), load_checkpoint(tmp_path / "eager" / "ckpt-6.pt")
    for key in ("model", "ema_generator"):
        for name, tensor in eager[key].items():
            torch.testing.assert_close(auto[key][name], tensor, rtol=0, atol=1e-3, msg=f"{key} {name}")


def test_the_training_loop_drives_its_graph_with_each_steps_batch_rate_and_decay(tmp_path, monkeypatch):
    """The loop's side of --cuda-graph, on a CPU: GraphedStep replaced by a stand-in that runs the step it is
    given eagerly (the graph's own exactness is the CUDA tests' business). The loop must build one per
    teacher phase with the right step, hand it every step's batch, rate and EMA decay, and train exactly as
    the plain loop does: a warm-up-and-cosine schedule and the EMA warm-up make both change every step."""
    import dasr_model.train as train_module

    built, calls = [], []

    class EagerStandIn:
        def __init__(self, step, optimizers, device, *, warmup=3):
            self.step, self.optimizers = step, optimizers
            built.append(step.keywords)

        def __call__(self, *inputs, rate, ema_decay):
            calls.append((rate, ema_decay))
            for group in (g for o in self.optimizers for g in o.param_groups):
                group["lr"] = rate
            return self.step(*inputs, ema_weight=torch.tensor(1 - ema_decay))

    shards = make_small_dataset(tmp_path / "ds", count=8, seed=1, shard_size=8)
    base = dict(shards=shards, steps=6, batch_size=2, lr_crop=8, workers=0, model=SMALL, device="cpu", gan=True,
                teacher_steps=2, lr_schedule="cosine", warmup_steps=2, ckpt_every=6)
    train(TrainConfig(out=str(tmp_path / "plain"), **base))
    monkeypatch.setattr(train_module, "graph_possible", lambda *args: True)
    monkeypatch.setattr(train_module, "GraphedStep", EagerStandIn)
    notes: list[str] = []
    train(TrainConfig(out=str(tmp_path / "graph"), **base), notify=notes.append)
    assert [k["teacher"] for k in built] == [True, False]  # one per phase, rebuilt where the teacher ends
    assert all(k["autocast_cache"] is False and k["bf16"] is False for k in built)
    cfg = TrainConfig(**base, out="")
    assert calls == [(train_module.lr_at(i, cfg, 6), train_module.ema_decay_at(i, cfg)) for i in range(6)]
    assert len(set(calls)) == 6 and any("each step replayed from a CUDA graph" in n for n in notes)
    plain, graph = load_checkpoint(tmp_path / "plain" / "ckpt-6.pt"), load_checkpoint(tmp_path / "graph" / "ckpt-6.pt")
    for key in ("model", "ema_generator", "discriminator"):
        for name, tensor in plain[key].items():
            assert torch.equal(graph[key][name], tensor), f"{key} {name}"


def test_cuda_graph_holds_the_compiled_network_where_asked_and_auto_leaves_it_out(tmp_path, monkeypatch):
    """--cuda-graph with --compile default (or max-autotune-no-cudagraphs): the network's inductor kernels
    inside the whole-step graph, asked for only (auto graphs uncompiled steps alone; reduce-overhead and
    max-autotune, which record graphs of their own, are refused). On a CPU, with CUDA pretended for the
    choice, GraphedStep replaced by an eager stand-in and torch.compile tracing through aot_eager: the
    stand-in gets the compiled network, and the run trains as the plain eager one does (1e-6 after 3 steps)."""
    import dasr_model.train as train_module

    cuda_device = torch.device("cuda")  # a name only: nothing runs on it here
    assert [m for m in train_module.COMPILE_MODES if train_module.graph_possible(cuda_device, 1, m)] == [
        "off", "default", "max-autotune-no-cudagraphs"]
    assert not train_module.graph_possible(cuda_device, 2, "default")
    assert not train_module.graph_possible(torch.device("cpu"), 1, "default")

    nets = []

    class EagerStandIn:
        def __init__(self, step, optimizers, device, *, warmup=3):
            self.step, self.optimizers = step, optimizers
            nets.append(step.args[0].net)

        def __call__(self, *inputs, rate, ema_decay):
            for group in (g for o in self.optimizers for g in o.param_groups):
                group["lr"] = rate
            return self.step(*inputs, ema_weight=torch.tensor(1 - ema_decay))

    real_possible, real_compile = train_module.graph_possible, torch.compile
    shards = make_small_dataset(tmp_path / "ds", count=8, seed=1, shard_size=8)
    base = dict(shards=shards, steps=3, batch_size=2, lr_crop=8, workers=0, model=SMALL, device="cpu")
    train(TrainConfig(out=str(tmp_path / "plain"), **base))
    monkeypatch.setattr(train_module, "graph_possible", lambda device, world, mode: real_possible(cuda_device, world,
                                                                                                  mode))
    monkeypatch.setattr(train_module, "GraphedStep", EagerStandIn)
    monkeypatch.setattr(train_module.torch, "compile",
                        lambda net, mode=None, dynamic=None: real_compile(net, backend="aot_eager", dynamic=dynamic))
    torch._dynamo.reset()
    try:
        train(TrainConfig(out=str(tmp_path / "auto"), compile="default", **base))  # auto: no graph with compile
        assert nets == []
        assert json.loads((tmp_path / "auto" / "config.json").read_text())["run"]["cuda_graph"] is False
        train(TrainConfig(out=str(tmp_path / "graph"), compile="default", cuda_graph=True, **base))
        for mode in ("reduce-overhead", "max-autotune"):
            with pytest.raises(DASRError, match=rf"^--cuda-graph needs --compile off, default or "
                                                rf"max-autotune-no-cudagraphs \({mode} records CUDA graphs of its"):
                train(TrainConfig(out=str(tmp_path / mode), compile=mode, cuda_graph=True, **base))
    finally:
        torch._dynamo.reset()
    assert len(nets) == 1 and isinstance(nets[0], torch._dynamo.eval_frame.OptimizedModule)
    assert json.loads((tmp_path / "graph" / "config.json").read_text())["run"]["cuda_graph"] is True
    plain, graph = load_checkpoint(tmp_path / "plain" / "ckpt-3.pt"), load_checkpoint(tmp_path / "graph" / "ckpt-3.pt")
    for key in ("model", "ema_generator"):
        for name, tensor in plain[key].items():
            torch.testing.assert_close(graph[key][name], tensor, rtol=0, atol=1e-6, msg=f"{key} {name}")
