"""dasr-train --init-from / --init-release: a run that starts from trained weights (a second stage, fine-tuning)."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402

from cli.train import main as train_cli  # noqa: E402
from dasr_model.checkpoints import load_checkpoint  # noqa: E402
from dasr_model.errors import DASRError  # noqa: E402
from dasr_model.model import DASR, DASRConfig  # noqa: E402
from dasr_model.modelfile import MODEL_FILE, read_model_file  # noqa: E402
from dasr_model.train import TrainConfig, train  # noqa: E402

from .conftest import make_small_dataset  # noqa: E402

TINY = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8, mixing="softmax", mapping_gain=1.0)
TINY_ARGS = ["--experts", "2", "--features", "8", "--blocks", "1", "--mixing", "softmax"]
# predictor_feat has no CLI option: the CLI's runs use the default width
CLI_TINY = DASRConfig(num_experts=2, num_feat=8, num_block=1, mixing="softmax")
CRUMB = 1e-12  # a learning rate whose Adam updates (about lr each) leave the start weights as they were


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_small_dataset(tmp_path_factory.mktemp("init") / "ds", count=8, seed=4, shard_size=8)


@pytest.fixture(scope="module")
def source(shards, tmp_path_factory):
    """A trained 2-step run: its checkpoint's predictor and EMA generator are what a run starts from."""
    out = tmp_path_factory.mktemp("src") / "run"
    train(_cfg(shards, out, 2, lr=1e-2))
    ckpt = load_checkpoint(out / "ckpt-2.pt")
    start = {**{k: v for k, v in ckpt["model"].items() if k.startswith("predictor.")},
             **{f"generator.{k}": v for k, v in ckpt["ema_generator"].items()}}
    return out, start


def _cfg(shards, out, steps, **kw):
    kw = {"model": TINY, "ckpt_every": 1, "batch_size": 2, "device": "cpu", **kw}
    return TrainConfig(shards=shards, out=str(out), steps=steps, lr_crop=8, workers=0, **kw)


def _assert_weights(state, expected, atol):
    assert set(state) == set(expected)
    for name, t in expected.items():
        torch.testing.assert_close(state[name], t, rtol=0, atol=atol, msg=name)


def test_a_run_starts_from_the_predictor_and_ema_generator_of_a_run_folder(shards, source, tmp_path):
    """Oracle: after one update at a learning rate of 1e-12 the weights are the source's (to 1e-9); a run
    from the same seed without --init-from is far from them. The optimiser and the step start afresh."""
    folder, start = source
    train(_cfg(shards, tmp_path / "b", 1, lr=CRUMB, init_from=str(folder)))
    ckpt = load_checkpoint(tmp_path / "b" / "ckpt-1.pt")
    _assert_weights(ckpt["model"], start, atol=1e-9)
    assert ckpt["step"] == 1 and ckpt["optimizer"]["state"][0]["step"] == 1
    assert ckpt["config"]["init_from"] == str(folder)
    train(_cfg(shards, tmp_path / "fresh", 1, lr=CRUMB))
    fresh = load_checkpoint(tmp_path / "fresh" / "ckpt-1.pt")["model"]
    assert max(float((fresh[k] - start[k]).abs().max()) for k in start) > 1e-2


def test_a_model_file_starts_a_run_with_its_weights(shards, source, tmp_path):
    folder, _ = source
    train(_cfg(shards, tmp_path / "b", 1, lr=CRUMB, init_from=str(folder / MODEL_FILE)))
    model, _ = read_model_file(folder / MODEL_FILE)  # bf16 weights read as float32
    _assert_weights(load_checkpoint(tmp_path / "b" / "ckpt-1.pt")["model"], model.state_dict(), atol=1e-9)


def test_a_source_of_another_architecture_is_refused_before_anything_is_written(shards, source, tmp_path):
    folder, _ = source
    other = DASRConfig(num_experts=3, num_feat=8, num_block=1, predictor_feat=8, mixing="softmax")
    with pytest.raises(DASRError, match=r"its model cannot start this run: num_experts 2 \(this run: 3\)"):
        train(_cfg(shards, tmp_path / "b", 1, init_from=str(folder), model=other))
    assert not (tmp_path / "b").exists()
    with pytest.raises(DASRError, match="not both"):
        train(_cfg(shards, tmp_path / "b", 1, init_from=str(folder), init_release=("G.pth", "P.pth")))


def test_mapping_gain_may_differ_as_the_source_replaces_the_init_it_scales(shards, source, tmp_path):
    folder, start = source
    train(_cfg(shards, tmp_path / "b", 1, lr=CRUMB, init_from=str(folder), model=TINY.__class__(
        **{**TINY.__dict__, "mapping_gain": 0.1})))
    _assert_weights(load_checkpoint(tmp_path / "b" / "ckpt-1.pt")["model"], start, atol=1e-9)


