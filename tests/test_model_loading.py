"""Reading and writing checkpoints, model files and release weights: by content (never by the file's
name), through unique temporary files, refusing non-finite weights, compressed zips and non-regular files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402

from cli.sr import export_main  # noqa: E402
from dasr_model.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from dasr_model.model import DASR, DASRConfig  # noqa: E402
from dasr_model.modelfile import save_model_file  # noqa: E402
from dasr_model.train import TrainConfig  # noqa: E402

TINY = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8, mixing="softmax", mapping_gain=1.0)
ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int = 0) -> DASR:
    torch.manual_seed(seed)
    return DASR(TINY).eval()


def _state(model: DASR, step: int = 7) -> dict:
    return {"config": TrainConfig(shards="", out="", model=TINY).to_dict(), "step": step,
            "model": model.state_dict(), "ema_generator": model.generator.state_dict()}


def test_writes_never_follow_a_symlink_at_a_temporary_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "exp"
    out.mkdir()
    for name in ("m.safetensors.tmp", "ckpt-3.pt.tmp"):  # the fixed temporary names of before
        (out / name).symlink_to(victim)
    save_checkpoint(out / "ckpt-3.pt", _state(_model()))
    result = CliRunner().invoke(export_main, [str(out / "ckpt-3.pt"), "-o", str(out / "m.safetensors")])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    for name in ("m.safetensors", "ckpt-3.pt"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-3.pt", "ckpt-3.pt.tmp", "m.safetensors",
                                                     "m.safetensors.tmp"]  # no temporary file of ours left
    assert load_checkpoint(out / "ckpt-3.pt")["step"] == 7


def test_a_failed_export_leaves_no_temporary_file_and_names_the_target(tmp_path):
    save_checkpoint(tmp_path / "ckpt-1.pt", _state(_model()))
    out = tmp_path / "exp2"
    out.mkdir()
    target = out / "n.safetensors"
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); "
              "from cli.sr import export_main; sys.argv[0] = 'dasr-export'; export_main()")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt-1.pt"), "-o", str(target),
                           "--dtype", "fp32"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 1, done.stderr
    assert f"{target}: File too large" in done.stderr and "Traceback" not in done.stderr
    assert list(out.iterdir()) == []


def test_save_model_file_replaces_a_symlink_and_leaves_its_target_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "m.safetensors").symlink_to(victim)
    save_model_file(_model(), tmp_path / "m.safetensors")
    assert victim.read_text() == "precious" and not (tmp_path / "m.safetensors").is_symlink()
