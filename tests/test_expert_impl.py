"""Expert convolutions: the "dense", "stacked" and "bmm" strategies against the "grouped" reference, and the per-image
fused plain generator of inference.

Tolerances (all strategies are exact in real arithmetic; convolution is linear in its weights, so only
float rounding differs): every float32 result x is compared with the grouped result r as
max|x - r| <= 1e-5 * max|r| (REL32), elementwise over the whole tensor; in float64 the bound is 1e-12
(REL64), which shows the agreement is not a tolerance hiding a real difference. Whole networks in float32
keep the absolute 1e-5 of tests/test_model.py (outputs are images in about [0, 1]).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from dasr_model.errors import DASRError  # noqa: E402
from dasr_model.infer import fuse_experts, super_resolve  # noqa: E402
from dasr_model.model import DASR, EXPERT_IMPLS, DASRConfig, ExpertConv2d, MSRResNet, set_expert_impl  # noqa: E402
from dasr_model.release import load_release_weights  # noqa: E402

from .test_model import _reference, _release_state_dicts  # noqa: E402

REL32, REL64 = 1e-5, 1e-12
OTHERS = [impl for impl in EXPERT_IMPLS if impl != "grouped"]
TINY = DASRConfig(num_experts=5, num_feat=8, num_block=2, predictor_feat=8, mapping_gain=1.0)


def assert_rel_close(x, ref, rel: float, what: str = "") -> None:
    scale = ref.abs().max().item()
    err = (x - ref).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max|diff| {err:.3g} > {rel:g} * max|ref| ({scale:.3g})"


def _conv_and_grads(conv: ExpertConv2d, x, a, g):
    """Output of conv(x, a) and the gradients of <out, g> w.r.t. x, weight, bias and a."""
    conv.zero_grad(set_to_none=True)
    x, a = x.detach().requires_grad_(True), a.detach().requires_grad_(True)
    out = conv(x, a)
    (out * g).sum().backward()
    return {"out": out.detach(), "x": x.grad, "weight": conv.weight.grad, "bias": conv.bias.grad, "a": a.grad}


def _case(k, n, c_in, c_out, h, w, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = ExpertConv2d(c_in, c_out, num_experts=k).to(dtype)
    with torch.no_grad():  # non-zero biases, so their mixing is tested too
        conv.bias.copy_(torch.randn(k, c_out, generator=gen, dtype=dtype))
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=dtype)
    a = torch.randn(n, k, generator=gen, dtype=dtype)  # signed and not summing to 1: the linear mapping allows both
    g = torch.randn(n, c_out, h, w, generator=gen, dtype=dtype)
    return conv, x, a, g


SHAPES = [  # (K, N, in, out, H, W): K = 1 and 5, batch 1 and 3, non-square images, in != out
    (1, 1, 3, 8, 5, 9),
    (1, 3, 4, 6, 7, 11),
    (5, 1, 8, 3, 6, 4),
    (5, 3, 4, 6, 7, 11),
    (5, 3, 3, 16, 1, 13),
]


@pytest.mark.parametrize("impl", OTHERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K{}-N{}-{}to{}-{}x{}".format(*s))
def test_strategies_match_grouped_forward_and_gradients(impl, shape):
    conv, x, a, g = _case(*shape, dtype=torch.float32)
    ref = _conv_and_grads(conv, x, a, g)
    conv.impl = impl
    got = _conv_and_grads(conv, x, a, g)
    for name in ref:
        assert got[name].shape == ref[name].shape
        assert_rel_close(got[name], ref[name], REL32, f"{impl} {name}")


@pytest.mark.parametrize("impl", OTHERS)
def test_strategies_are_exact_in_float64(impl):
    conv, x, a, g = _case(5, 3, 4, 6, 7, 11, dtype=torch.float64, seed=1)
    ref = _conv_and_grads(conv, x, a, g)
    conv.impl = impl
    got = _conv_and_grads(conv, x, a, g)
    for name in ref:
        assert_rel_close(got[name], ref[name], REL64, f"{impl} {name}")


@pytest.mark.parametrize("align", [8, 16])
def test_dense_padded_to_aligned_channels_is_grouped(monkeypatch, align):
    """On CUDA "dense" computes its K*out channels padded to a multiple of 8 (dense_alignment), zero weights
    sliced off: here forced on the CPU. The K=5, out=3 layer (15 channels, the generator's last) and an
    aligned one: output and gradients as grouped's in float64, channels_last kept, and in float32 on both
    layouts; the padding's zeros get no gradient of their own (the parameters keep their shapes)."""
    import dasr_model.model as m

    monkeypatch.setattr(m, "dense_alignment", lambda x: align)
    computed = []  # the output channels the dense convolution computes
    real_conv2d = m.F.conv2d
    monkeypatch.setattr(m.F, "conv2d", lambda x, w, *args, **kw: computed.append(w.shape[0]) or
                        real_conv2d(x, w, *args, **kw))
    for shape in ((5, 3, 8, 3, 6, 7), (5, 2, 4, 16, 5, 9)):
        for dtype, rel in ((torch.float64, REL64), (torch.float32, REL32)):
            conv, x, a, g = _case(*shape, dtype=dtype, seed=3)
            ref = _conv_and_grads(conv, x, a, g)
            conv.impl = "dense"
            for fmt in (torch.contiguous_format, torch.channels_last):
                computed.clear()
                got = _conv_and_grads(conv, x.contiguous(memory_format=fmt), a, g)
                assert computed == [-(-shape[0] * shape[3] // align) * align]  # K*out rounded up: padded
                assert got["out"].is_contiguous(memory_format=fmt)
                for name in ref:
                    assert got[name].shape == ref[name].shape
                    assert_rel_close(got[name], ref[name], rel, f"dense aligned to {align}, {shape}, {name}")


@pytest.mark.parametrize("impl", ["dense", "stacked"])
def test_dense_strategies_keep_channels_last(impl):
    conv, x, a, g = _case(5, 3, 4, 6, 7, 11, dtype=torch.float32, seed=2)
    ref = _conv_and_grads(conv, x, a, g)
    conv.impl = impl
    x_cl = x.contiguous(memory_format=torch.channels_last)
    got = _conv_and_grads(conv, x_cl, a, g)
    assert got["out"].is_contiguous(memory_format=torch.channels_last)
    assert got["x"].is_contiguous(memory_format=torch.channels_last)
    for name in ref:
        assert_rel_close(got[name], ref[name], REL32, f"{impl} channels_last {name}")


@pytest.mark.parametrize("impl", EXPERT_IMPLS)
def test_strategies_run_under_bf16_autocast(impl):
    """Training runs under bf16 autocast on CUDA; here CPU autocast checks the dtypes fit together and the
    result stays within bf16 rounding (8 mantissa bits: 3e-2 of the magnitude) of the float32 reference."""
    conv, x, a, g = _case(5, 3, 16, 16, 7, 11, dtype=torch.float32, seed=3)
    ref = _conv_and_grads(conv, x, a, g)
    conv.impl = impl
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _conv_and_grads(conv, x, a, g)
    for name in ref:
        assert got[name].dtype == ref[name].dtype or name == "out"
        assert_rel_close(got[name].float(), ref[name], 3e-2, f"bf16 {impl} {name}")


def test_the_switch_changes_no_parameters_and_refuses_unknown_names():
    model = DASR(TINY)
    keys = {k: t.shape for k, t in model.state_dict().items()}
    assert {m.impl for m in model.modules() if isinstance(m, ExpertConv2d)} == {"grouped"}  # the default
    for impl in EXPERT_IMPLS:
        assert set_expert_impl(model, impl) is model
        assert {m.impl for m in model.modules() if isinstance(m, ExpertConv2d)} == {impl}
        assert {k: t.shape for k, t in model.state_dict().items()} == keys
        assert copy.deepcopy(model.generator).conv_first.impl == impl  # the EMA copy keeps it
    with pytest.raises(ValueError, match="expert impl"):
        set_expert_impl(model, "winograd")
    with pytest.raises(ValueError, match="expert impl"):
        model.generator.conv_last.impl = "fft"


@pytest.mark.parametrize("experts", [1, 5])
def test_whole_model_same_output_and_gradients_with_every_strategy(experts):
    """Outputs in float32; gradients in float64. A whole network's float32 gradients are not a fair test:
    a leaky-ReLU input whose true value is 2e-10 (there is one in upconv2 here) comes out with either sign
    under float32 rounding, and that pixel's gradient then differs 10x, whatever the strategy (it happens
    to one of them with this seed). Layer by layer, float32 gradients are compared above."""
    torch.manual_seed(0)
    model = DASR(DASRConfig(num_experts=experts, num_feat=8, num_block=2, predictor_feat=8, mapping_gain=1.0))
    lr, hr = torch.rand(3, 3, 9, 13), torch.rand(3, 3, 36, 52)

    def run(impl, dtype):
        set_expert_impl(model.to(dtype), impl)
        model.zero_grad(set_to_none=True)
        sr, v_hat = model(lr.to(dtype), return_v=True)
        (F.l1_loss(sr, hr.to(dtype)) + F.l1_loss(v_hat, torch.full_like(v_hat, 0.5))).backward()
        return sr.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    ref_sr = run("grouped", torch.float32)[0]
    ref_grads = run("grouped", torch.float64)[1]
    for impl in OTHERS:
        torch.testing.assert_close(run(impl, torch.float32)[0], ref_sr, rtol=0, atol=1e-5)
        for k, grad in run(impl, torch.float64)[1].items():
            assert_rel_close(grad, ref_grads[k], REL64, f"{impl} grad {k}")


@pytest.fixture(scope="module")
def release():
    """Release-layout weights, an LR batch and the independent per-sample reference output of
    tests/test_model.py (computed once: it is the slow part)."""
    gs, ps = _release_state_dicts()
    lr = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return gs, ps, lr, _reference(gs, ps, lr)


@pytest.mark.parametrize("impl", OTHERS)
def test_release_weights_give_the_release_output_with_every_strategy(impl, release):
    """The full released architecture (16 blocks, 64 features, 5 experts) against the independent
    reference, at the tolerance of tests/test_model.py (which checks "grouped")."""
    gs, ps, lr, expected = release
    model = set_expert_impl(load_release_weights(gs, ps).eval(), impl)
    with torch.no_grad():
        torch.testing.assert_close(model(lr), expected, rtol=0, atol=1e-5)


# --- inference: the experts fused once per image into a plain network ---

@pytest.mark.parametrize("experts", [1, 5])
def test_fused_generator_equals_the_expert_generator(experts):
    torch.manual_seed(0)
    model = DASR(DASRConfig(num_experts=experts, num_feat=8, num_block=2, predictor_feat=8, mapping_gain=1.0)).eval()
    lr = torch.rand(1, 3, 11, 7)
    with torch.no_grad():
        _, a = model.predict(lr)
        a = a + torch.randn_like(a)  # any mix, not only a predicted one
        fused = fuse_experts(model, a)
        torch.testing.assert_close(fused(lr), model.sr(lr, a), rtol=0, atol=1e-5)
        # One mix for several images: the plain net takes any batch.
        two = torch.rand(2, 3, 6, 10)
        torch.testing.assert_close(fused(two), model.sr(two, a.expand(2, -1)), rtol=0, atol=1e-5)
    assert isinstance(fused, MSRResNet) and not fused.training
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 * 2 + 5 and all(type(m) is torch.nn.Conv2d for m in convs)
    assert not any(isinstance(m, ExpertConv2d) for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    # The same module names as the expert generator, with one expert's shapes.
    expert_shapes = {k: t.shape[1:] for k, t in model.generator.state_dict().items()}
    assert {k: t.shape for k, t in fused.state_dict().items()} == expert_shapes


def test_fused_release_generator_gives_the_release_output(release):
    gs, ps, lr, expected = release
    model = load_release_weights(gs, ps).eval()
    with torch.no_grad():
        _, a = model.predict(lr)
        for i in range(lr.shape[0]):  # each image with its own mix
            torch.testing.assert_close(fuse_experts(model, a[i : i + 1])(lr[i : i + 1]), expected[i : i + 1],
                                       rtol=0, atol=1e-5)


def test_fuse_takes_one_mix():
    model = DASR(TINY)
    with pytest.raises(ValueError, match="one image's mix"):
        model.generator.fuse(torch.rand(2, 5))
    with pytest.raises(ValueError, match="one image's mix"):
        model.generator.fuse(torch.rand(1, 4))
    model.generator.fuse(torch.rand(5))  # (K,) is one mix too


def test_fuse_into_an_existing_network_overwrites_every_weight():
    """fuse(a, into=net) gives the network a fresh fuse builds, whatever net held (another model's mix,
    bf16, channels_last); a network of another size is refused."""
    torch.manual_seed(0)
    cfg = DASRConfig(num_experts=3, num_feat=8, num_block=2, predictor_feat=8)
    one, two = DASR(cfg).eval(), DASR(cfg).eval()
    a1, a2 = torch.rand(1, 3), torch.rand(1, 3)
    net = one.generator.fuse(a1)
    assert two.generator.fuse(a2, into=net) is net
    fresh = two.generator.fuse(a2)
    for (name, got), (_, want) in zip(net.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(got, want), name
    low = fuse_experts(one, a1, dtype=torch.bfloat16, channels_last=True)
    two.generator.fuse(a2, into=low)
    assert low.conv_first.weight.dtype == torch.bfloat16
    assert low.body[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for (name, got), (_, want) in zip(low.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(got, want.to(torch.bfloat16)), name
    wide = fuse_experts(one, a1, channels_last=True)  # float32 channels_last: summed aside, then copied
    assert two.generator.fuse(a2, into=wide).body[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for (name, got), (_, want) in zip(wide.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(got, want), name
    other = DASR(DASRConfig(num_experts=3, num_feat=8, num_block=3, predictor_feat=8)).generator.fuse(a1)
    with pytest.raises(ValueError, match="3 blocks x 8 features for one of 2 x 8"):
        one.generator.fuse(a1, into=other)


def test_the_fused_network_is_reused_per_thread_and_never_mixes_models():
    """super_resolve / dasr-eval build one plain network per thread and size, dtype and layout, and
    overwrite it for the next image: two models and mixes in turn, and two threads at once, each get
    their own model's output."""
    import threading

    import dasr_model.infer as infer

    torch.manual_seed(1)
    cfg = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8)
    models = [DASR(cfg).eval(), DASR(cfg).eval()]
    lr = torch.rand(1, 3, 9, 10)
    mixes = [torch.rand(1, 2), torch.rand(1, 2)]
    with torch.no_grad():
        want = [m.sr(lr, a) for m, a in zip(models, mixes)]
        nets = []
        for i in (0, 1, 0, 1):
            with infer.reused_fused_net(models[i], mixes[i]) as net:
                nets.append(net)
            torch.testing.assert_close(super_resolve(models[i], lr, mixes[i]), want[i], rtol=0, atol=1e-5)
        assert all(n is nets[0] for n in nets)  # built once
        with infer.reused_fused_net(models[0], mixes[0], dtype=torch.bfloat16) as net:
            assert net is not nets[0]  # another key
        results: dict[int, list[bool]] = {0: [], 1: []}

        def run(i: int) -> None:
            with torch.no_grad():
                for _ in range(20):
                    out = super_resolve(models[i], lr, mixes[i])
                    results[i].append(bool((out - want[i]).abs().max() <= 1e-5))

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert results == {0: [True] * 20, 1: [True] * 20}


def test_fuse_reads_nothing_back_and_follows_the_weights_as_they_change():
    """The fuse keeps a on the device: nothing reads a value back to the host (.tolist(), .item(), float():
    on a GPU a wait, and no CUDA graph could record it; and the operator behind them on a device). It
    follows every change of the weights and modules: in place (an optimiser step, or through .data, which
    leaves the version alone), weights not contiguous, a new dtype, a replaced layer on either side, the
    same network fused in and out of inference mode, a network's parameters partly frozen."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    read_back = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__,
                 torch.Tensor.__bool__, torch.Tensor.numpy}

    class NoReadBack(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            assert func not in read_back, f"a value read back to the host: {func.__name__}"
            return func(*args, **(kwargs or {}))

    class NoScalarOp(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func is not torch.ops.aten._local_scalar_dense.default, "a value read back to the host"
            return func(*args, **(kwargs or {}))

    torch.manual_seed(3)
    model = DASR(DASRConfig(num_experts=3, num_feat=8, num_block=2, predictor_feat=8)).eval()
    lr, a = torch.rand(1, 3, 9, 8), torch.rand(1, 3)
    gen = model.generator
    with torch.no_grad():
        net = gen.fuse(a)
        with NoReadBack(), NoScalarOp():
            assert gen.fuse(a, into=net) is net
        meta = copy.deepcopy(gen).to("meta")  # no values at all: any read-back, copy to the host or sync raises
        meta.fuse(a.to("meta"), into=meta.fuse(a.to("meta")))
        torch.testing.assert_close(net(lr), model.sr(lr, a), rtol=0, atol=1e-5)
        gen.conv_first.weight.data.mul_(3)  # .data: the parameter's version stays
        gen.body[1].conv2.bias.add_(0.5)
        torch.testing.assert_close(gen.fuse(a, into=net)(lr), model.sr(lr, a), rtol=0, atol=1e-5)
        gen.to(memory_format=torch.channels_last_3d)  # the 5-D expert weights no longer contiguous
        torch.testing.assert_close(gen.fuse(a, into=net)(lr), model.sr(lr, a), rtol=0, atol=1e-5)
        gen.conv_last = DASR(DASRConfig(num_experts=3, num_feat=8, num_block=2, predictor_feat=8)).generator.conv_last
        net.body[0].conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)  # a fresh layer in the network, trainable
        net.train()
        with torch.inference_mode():
            torch.testing.assert_close(gen.fuse(a, into=net)(lr), model.sr(lr, a), rtol=0, atol=1e-5)
        torch.testing.assert_close(gen.fuse(a, into=net)(lr), model.sr(lr, a), rtol=0, atol=1e-5)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        model.double()  # new storage
        torch.testing.assert_close(gen.fuse(a.double())(lr.double()), model.sr(lr.double(), a.double()), rtol=0,
                                   atol=1e-12)


def test_a_plain_network_built_without_a_device_is_on_the_default_device():
    """MSRResNet's convolutions skip their init (fuse writes every weight) by building on the meta device
    first: without a device it must still land on torch's default device (the CPU), not stay meta (where a
    fuse wrote nothing); a device given is kept."""
    assert {p.device.type for p in MSRResNet(num_feat=8, num_block=1).parameters()} == {"cpu"}
    assert {p.device.type for p in MSRResNet(num_feat=8, num_block=1, device="meta").parameters()} == {"meta"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_fuse_into_a_network_of_mixed_dtypes_fills_each(device):
    """A bf16 network with one float32 layer: every weight gets the mix in its own dtype (CUDA's multi-tensor
    copy took the first one's for all in torch 2.4-2.10; the CPU's never did, so the CUDA case is the test)."""
    torch.manual_seed(4)
    model = DASR(DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8)).to(device).eval()
    a = torch.rand(1, 2, device=device)
    with torch.no_grad():
        net = model.generator.fuse(a).to(torch.bfloat16)
        net.conv_last = torch.nn.Conv2d(8, 3, 3, padding=1, device=device)  # float32 beside bf16
        model.generator.fuse(a, into=net)
        want = model.generator.fuse(a)
        for (name, got), (_, ref) in zip(net.state_dict().items(), want.state_dict().items(), strict=True):
            assert got.dtype == (torch.float32 if name.startswith("conv_last") else torch.bfloat16)
            assert torch.equal(got, ref.to(got.dtype)), name


def test_a_reused_network_in_use_is_never_overwritten_by_a_nested_call():
    """upscale's on_tile runs between tiles while the thread's network is in use: a callback that fuses
    another model (same size) gets a network of its own, and the outer image keeps its weights."""
    from dasr_model.infer import upscale

    torch.manual_seed(2)
    cfg = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8)
    outer, inner = DASR(cfg).eval(), DASR(cfg).eval()
    with torch.no_grad():
        for p in inner.generator.parameters():
            p.mul_(8)  # a visibly different network
    img = np.random.default_rng(0).random((20, 20, 3)).astype(np.float32)
    want, _ = upscale(outer, img, tile=8)
    got, _ = upscale(outer, img, tile=8, on_tile=lambda done, total: upscale(inner, img, tile=8))
    assert np.array_equal(got, want)


def test_the_reused_network_follows_inference_mode():
    """A network first built inside torch.inference_mode cannot be written outside it; the thread gets one
    for each mode, in either order."""
    import dasr_model.infer as infer

    torch.manual_seed(3)
    model = DASR(DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8)).eval()
    lr, a = torch.rand(1, 3, 6, 6), torch.rand(1, 2)
    with torch.no_grad():
        want = model.sr(lr, a)
    for first_inference in (True, False):
        infer._REUSED.entry = None  # the thread's network from earlier tests must not decide the first mode
        for inference in (first_inference, not first_inference):
            with torch.inference_mode(inference), torch.no_grad():
                torch.testing.assert_close(super_resolve(model, lr, a), want, rtol=0, atol=1e-5)


def test_a_bf16_model_is_fused_in_float32():
    """The sums run in float32 whatever the model's dtype, then round once, as the einsum did: a bf16 model
    fuses to its float32 twin's network rounded to bf16, within one bf16 step of it."""
    torch.manual_seed(4)
    model = DASR(DASRConfig(num_experts=5, num_feat=16, num_block=2, predictor_feat=8)).eval()
    a = torch.softmax(torch.randn(1, 5), 1)
    low = DASR(model.config).eval()
    low.load_state_dict(model.state_dict())
    low.generator.to(torch.bfloat16)
    twin = DASR(model.config).eval()  # float32 holding exactly the bf16 weights
    twin.generator.load_state_dict({k: v.float() for k, v in low.generator.state_dict().items()})
    got = low.generator.fuse(a.to(torch.bfloat16))
    want = twin.generator.fuse(a.to(torch.bfloat16).float())
    for (name, g), (_, w) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)


def test_super_resolve_fuses_per_image_and_keeps_tiling():
    torch.manual_seed(0)
    model = DASR(TINY).eval()
    lr = torch.rand(2, 3, 23, 17)
    a = torch.randn(2, 5)  # a different mix per image
    with torch.no_grad():
        whole = model.sr(lr, a)
        torch.testing.assert_close(super_resolve(model, lr, a), whole, rtol=0, atol=1e-5)
        torch.testing.assert_close(super_resolve(model, lr, a, tile=8, overlap=8), whole, rtol=0, atol=1e-5)
        cl = super_resolve(model, lr, a, tile=8, overlap=8, channels_last=True)
        torch.testing.assert_close(cl, whole, rtol=0, atol=1e-5)
        assert cl.is_contiguous()
    with pytest.raises(ValueError, match="one expert mix per image"):
        super_resolve(model, lr, a[:1])


def test_super_resolve_in_bfloat16_is_close():
    """bf16 (8 mantissa bits) on CPU: the path runs and returns float32 within 3e-2 of the magnitude of
    G's residual (output - bilinear base; the base itself stays float32) of the float32 result."""
    torch.manual_seed(0)
    model = DASR(TINY).eval()
    with torch.no_grad():
        for m in model.generator.modules():  # at init the residual is ~1e-2: make it O(1), as after training
            if isinstance(m, ExpertConv2d):
                m.weight.mul_(2)
    lr, a = torch.rand(1, 3, 12, 10), torch.rand(1, 5)
    with torch.no_grad():
        ref = model.sr(lr, a)
        residual = ref - F.interpolate(lr, scale_factor=4, mode="bilinear", align_corners=False)
        assert residual.abs().max() > 0.1
        out = super_resolve(model, lr, a, dtype=torch.bfloat16, channels_last=True)
        assert out.dtype == torch.float32 and out.is_contiguous()
        assert_rel_close(out - ref + residual, residual, 3e-2, "bf16 fused")


# --- the same checks on a GPU, skipped without CUDA ---

cuda = pytest.mark.cuda  # skipped without a CUDA device (conftest.py)
# cuDNN picks its float32 algorithms itself (Winograd and FFT ones among them, whose rounding reaches
# about 1e-5 of the magnitude, and gradient sums in other orders); a wrong strategy is off by O(1)
@pytest.mark.parametrize("experts", [1, 5])
def test_a_folded_generator_with_a_dense_last_layer_is_the_grouped_one(experts):
    """An experiment for the GPU (bench_train.py --impl folded+dense-last): every layer folded but the last
    (3 output channels, which a grouped convolution per sample runs slowly), which is dense on the batch
    unfolded from the fold. The same output (float32) and gradients (float64) as grouped, batches of 3 and
    of 1 (where fold and batch are one shape), NCHW and channels_last input; a folded batch reaching a
    layer of another impl is refused."""
    torch.manual_seed(0)
    model = DASR(DASRConfig(num_experts=experts, num_feat=8, num_block=2, predictor_feat=8, mapping_gain=1.0))

    def run(hybrid, dtype, n, fmt):
        set_expert_impl(model.to(dtype), "folded" if hybrid else "grouped")
        if hybrid:
            model.generator.conv_last.impl = "dense"
        torch.manual_seed(1)
        lr, hr = torch.rand(n, 3, 9, 13, dtype=dtype), torch.rand(n, 3, 36, 52, dtype=dtype)
        model.zero_grad(set_to_none=True)
        sr, v_hat = model(lr.contiguous(memory_format=fmt), return_v=True)
        (F.l1_loss(sr, hr) + F.l1_loss(v_hat, torch.full_like(v_hat, 0.5))).backward()
        return sr.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    for n in (3, 1):
        for fmt in (torch.contiguous_format, torch.channels_last):
            torch.testing.assert_close(run(True, torch.float32, n, fmt)[0], run(False, torch.float32, n, fmt)[0],
                                       rtol=0, atol=1e-5)
            ref = run(False, torch.float64, n, fmt)[1]
            for k, grad in run(True, torch.float64, n, fmt)[1].items():
                assert_rel_close(grad, ref[k], REL64, f"folded + dense last, N={n}, grad {k}")
    set_expert_impl(model.float(), "folded")
    model.generator.conv_last.impl = "dense"
    for fmt in (torch.contiguous_format, torch.channels_last):  # the output in the input's layout, as folded's
        lr = torch.rand(2, 3, 8, 8).contiguous(memory_format=fmt)
        assert model(lr).is_contiguous(memory_format=fmt)
    model.generator.conv_last.impl = "grouped"
    with pytest.raises(DASRError, match="a folded batch .* needs expert impl folded or dense, not grouped"):
        model(torch.rand(2, 3, 8, 8))
    for impl in EXPERT_IMPLS:  # the whole generator too, folded included (it folds the batch first)
        set_expert_impl(model, impl)
        with pytest.raises(DASRError, match="3 images with expert mixes for 2"):
            model.generator(torch.rand(3, 3, 8, 8), torch.rand(2, experts))
    conv = ExpertConv2d(4, 4, num_experts=experts)
    for impl in EXPERT_IMPLS:  # a mix per image, or a refusal (grouped read 3 images with 2 mixes as 1)
        conv.impl = impl
        with pytest.raises(DASRError, match="3 images with expert mixes for 2"):
            conv(torch.rand(3, 4, 5, 5), torch.rand(2, experts))


REL_CUDA = 1e-4


@cuda
def test_cuda_a_folded_generator_with_a_dense_last_layer_is_the_grouped_one():
    """The folded+dense-last experiment on the GPU (cuDNN's kernels, channels_last): the whole model's output
    and gradients as grouped's, in float64 (float32 gradients of a whole network are not a fair test: see
    test_whole_model_same_output_and_gradients_with_every_strategy)."""
    device = "cuda"
    torch.manual_seed(0)
    model = DASR(DASRConfig(num_experts=5, num_feat=16, num_block=2, predictor_feat=8, mapping_gain=1.0))
    model = model.to(device, torch.float64)
    lr = torch.rand(4, 3, 12, 16, device=device, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    results = []
    for hybrid in (False, True):
        set_expert_impl(model, "folded" if hybrid else "grouped")
        model.generator.conv_last.impl = "dense" if hybrid else "grouped"
        model.zero_grad(set_to_none=True)
        sr = model(lr)
        sr.square().mean().backward()
        results.append((sr.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for k in ref_grads:
        assert_rel_close(grads[k], ref_grads[k], REL64, f"{device} folded + dense last, grad {k}")


@cuda
@pytest.mark.parametrize("impl", OTHERS)
def test_cuda_strategies_match_grouped(impl, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # TF32 would round at 1e-3
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    conv, x, a, g = _case(5, 3, 64, 64, 24, 40, dtype=torch.float32)
    conv, x, a, g = conv.cuda(), x.cuda(), a.cuda(), g.cuda()
    ref = _conv_and_grads(conv, x, a, g)
    conv.impl = impl
    for layout in (torch.contiguous_format, torch.channels_last):
        got = _conv_and_grads(conv, x.contiguous(memory_format=layout), a, g)
        for name in ref:
            assert_rel_close(got[name], ref[name], REL_CUDA, f"cuda {impl} {layout} {name}")


@cuda
def test_cuda_pixel_shuffle_keeps_channels_last_where_pytorchs_does_not():
    """Why the generators use their own: on CUDA F.pixel_shuffle of a channels_last tensor is NCHW (if a
    later PyTorch keeps channels_last, the first assert fails and says so); ours and its gradient are
    channels_last, bf16 values bit for bit the same."""
    from dasr_model.model import is_channels_last, pixel_shuffle

    x = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert not is_channels_last(F.pixel_shuffle(x, 2)), "PyTorch's CUDA pixel_shuffle now keeps channels_last"
    x.requires_grad_(True)
    out = pixel_shuffle(x, 2)
    assert is_channels_last(out) and torch.equal(out, F.pixel_shuffle(x, 2))
    g = torch.randn_like(out).contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(out, x, g)
    assert is_channels_last(grad) and torch.equal(grad, torch.autograd.grad(F.pixel_shuffle(x, 2), x, g)[0])


@cuda
def test_cuda_the_reused_network_follows_the_device_and_the_stream():
    """One thread fuses on the CPU, then on the GPU, then on a side stream: each gets a network on its own
    device and stream, and the right output."""
    import dasr_model.infer as infer

    torch.manual_seed(5)
    model = DASR(DASRConfig(num_experts=3, num_feat=8, num_block=2, predictor_feat=8)).eval()
    gpu = copy.deepcopy(model).cuda()
    lr, a = torch.rand(1, 3, 12, 10), torch.rand(1, 3)
    with torch.no_grad():
        want = model.sr(lr, a)
        torch.testing.assert_close(super_resolve(model, lr, a), want, rtol=0, atol=1e-5)
        with infer.reused_fused_net(gpu, a.cuda()) as net:
            assert net.conv_first.weight.device.type == "cuda"
        torch.testing.assert_close(super_resolve(gpu, lr.cuda(), a.cuda()).cpu(), want, rtol=0, atol=1e-4)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = super_resolve(gpu, lr.cuda(), a.cuda())
            with infer.reused_fused_net(gpu, a.cuda()) as net:
                assert infer._REUSED.entry[0][6] == side
        side.synchronize()
        torch.testing.assert_close(out.cpu(), want, rtol=0, atol=1e-4)


@cuda
def test_cuda_a_graph_records_the_fuse_and_the_network():
    """The fuse reads nothing back, so a CUDA graph records it with the network: replayed with another mix
    and image copied into its inputs, it gives what the eager fuse and network give."""
    torch.manual_seed(6)
    model = DASR(DASRConfig(num_experts=3, num_feat=16, num_block=2, predictor_feat=8)).cuda().eval()
    gen = model.generator
    x, mix = torch.rand(1, 3, 16, 12, device="cuda"), torch.rand(1, 3, device="cuda")
    with torch.no_grad():
        net = gen.fuse(mix)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: the fuse's views and buffer, cuDNN's workspaces
                gen.fuse(mix, into=net)
                net(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gen.fuse(mix, into=net)
            y = net(x)
        lr, a = torch.rand(1, 3, 16, 12, device="cuda"), torch.rand(1, 3, device="cuda")
        x.copy_(lr)
        mix.copy_(a)
        graph.replay()
        torch.testing.assert_close(y, gen.fuse(a)(lr), rtol=0, atol=1e-6)


@cuda
def test_cuda_fused_bf16_channels_last_is_close():
    torch.manual_seed(0)
    model = DASR(DASRConfig()).cuda().eval()
    lr = torch.rand(1, 3, 48, 40, device="cuda")
    with torch.no_grad():
        _, a = model.predict(lr)
        ref = model.sr(lr, a)
        torch.testing.assert_close(super_resolve(model, lr, a), ref, rtol=0, atol=1e-3)  # TF32 at most
        fast = super_resolve(model, lr, a, dtype=torch.bfloat16, channels_last=True)
        torch.testing.assert_close(fast, ref, rtol=0, atol=3e-2)


# --- "folded": the batch folded into the channels, channels_last, from the generator's input to its output ---

def test_fold_and_unfold_are_inverse_and_lay_each_pixel_out_as_every_samples_channels():
    from dasr_model.model import fold_batch, unfold_batch

    x = torch.rand(3, 4, 5, 6)
    f = fold_batch(x)
    assert f.shape == (1, 12, 5, 6) and f.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(f[0, 2 * 4 + 1], x[2, 1])  # channel n*C + c is sample n's channel c
    assert torch.equal(f.permute(0, 2, 3, 1).reshape(-1), x.permute(2, 3, 0, 1).reshape(-1))  # (H, W, N, C)
    back = unfold_batch(f, 3)
    assert torch.equal(back, x) and back.data_ptr() == f.data_ptr()  # a view
    assert fold_batch(back).data_ptr() == f.data_ptr()  # folding what unfold_batch gave copies nothing


@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (1, 8, 3, 4), (3, 1, 1, 6), (1, 1, 1, 1)])  # channels per r*r
@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pixel_shuffle_is_pytorchs_laid_out_as_its_input(shape, r, channels_last):
    """The same values and gradient as F.pixel_shuffle, bit for bit, never a view of the input; a
    channels_last input gives a channels_last output and gets a channels_last gradient (on CUDA
    PyTorch's output is NCHW); a channel count that r*r does not divide, PyTorch's error."""
    from dasr_model.model import is_channels_last, pixel_shuffle

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape[0], shape[1] * r * r, *shape[2:], generator=gen)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x.requires_grad_(True)
    ref, out = F.pixel_shuffle(x, r), pixel_shuffle(x, r)
    assert torch.equal(out, ref) and out.data_ptr() != x.data_ptr()
    g = torch.randn(ref.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    (g_ref,), (g_out,) = torch.autograd.grad(ref, x, g), torch.autograd.grad(out, x, g)
    assert torch.equal(g_out, g_ref)
    if is_channels_last(x) and shape[1] > 1 and r > 1:  # (one output channel: NCHW and channels_last at once)
        assert is_channels_last(out) and is_channels_last(g_out)
    with pytest.raises(RuntimeError, match="divisible"):
        pixel_shuffle(torch.zeros(1, 6, 2, 2).contiguous(memory_format=torch.channels_last), 2)


def test_unfold_hands_a_channels_last_gradient_back_in_the_folds_layout():
    """What the folded generator's last convolution receives in backward: the gradient of the unfolded
    output, the same values, laid out as that convolution computes (channels_last of the fold); an NCHW
    gradient comes back as the NCHW view it is (the convolution converts it, once)."""
    from dasr_model.model import fold_batch, is_channels_last, unfold_batch

    x = torch.rand(3, 4, 5, 6, requires_grad=True)
    for fmt, folded_cl in ((torch.channels_last, True), (torch.contiguous_format, False)):
        f = fold_batch(x)  # not a leaf: a leaf's .grad is laid out as the leaf, whatever autograd computed
        g = torch.rand(3, 4, 5, 6).contiguous(memory_format=fmt)
        (grad,) = torch.autograd.grad(unfold_batch(f, 3), f, g)
        assert torch.equal(unfold_batch(grad, 3), g)
        assert is_channels_last(grad) == folded_cl and grad.is_contiguous() != folded_cl


@pytest.mark.parametrize("n", [2, 3])  # (N = 1: a folded batch is a plain one; the plain-batch tests cover it)
def test_folded_layer_on_a_folded_batch_equals_grouped(n):
    from dasr_model.model import fold_batch, unfold_batch

    conv, x, a, g = _case(5, n, 4, 6, 7, 11, dtype=torch.float64, seed=4)
    ref = _conv_and_grads(conv, x, a, g)
    conv.impl = "folded"
    xf = fold_batch(x.detach()).requires_grad_(True)
    out = conv(xf, a)
    assert out.shape == (1, n * 6, 7, 11) and out.is_contiguous(memory_format=torch.channels_last)
    unfold_batch(out, n).backward(g)
    assert_rel_close(unfold_batch(out, n), ref["out"], REL64, "folded out")
    assert_rel_close(unfold_batch(xf.grad, n), ref["x"], REL64, "folded x grad")
    assert_rel_close(conv.weight.grad, ref["weight"], REL64, "folded weight grad")


def test_the_folded_generator_folds_once_and_keeps_the_fold_through_every_layer():
    torch.manual_seed(0)
    model = set_expert_impl(DASR(DASRConfig(num_experts=3, num_feat=8, num_block=2, predictor_feat=8)), "folded")
    n, seen = 4, []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) for m in model.generator.modules()
             if isinstance(m, ExpertConv2d)]
    lr = torch.rand(n, 3, 6, 5)
    with torch.no_grad():
        a = torch.rand(n, 3)
        out = model.sr(lr, a)
        for h in hooks:
            h.remove()
        ref = set_expert_impl(copy.deepcopy(model), "grouped").sr(lr, a)
    # every expert conv (first, 2 x 2 in the body, 2 up, hr, last) took the batch folded: (1, N*C, H, W)
    assert len(seen) == 2 * 2 + 5 and all(t.shape[0] == 1 and t.shape[1] in (n * 3, n * 8) for t in seen)
    # in channels_last up to the first up-conv (pixel_shuffle may hand the next one NCHW; the conv converts it)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in seen[:6])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert out.shape == (n, 3, 24, 20)


def _sr_and_grads(model: DASR, lr, a, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model.sr(lr, a)
    (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["folded", "grouped", "dense", "stacked"])  # dense, stacked: channels_last maps
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_flat_pointwise_gives_the_same_bits_forward_and_backward(impl, channels_last, bf16):
    torch.manual_seed(0)
    model = set_expert_impl(DASR(DASRConfig(num_experts=3, num_feat=8, num_block=2, predictor_feat=8)), impl)
    flat = copy.deepcopy(model)
    flat.generator.pointwise = "flat"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    lr, a = torch.rand(3, 3, 6, 5).contiguous(memory_format=fmt), torch.rand(3, 3)
    out, grads = _sr_and_grads(model, lr, a, bf16)
    out_flat, grads_flat = _sr_and_grads(flat, lr, a, bf16)
    # the same operations on the same values in the same order: equal, not close
    assert torch.equal(out_flat, out)
    assert grads_flat.keys() == grads.keys() and len(grads) == 9 * 2
    assert all(torch.equal(grads_flat[k], grads[k]) for k in grads)


@pytest.mark.parametrize("bf16_cl", [False, True], ids=["fp32", "bf16-cl"])
def test_flat_pointwise_plain_network_gives_the_same_bits(bf16_cl):
    torch.manual_seed(0)
    model = DASR(DASRConfig(num_experts=3, num_feat=8, num_block=2, predictor_feat=8))
    a = torch.rand(1, 3)
    kw = {"dtype": torch.bfloat16, "channels_last": True} if bf16_cl else {}
    net, flat = fuse_experts(model, a, **kw), fuse_experts(model, a, **kw)
    flat.pointwise = "flat"
    lr = torch.rand(2, 3, 7, 6)
    if bf16_cl:
        lr = lr.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(flat(lr), net(lr))


def test_flat_pointwise_runs_the_element_wise_operations_on_1d_views_without_copies():
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    big = 3 * 8 * 6 * 5  # a feature map of the folded batch (N 3, C 8, 6 x 5): the operations on such tensors

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            dims = tuple(t.dim() for t in (*args, out) if isinstance(t, torch.Tensor) and t.numel() >= big)
            self.calls.append((func.overloadpacket.__name__, dims))
            return out

    def traced(pointwise):
        torch.manual_seed(0)
        model = set_expert_impl(DASR(DASRConfig(num_experts=3, num_feat=8, num_block=2, predictor_feat=8)), "folded")
        model.generator.pointwise = pointwise
        lr = torch.rand(3, 3, 6, 5).contiguous(memory_format=torch.channels_last)
        a = torch.rand(3, 3, requires_grad=True)
        with Ops() as ops:
            model.sr(lr, a).sum().backward()
        return ops.calls

    flat, four = traced("flat"), traced("4d")
    names = ("relu", "leaky_relu", "threshold_backward", "leaky_relu_backward", "add")
    ew_flat = Counter((n, d) for n, d in flat if n in names and d)
    ew_four = Counter((n, d) for n, d in four if n in names and d)
    # 4-D: 2 ReLUs, 4 leaky ReLUs (first conv, two up-samplings, conv_hr), their gradients, 2 residual sums,
    # their 2 gradient accumulations and the final base + SR sum; flat: each on 1-D tensors but that last sum
    assert ew_four == {("relu", (4, 4)): 2, ("threshold_backward", (4, 4, 4)): 2, ("leaky_relu", (4, 4)): 4,
                       ("leaky_relu_backward", (4, 4, 4)): 4, ("add", (4, 4, 4)): 5}
    assert ew_flat == {("relu", (1, 1)): 2, ("threshold_backward", (1, 1, 1)): 2, ("leaky_relu", (1, 1)): 4,
                       ("leaky_relu_backward", (1, 1, 1)): 4, ("add", (1, 1, 1)): 4, ("add", (4, 4, 4)): 1}
    # the same operations otherwise (copies included: none added), and more views and permutes only
    views = ("view", "permute", "_unsafe_view", "_reshape_alias")
    assert Counter(n for n, _ in flat if n not in views) == Counter(n for n, _ in four if n not in views)


def test_pointwise_refuses_unknown_names():
    gen = DASR(TINY).generator
    with pytest.raises(DASRError, match="pointwise must be one of 4d, flat"):
        gen.pointwise = "2d"
    plain = MSRResNet(num_feat=8, num_block=1)
    assert plain.pointwise == "4d"
    with pytest.raises(DASRError):
        plain.pointwise = "1d"


@cuda
def test_cuda_flat_pointwise_gives_the_same_bits(monkeypatch):
    """dasr-train's GPU path (folded, channels_last, bf16 autocast) and dasr-sr's (the fused network in bf16
    channels_last) with the element-wise operations on 1-D views: the same output and gradients, bit for
    bit (cuDNN held to deterministic algorithms, which a weight gradient's atomics may otherwise reorder)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    model = set_expert_impl(DASR(DASRConfig(num_experts=3, num_feat=16, num_block=2, predictor_feat=8)), "folded")
    model = model.cuda()
    flat = copy.deepcopy(model)
    flat.generator.pointwise = "flat"
    lr = torch.rand(4, 3, 16, 12, device="cuda").contiguous(memory_format=torch.channels_last)
    a = torch.rand(4, 3, device="cuda")
    results = []
    for m in (model, flat):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m.sr(lr, a)
        out.float().square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in m.generator.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(g, h) for g, h in zip(results[0][1], results[1][1]))
    net = fuse_experts(model, a[:1], dtype=torch.bfloat16, channels_last=True)
    net_flat = fuse_experts(model, a[:1], dtype=torch.bfloat16, channels_last=True)
    net_flat.pointwise = "flat"
    with torch.no_grad():
        assert torch.equal(net_flat(lr[:1]), net(lr[:1]))
