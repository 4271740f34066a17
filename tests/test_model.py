"""dasr_model: shapes, parameter counts of the DASR release, release-weight loading against an independent reference."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from dasr_model import DASR, DASRConfig, load_release_weights  # noqa: E402


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_release():
    model = DASR()
    assert n_params(model.predictor) == 468_143
    assert n_params(model.generator) == 7_587_855
    assert n_params(DASR(DASRConfig(num_experts=1)).generator) == 1_517_571


@pytest.mark.parametrize("experts", [1, 5])
def test_shapes(experts):
    torch.manual_seed(0)
    model = DASR(DASRConfig(num_experts=experts, num_block=2)).eval()
    lr = torch.rand(2, 3, 12, 16)
    v_hat, a = model.predict(lr)
    assert v_hat.shape == (2, 33) and a.shape == (2, experts)
    sr = model(lr)
    assert sr.shape == (2, 3, 48, 64) and torch.isfinite(sr).all()
    assert torch.equal(model.sr(lr, a), sr)


def test_initial_mix_is_near_uniform_and_experts_are_distinct():
    from dasr_model.diagnostics import expert_stats

    torch.manual_seed(0)
    model = DASR().eval()
    with torch.no_grad():
        _, a = model.predict(torch.rand(1, 3, 16, 16))
    assert torch.allclose(a, torch.full_like(a, 0.2), atol=0.1)
    assert expert_stats(model.generator)["relative_distance"] > 1.0  # independent draws: about sqrt(2)


@pytest.mark.parametrize("experts", [1, 5])
def test_untrained_network_is_its_bilinear_base_on_a_photo(experts):
    """MSRResNet's x0.1 init on every layer: the untrained SR scores within 0.1 dB of bilinear upsampling
    (with conv_first/upconv/conv_hr at scale 1 it was ~3.7 dB below bicubic)."""
    import degrade
    from dasr_model.infer import to_image, to_tensor
    from dasr_model.metrics import psnr_y

    hr = degrade.read_image(degrade.sample_images()[1])
    hr = hr[: hr.shape[0] // 4 * 4, : hr.shape[1] // 4 * 4]
    lr = F.interpolate(to_tensor(hr), scale_factor=0.25, mode="area")
    torch.manual_seed(3)
    with torch.no_grad():
        sr = DASR(DASRConfig(num_experts=experts)).eval()(lr)
    bilinear = F.interpolate(lr, scale_factor=4, mode="bilinear", align_corners=False)
    assert abs(psnr_y(to_image(sr), hr) - psnr_y(to_image(bilinear), hr)) < 0.1


def test_softmax_mixing_is_convex_and_keeps_the_release_keys():
    torch.manual_seed(0)
    linear, soft = DASR(DASRConfig(num_block=1)), DASR(DASRConfig(num_block=1, mixing="softmax",
                                                                   mixing_temperature=0.1, mapping_gain=1.0))
    assert linear.state_dict().keys() == soft.state_dict().keys()
    v = torch.rand(64, 33)
    a = soft.mix(v)
    torch.testing.assert_close(a.sum(1), torch.ones(64))
    assert (a > 0).all() and a.std(0).mean() > 0.05  # full gain and a low temperature: a varies with v
    with pytest.raises(ValueError, match="mixing"):
        DASRConfig(mixing="max")
    with pytest.raises(ValueError, match="temperature"):
        DASRConfig(mixing_temperature=0)


def test_given_vector_sets_the_mix_and_v_hat_is_still_predicted():
    torch.manual_seed(0)
    model = DASR(DASRConfig(num_block=1, mapping_gain=1.0)).eval()
    lr, v = torch.rand(2, 3, 8, 8), torch.rand(2, 33)
    with torch.no_grad():
        sr, v_hat = model(lr, return_v=True, v_mix=v)
        torch.testing.assert_close(sr, model.sr(lr, model.mix(v)))
        torch.testing.assert_close(v_hat, model.predict(lr)[0])
        assert not torch.allclose(sr, model(lr), atol=1e-7)


def _release_state_dicts(seed: int = 1):
    """Random weights in the released layout (as released)."""
    g = torch.Generator().manual_seed(seed)

    def conv(out_ch, in_ch, k=5):
        return torch.randn(k, out_ch, in_ch, 3, 3, generator=g) * 0.05, torch.randn(k, out_ch, generator=g) * 0.01

    gs = {}
    shapes = {"conv_first": (64, 3), "upconv1": (256, 64), "upconv2": (256, 64), "conv_hr": (64, 64), "conv_last": (3, 64)}
    for i in range(16):
        shapes[f"body.{i}.conv1"] = (64, 64)
        shapes[f"body.{i}.conv2"] = (64, 64)
    for name, (o, c) in shapes.items():
        gs[f"{name}.weight"], gs[f"{name}.bias"] = conv(o, c)
    ps = {}
    chans = [3, 64, 64, 64, 64, 64, 33]
    for j, idx in enumerate((0, 2, 4, 6, 8, 10)):
        ps[f"ConvNet.{idx}.weight"] = torch.randn(chans[j + 1], chans[j], 5, 5, generator=g) * 0.05
        ps[f"ConvNet.{idx}.bias"] = torch.randn(chans[j + 1], generator=g) * 0.01
    ps["MappingNet.0.weight"] = torch.randn(15, 33, generator=g) * 0.2
    ps["MappingNet.0.bias"] = torch.randn(15, generator=g) * 0.1
    ps["MappingNet.1.weight"] = torch.randn(5, 15, generator=g) * 0.2
    ps["MappingNet.1.bias"] = torch.randn(5, generator=g) * 0.1
    return gs, ps


def _reference(gs, ps, lr):
    """The release architecture written out independently: one sample at a time, plain convolutions."""
    outs = []
    for x in lr.split(1):
        h = x
        for j, idx in enumerate((0, 2, 4, 6, 8, 10)):
            h = F.leaky_relu(F.conv2d(h, ps[f"ConvNet.{idx}.weight"], ps[f"ConvNet.{idx}.bias"],
                                      stride=2 if j == 3 else 1, padding=2), 0.2)
        v = h.mean(dim=(2, 3))
        a = F.linear(F.linear(v, ps["MappingNet.0.weight"], ps["MappingNet.0.bias"]),
                     ps["MappingNet.1.weight"], ps["MappingNet.1.bias"])[0]

        def conv(t, name):
            w = sum(a[k] * gs[f"{name}.weight"][k] for k in range(5))
            b = sum(a[k] * gs[f"{name}.bias"][k] for k in range(5))
            return F.conv2d(t, w, b, padding=1)

        feat = F.leaky_relu(conv(x, "conv_first"), 0.1)
        t = feat
        for i in range(16):
            t = t + conv(F.relu(conv(t, f"body.{i}.conv1")), f"body.{i}.conv2")
        t = F.leaky_relu(F.pixel_shuffle(conv(t, "upconv1"), 2), 0.1)
        t = F.leaky_relu(F.pixel_shuffle(conv(t, "upconv2"), 2), 0.1)
        t = conv(F.leaky_relu(conv(t, "conv_hr"), 0.1), "conv_last")
        outs.append(t + F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False))
    return torch.cat(outs)


def test_release_weights_give_the_release_output(tmp_path):
    gs, ps = _release_state_dicts()
    lr = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _reference(gs, ps, lr)
    model = load_release_weights(gs, ps).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(lr), expected, rtol=0, atol=1e-5)
    # From files, as released: G under params / params_ema, P under params.
    ema = {k: v * 0.5 for k, v in gs.items()}
    torch.save({"params": gs, "params_ema": ema}, tmp_path / "g.pth")
    torch.save({"params": ps}, tmp_path / "p.pth")
    from_files = load_release_weights(tmp_path / "g.pth", tmp_path / "p.pth", prefer_ema=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_files(lr), expected, rtol=0, atol=1e-5)
    assert torch.equal(load_release_weights(tmp_path / "g.pth", tmp_path / "p.pth").generator.conv_first.weight,
                       ema["conv_first.weight"])


def test_release_loader_refuses_a_wrong_layout():
    gs, ps = _release_state_dicts()
    gs.pop("conv_hr.bias")
    with pytest.raises(ValueError, match="conv_hr.bias"):  # a DASRError
        load_release_weights(gs, ps)


def test_one_optimiser_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = DASR(DASRConfig(num_block=2))
    lr, hr, v = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32), torch.rand(2, 33)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99))

    def loss():
        v_hat, a = model.predict(lr)
        return F.l1_loss(model.sr(lr, a), hr) + F.l1_loss(v_hat, v)

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss() < before


def test_highpass_predictor_is_blind_to_brightness_and_keeps_the_release_keys():
    torch.manual_seed(0)
    hp = DASR(DASRConfig(num_block=1, predictor_input="highpass")).eval()
    assert hp.state_dict().keys() == DASR(DASRConfig(num_block=1)).state_dict().keys()
    lr = torch.rand(2, 3, 16, 16) * 0.5
    with torch.no_grad():
        torch.testing.assert_close(hp.predict(lr + 0.3)[0], hp.predict(lr)[0], atol=1e-5, rtol=0)
        plain = DASR(DASRConfig(num_block=1)).eval()
        plain.load_state_dict(hp.state_dict())
        assert not torch.allclose(plain.predict(lr + 0.3)[0], plain.predict(lr)[0], atol=1e-3)
    with pytest.raises(ValueError, match="predictor_input"):
        DASRConfig(predictor_input="edges")