def test_a_resume_takes_its_checkpoints_weights_even_with_the_source_gone(shards, source, tmp_path):
    """Exact resume: 2 steps, the source deleted, 1 more step == 3 steps in one go."""
    folder, _ = source
    copy = tmp_path / "src"
    shutil.copytree(folder, copy)
    train(_cfg(shards, tmp_path / "full", 3, init_from=str(copy)))
    train(_cfg(shards, tmp_path / "split", 2, init_from=str(copy)))
    shutil.rmtree(copy)
    train(_cfg(shards, tmp_path / "split", 3, init_from=str(copy)), resume=True)
    full, split = (load_checkpoint(tmp_path / d / "ckpt-3.pt") for d in ("full", "split"))
    _assert_weights(split["model"], full["model"], atol=0)


def test_cli_release_weights_start_a_run_with_the_released_architecture(shards, tmp_path):
    """No model option given: the run takes the release's (1 expert, 16 blocks, 64 features, linear mixing)."""
    torch.manual_seed(3)
    release = DASR(DASRConfig(num_experts=1, mixing="linear", predictor_input="lr"))
    g, p = tmp_path / "G.pth", tmp_path / "P.pth"
    torch.save({"params_ema": release.generator.state_dict()}, g)
    torch.save({"params": release.predictor.state_dict()}, p)
    res = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "b"), "--steps", "1",
                                         "--batch-size", "2", "--lr-crop", "8", "--workers", "0", "--device", "cpu",
                                         "--lr", str(CRUMB), "--init-release", str(g), str(p)])
    assert res.exit_code == 0, res.output
    assert f"starting from the weights of {g} + {p} (release weights)" in res.output
    ckpt = load_checkpoint(tmp_path / "b" / "ckpt-1.pt")
    assert TrainConfig.from_dict(ckpt["config"]).model == release.config
    _assert_weights(ckpt["model"], release.state_dict(), atol=1e-9)


def test_cli_model_options_default_to_the_sources_and_a_conflicting_one_is_refused(shards, tmp_path):
    args = ["--shards", shards, "--steps", "1", "--batch-size", "2", "--lr-crop", "8", "--workers", "0",
            "--device", "cpu"]
    res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "a"), *TINY_ARGS])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a"),
                                         "--lr", str(CRUMB)])
    assert res.exit_code == 0, res.output
    assert TrainConfig.from_dict(load_checkpoint(tmp_path / "b" / "ckpt-1.pt")["config"]).model == CLI_TINY
    shutil.copytree(tmp_path / "a", tmp_path / "gone")  # a resume, its source gone: options from its checkpoint
    res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "d"), "--init-from", str(tmp_path / "gone")])
    assert res.exit_code == 0, res.output
    shutil.rmtree(tmp_path / "gone")
    res = CliRunner().invoke(train_cli, [*args[:2], "--steps", "2", *args[4:], "--out", str(tmp_path / "d"),
                                         "--init-from", str(tmp_path / "gone"), "--resume"])
    assert res.exit_code == 0 and "resuming from ckpt-1.pt" in res.output, res.output
    res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "a"),
                                         "--blocks", "2"])
    assert res.exit_code == 1 and "num_block 1 (this run: 2)" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "a"),
                                         "--init-release", "G.pth", "P.pth"])
    assert res.exit_code == 2 and "not both" in res.output
    res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "x")])
    assert res.exit_code == 1 and str(tmp_path / "x") in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("inside", ["", "ckpt-2.pt", MODEL_FILE])
def test_restart_refuses_to_delete_the_weights_it_starts_from(shards, source, tmp_path, inside):
    """--restart deletes the run in --out: a source there (the folder, or one of its run files) would be gone
    once loaded, with nothing on disk if the run then failed. Refused before anything is deleted."""
    folder, _ = source
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(DASRError, match="--restart would delete the weights this run starts from"):
        train(_cfg(shards, run, 1, init_from=str(run / inside) if inside else str(run)), restart=True)
    assert sorted(p.name for p in run.iterdir()) == before


def test_config_json_keeps_the_source_across_resumes_and_the_callers_rng(shards, source, tmp_path):
    import json

    folder, _ = source
    state = torch.random.get_rng_state()
    train(_cfg(shards, tmp_path / "b", 1, init_from=str(folder)))
    assert torch.equal(torch.random.get_rng_state(), state)  # loading the source drew nothing from it
    notes = []
    train(_cfg(shards, tmp_path / "b", 2), resume=True, notify=notes.append)  # no --init-from given this time
    assert json.loads((tmp_path / "b" / "config.json").read_text())["init_from"] == str(folder)
    assert not any("started from" in n for n in notes)
    train(_cfg(shards, tmp_path / "b", 3, init_from=str(tmp_path / "other")), resume=True, notify=notes.append)
    assert any(f"continues a run that started from {folder}" in n for n in notes)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["init_from"] == str(folder)
