"""Reading and writing checkpoints, model files and release weights: by content (never by the file's
name), through unique temporary files, refusing non-finite weights, compressed zips and non-regular files."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402

from cli.sr import export_main  # noqa: E402
from dasr_model.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from dasr_model.errors import DASRError  # noqa: E402
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


def test_a_failed_checkpoint_write_is_an_os_error_naming_it(tmp_path):
    """torch's zip writer reports a failed write (here a 100 kB file-size limit; a full disk alike) as a
    RuntimeError naming neither the file nor the reason; save_checkpoint raises the write's own OSError, naming
    the checkpoint, which dasr-train reports in one line, and leaves nothing behind."""
    script = ("import resource, signal, sys, torch; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
              "from dasr_model.checkpoints import save_checkpoint; "
              f"save_checkpoint(__import__('pathlib').Path({str(tmp_path / 'ckpt-1.pt')!r}), "
              "{'w': torch.zeros(100_000)})")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"OSError: [Errno {errno.EFBIG}] File too large: '{tmp_path / 'ckpt-1.pt'}'"
    assert list(tmp_path.iterdir()) == []


def test_an_export_whose_weights_do_not_fit_the_dtype_is_refused(tmp_path):
    """A weight of 1e5 becomes inf in fp16, which the reader would refuse: the writer refuses first, writes
    nothing, and names the weight; bf16 holds it."""
    model = _model()
    with torch.no_grad():
        model.generator.conv_first.weight.view(-1)[0] = 1e5
    with pytest.raises(DASRError, match=r"generator.conv_first.weight: a weight of 1e\+05 does not fit float16"):
        save_model_file(model, tmp_path / "m.safetensors", dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []
    save_model_file(model, tmp_path / "m.safetensors", dtype=torch.bfloat16)


def test_save_model_file_replaces_a_symlink_and_leaves_its_target_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "m.safetensors").symlink_to(victim)
    save_model_file(_model(), tmp_path / "m.safetensors")
    assert victim.read_text() == "precious" and not (tmp_path / "m.safetensors").is_symlink()


def test_a_checkpoint_named_safetensors_is_read_by_its_content(tmp_path):
    from dasr_model.infer import load_checkpoint_model, load_model
    from dasr_model.release import load_release_weights

    model = _model()
    save_checkpoint(tmp_path / "ckpt-2.pt", _state(model))
    renamed = tmp_path / "x.safetensors"
    renamed.write_bytes((tmp_path / "ckpt-2.pt").read_bytes())
    loaded = load_model(renamed)
    assert loaded.kind == "checkpoint" and loaded.step == 7
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.model.state_dict().items())
    assert load_checkpoint(renamed)["step"] == 7 and load_checkpoint_model(renamed).config == TINY
    result = CliRunner().invoke(export_main, [str(renamed), "-o", str(tmp_path / "y.safetensors")])
    assert result.exit_code == 0, result.output
    exported = load_model(tmp_path / "y.safetensors")  # a real model file still reads as one
    assert exported.kind == "model file" and exported.step == 7
    truncated = tmp_path / "bad.safetensors"  # a torch file cut short, named like a model file
    truncated.write_bytes(renamed.read_bytes()[:3000])
    for load in (load_checkpoint, lambda p: load_release_weights(p, p)):
        with pytest.raises(DASRError, match="damaged or truncated"):
            load(truncated)
    release = _release_model()
    g, p = _release_files(tmp_path, release, ".safetensors")
    back = load_release_weights(g, p)  # the released .pth files under another name read as they are
    assert torch.equal(back.generator.conv_first.weight, release.generator.conv_first.weight)


def _release_model() -> DASR:
    torch.manual_seed(3)
    return DASR(DASRConfig(num_experts=1, mixing="linear", predictor_input="lr"))  # the released layout


def _release_files(folder: Path, model: DASR, suffix: str = ".pth") -> tuple[Path, Path]:
    g, p = folder / f"G{suffix}", folder / f"P{suffix}"
    torch.save({"params_ema": model.generator.state_dict()}, g)
    torch.save({"params": model.predictor.state_dict()}, p)
    return g, p


def test_release_weights_must_be_regular_torch_files(tmp_path):
    import cv2
    import numpy as np

    from dasr_model.checkpoints import latest_intact
    from dasr_model.release import load_release_weights

    g, p = _release_files(tmp_path, _release_model())
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer for ever
    png = tmp_path / "photo.png"
    cv2.imwrite(str(png), np.zeros((8, 8, 3), np.uint8))
    for bad, message in ((fifo, "not a regular file"), (tmp_path, "not a regular file"),
                         (png, r"not a readable weights file \(not a torch.save file\)")):
        with pytest.raises(DASRError, match=f"^{bad}: {message}") as caught:
            load_release_weights(bad, p)
        assert "pickled" not in str(caught.value)
        with pytest.raises(DASRError, match=f"^{bad}: {message}"):
            load_release_weights(g, bad)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "ckpt-1.pt", _state(_model(), step=1))
    os.mkfifo(run / "ckpt-5.pt")  # a checkpoint name on a FIFO: skipped, not waited on
    notes = []
    found = latest_intact(run, warn=notes.append)
    assert found is not None and found[0].name == "ckpt-1.pt" and notes == ["skipping ckpt-5.pt: not a regular file"]
    # a link to nothing (or a checkpoint pruned between the listing and the read) was an OSError that ended
    # dasr-sr --model RUN, where the newest checkpoint that reads is what it promises
    (run / "ckpt-5.pt").unlink()
    (run / "ckpt-6.pt").symlink_to(tmp_path / "nowhere.pt")
    notes.clear()
    found = latest_intact(run, warn=notes.append)
    assert found is not None and found[0].name == "ckpt-1.pt"
    assert notes == ["skipping ckpt-6.pt: not there (removed, or a link to nothing)"]
    with pytest.raises(FileNotFoundError):
        load_release_weights(tmp_path / "missing.pth", p)


def _rezip(src: Path, dst: Path, change) -> Path:
    """A copy of the torch.save zip `src` with each entry passed through change(name, data) -> (data, method)."""
    import zipfile

    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            data, method = change(info.filename, old.read(info.filename))
            new.writestr(info.filename, data, compress_type=method)
    return dst


def test_a_compressed_or_oversized_zip_is_refused_before_torch_load(tmp_path):
    import struct
    import zipfile

    n = 4_000_000  # floats: 16 MB that deflate to a few kilobytes
    small = tmp_path / "small.pt"
    torch.save({"a": torch.zeros(3)}, small)

    def bomb(name, data):
        if name.endswith("data.pkl"):  # the tensor and its storage hold n elements, not 3
            big = b"J" + struct.pack("<i", n)
            return data.replace(b"K\x03tq", big + b"tq").replace(b"K\x03\x85", big + b"\x85"), zipfile.ZIP_STORED
        if name.endswith("/data/0"):
            return bytes(4 * n), zipfile.ZIP_DEFLATED
        return data, zipfile.ZIP_STORED

    bombed = _rezip(small, tmp_path / "bomb.pt", bomb)
    assert bombed.stat().st_size < 100_000
    from dasr_model.release import load_release_weights

    for load in (load_checkpoint, lambda p: load_release_weights(p, p)):
        with pytest.raises(DASRError, match=r"bomb.pt: refused: its entry 'small/data/0' is compressed"):
            load(bombed)
    raw = bytearray(small.read_bytes())  # stored, but its directory claims an entry larger than the file
    entry = raw.index(b"PK\x01\x02")  # the first directory entry: its compressed and uncompressed sizes
    raw[entry + 20:entry + 28] = struct.pack("<II", 10**9, 10**9)
    (tmp_path / "claims.pt").write_bytes(bytes(raw))
    with pytest.raises(DASRError, match=r"refused: its entry 'small/data.pkl' runs past the zip's data"):
        load_checkpoint(tmp_path / "claims.pt")
    raw = bytearray(small.read_bytes())  # a zip directory claimed far larger than any checkpoint's
    end = raw.rindex(b"PK\x06\x06")  # the zip64 end record (torch writes one), which ZipFile believes
    raw[end + 40:end + 48] = struct.pack("<Q", 2**30)
    (tmp_path / "directory.pt").write_bytes(bytes(raw))
    with pytest.raises(DASRError, match="refused: its zip and zip64 end records disagree"):
        load_checkpoint(tmp_path / "directory.pt")
    eocd = raw.rindex(b"PK\x05\x06")  # the 32-bit record saturated, as for a huge file: the zip64 one counts
    raw[eocd + 12:eocd + 20] = struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF)
    (tmp_path / "directory.pt").write_bytes(bytes(raw))
    with pytest.raises(DASRError, match="refused: its zip directory is 1073741824 bytes"):
        load_checkpoint(tmp_path / "directory.pt")


def test_a_second_zip_directory_or_a_stretched_view_is_refused(tmp_path):
    """Two ways past the checks above, each refused before anything large is allocated:
    - a zip with two directories: zipfile (which the checks use) reads the one just before the end record,
      torch the one at the offset the end record states; a stored-looking copy placed last would pass the
      checks while torch inflated the compressed entry the other one describes;
    - a tensor that is a view larger than its storage (torch.save keeps views): a stride-0 expand of one
      number claims 20000 x 20000 in a 2 KB file, and checking it for NaN would allocate 400M flags."""
    import struct
    import zipfile

    n = 1_000_000
    small = tmp_path / "small.pt"
    torch.save({"a": torch.zeros(3)}, small)

    def bomb(name, data):
        if name.endswith("data.pkl"):
            big = b"J" + struct.pack("<i", n)
            return data.replace(b"K\x03tq", big + b"tq").replace(b"K\x03\x85", big + b"\x85"), zipfile.ZIP_STORED
        return (bytes(4 * n), zipfile.ZIP_DEFLATED) if name.endswith("/data/0") else (data, zipfile.ZIP_STORED)

    raw = _rezip(small, tmp_path / "bomb.pt", bomb).read_bytes()
    end = raw.rindex(b"PK\x05\x06")
    size, offset = struct.unpack("<II", raw[end + 12 : end + 20])
    copy = bytearray(raw[offset : offset + size])  # the directory again, every entry marked stored
    p = 0
    while p < len(copy):
        if struct.unpack("<H", copy[p + 10 : p + 12])[0]:
            copy[p + 10 : p + 12] = struct.pack("<H", 0)
            copy[p + 24 : p + 28] = copy[p + 20 : p + 24]  # uncompressed size = compressed size
        p += 46 + sum(struct.unpack("<HHH", copy[p + 28 : p + 34]))
    (tmp_path / "two.pt").write_bytes(raw[:end] + bytes(copy) + raw[end:])
    with zipfile.ZipFile(tmp_path / "two.pt") as z:  # what the checks would otherwise have seen
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    with pytest.raises(DASRError, match="two.pt: refused: its zip directory does not end where its end records"):
        load_checkpoint(tmp_path / "two.pt")
    # The same through zip64: zipfile reads the zip64 record just before the locator, torch's reader the
    # one the locator points to; two records, two directories
    cnt = struct.unpack("<H", raw[end + 10 : end + 12])[0]

    def record(at: int, length: int) -> bytes:
        return struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, cnt, cnt, length, at)

    body = bytearray(raw[:end])
    first = len(body)
    body += record(offset, size)  # torch's: the compressed entry
    second = len(body)
    body += bytes(copy) + record(second, len(copy))  # zipfile's: the stored-looking copy
    body += struct.pack("<4sIQI", b"PK\x06\x07", 0, first, 1)
    body += struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, cnt, cnt, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    (tmp_path / "two64.pt").write_bytes(bytes(body))
    with zipfile.ZipFile(tmp_path / "two64.pt") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    with pytest.raises(DASRError, match="two64.pt: refused: its zip64 records are not where its locator says"):
        load_checkpoint(tmp_path / "two64.pt")
    state = _state(_model())
    state["model"]["generator.conv_first.bias"] = torch.zeros(1).expand(20000, 20000)
    torch.save(state, tmp_path / "ckpt-1.pt")
    assert (tmp_path / "ckpt-1.pt").stat().st_size < 10**7
    with pytest.raises(DASRError, match=r"'generator.conv_first.bias' claims \(20000, 20000\) but stores 4 bytes"):
        load_checkpoint(tmp_path / "ckpt-1.pt")


def test_damaged_pickle_bytes_are_a_damaged_checkpoint(tmp_path):
    """Byte flips in data.pkl make torch's unpickler raise KeyError, IndexError or TypeError; each is
    'damaged or truncated' (latest_intact then skips the file), never a traceback."""
    from dasr_model.checkpoints import latest_intact

    save_checkpoint(tmp_path / "ckpt-1.pt", _state(_model(), step=1))
    good = (tmp_path / "ckpt-1.pt").read_bytes()
    start = good.index(b"data.pkl") + len(b"data.pkl")  # the pickle's bytes follow its local header
    outcomes = set()
    for i in range(400):
        raw = bytearray(good)
        raw[start + 40 + i] ^= 0x5A
        (tmp_path / "ckpt-2.pt").write_bytes(bytes(raw))
        try:
            load_checkpoint(tmp_path / "ckpt-2.pt")
            outcomes.add("loaded")
        except DASRError as exc:
            outcomes.add("refused")
            assert "ckpt-2.pt" in str(exc)
    assert "refused" in outcomes
    assert latest_intact(tmp_path, warn=lambda m: None) is not None


def test_every_error_of_torch_load_on_damage_is_a_damaged_checkpoint(tmp_path, monkeypatch):
    """Besides the errors byte flips give (above), two-byte damage made the weights-only unpickler fail an
    assert ('saved_id must be a tuple'), and a storage it lacks raises NotImplementedError: both are
    'damaged or truncated', never a traceback out of --resume. A sparse tensor is refused by the function
    its pickle calls to rebuild it, before torch.load runs."""
    import dasr_model.checkpoints as checkpoints

    save_checkpoint(tmp_path / "ckpt-1.pt", _state(_model(), step=1))
    for error in (AssertionError("saved_id must be a tuple"), NotImplementedError("no storage for it")):
        def broken(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(checkpoints.torch, "load", broken)
        with pytest.raises(DASRError, match="ckpt-1.pt: not a readable checkpoint \\(damaged or truncated\\)"):
            load_checkpoint(tmp_path / "ckpt-1.pt")
    monkeypatch.undo()
    state = _state(_model())
    state["model"]["generator.conv_first.bias"] = torch.zeros(4, 4).to_sparse()
    torch.save(state, tmp_path / "ckpt-2.pt")
    with pytest.raises(DASRError, match=r"ckpt-2.pt: refused: not a checkpoint of tensors \(it calls "
                                        r"torch._utils._rebuild_sparse_tensor\)"):
        load_checkpoint(tmp_path / "ckpt-2.pt")


def test_reading_and_writing_work_without_posix_only_calls(tmp_path, monkeypatch):
    """Windows before Python 3.13 has no os.fchmod, and no O_NONBLOCK: atomic writes and reads fall back."""
    import os

    from degrade.io import write_bytes_atomic

    monkeypatch.delattr(os, "fchmod")
    monkeypatch.delattr(os, "O_NONBLOCK")
    write_bytes_atomic(tmp_path / "a.bin", b"data")
    assert (tmp_path / "a.bin").read_bytes() == b"data"
    save_checkpoint(tmp_path / "ckpt-1.pt", _state(_model(), step=1))
    assert load_checkpoint(tmp_path / "ckpt-1.pt")["step"] == 1


def test_real_checkpoints_and_torch_save_files_still_load(tmp_path):
    from dasr_model.infer import load_model
    from dasr_model.release import load_release_weights
    from dasr_model.train import train

    from .conftest import make_small_dataset

    shards = make_small_dataset(tmp_path / "ds", count=4, seed=3, shard_size=4)
    cfg = TrainConfig(shards=shards, out=str(tmp_path / "run"), steps=2, batch_size=2, lr_crop=8, workers=0,
                      device="cpu", model=TINY)
    train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt-2.pt")
    assert ckpt["step"] == 2 and {"model", "ema_generator"} <= set(ckpt)
    assert load_model(tmp_path / "run").step == 2
    g, p = _release_files(tmp_path, _release_model())
    assert load_release_weights(g, p).config.num_experts == 1


def _poke(path: Path, name: str, value: bytes) -> Path:
    """Overwrite the first element of tensor `name` in the safetensors file `path` with `value`'s bytes."""
    import json

    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start = 8 + n + json.loads(raw[8 : 8 + n])[name]["data_offsets"][0]
    raw[start : start + len(value)] = value
    path.write_bytes(bytes(raw))
    return path


def test_non_finite_weights_are_refused_in_one_line(tmp_path):
    from dasr_model.infer import load_model
    from dasr_model.modelfile import read_model_file
    from dasr_model.release import load_release_weights

    model = _model()
    with pytest.raises(DASRError, match="generator.conv_hr.bias holds NaN or infinite values"):
        with torch.no_grad():
            broken = _model()
            broken.generator.conv_hr.bias[0] = float("nan")
        save_model_file(broken, tmp_path / "never.safetensors")  # the writer refuses such a model
    assert not (tmp_path / "never.safetensors").exists()
    nan_file = _poke(save_model_file(model, tmp_path / "nan.safetensors", dtype=torch.float32),
                     "generator.conv_hr.bias", struct.pack("<f", float("nan")))  # as damage or tampering would
    with pytest.raises(DASRError, match=r"nan.safetensors: refused: tensor generator.conv_hr.bias holds NaN"):
        read_model_file(nan_file)
    first = sorted(k for k in model.state_dict() if k.startswith("predictor."))[0]
    inf_file = _poke(save_model_file(model, tmp_path / "inf.safetensors", dtype=torch.float16), first,
                     struct.pack("<e", float("inf")))
    with pytest.raises(DASRError, match="refused: tensor predictor.* holds NaN or infinite values"):
        load_model(inf_file)
    save_checkpoint(tmp_path / "ckpt-nan.pt", _state(broken))
    ema_nan = _state(_model())
    ema_nan["ema_generator"]["conv_last.weight"] = torch.full_like(ema_nan["ema_generator"]["conv_last.weight"],
                                                                   float("-inf"))
    save_checkpoint(tmp_path / "ckpt-ema.pt", ema_nan)
    for name, message in (("ckpt-nan.pt", r"its model weight 'generator.conv_hr.bias' holds NaN"),
                          ("ckpt-ema.pt", r"its ema_generator weight 'conv_last.weight' holds NaN")):
        with pytest.raises(DASRError, match=f"{name}: refused: {message}"):
            load_model(tmp_path / name)
        result = CliRunner().invoke(export_main, [str(tmp_path / name), "-o", str(tmp_path / "out.safetensors")])
        assert result.exit_code == 1 and "NaN or infinite" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out.safetensors").exists()
    optimiser = {**_state(_model()), "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}}
    save_checkpoint(tmp_path / "ckpt-opt.pt", optimiser)
    assert load_checkpoint(tmp_path / "ckpt-opt.pt")["step"] == 7  # optimiser state is not a model's weight
    release = _release_model()
    g, p = _release_files(tmp_path, release)
    gs = {k: t.clone() for k, t in release.generator.state_dict().items()}
    ps = {k: t.clone() for k, t in release.predictor.state_dict().items()}
    assert torch.equal(load_release_weights(gs, ps).generator.conv_first.weight, gs["conv_first.weight"])
    gs["conv_first.weight"][0, 0, 0, 0, 0] = float("nan")
    torch.save({"params_ema": gs}, tmp_path / "G-nan.pth")
    with pytest.raises(DASRError, match=r"G-nan.pth: refused: its weight 'conv_first.weight' holds NaN"):
        load_release_weights(tmp_path / "G-nan.pth", p)
    ps[next(iter(ps))].view(-1)[0] = float("inf")
    with pytest.raises(DASRError, match="^release P weights: weight .* holds NaN or infinite values$"):
        load_release_weights(release.generator.state_dict(), ps)


def test_a_checkpoint_without_an_ema_generator_says_its_training_weights_are_used(tmp_path):
    from dasr_model.infer import load_model

    model = _model()
    state = _state(model)
    del state["ema_generator"]
    save_checkpoint(tmp_path / "ckpt-7.pt", state)
    loaded = load_model(tmp_path / "ckpt-7.pt")
    assert loaded.kind == "checkpoint without an EMA generator: its training weights"
    assert "without an EMA generator" in loaded.describe()
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.model.state_dict().items())


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    from dasr_model.infer import load_model

    state = _state(_model())
    state["model"]["generator.extra.weight"] = torch.zeros(2)
    save_checkpoint(tmp_path / "ckpt-7.pt", state)
    with pytest.raises(DASRError, match="do not fit its config \\(unexpected key\\(s\\) generator.extra.weight\\)"):
        load_model(tmp_path / "ckpt-7.pt")
    del state["model"]["generator.extra.weight"], state["model"]["generator.conv_first.bias"]
    state["model"]["generator.conv_last.bias"] = torch.zeros(5)
    save_checkpoint(tmp_path / "ckpt-7.pt", state)
    with pytest.raises(DASRError, match="\\(missing key\\(s\\) generator.conv_first.bias; generator.conv_last.bias "
                                        "of shape \\(5,\\), not \\(\\d+, \\d+\\)\\)"):
        load_model(tmp_path / "ckpt-7.pt")


def test_a_small_checkpoint_asking_for_a_large_model_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """A 2 kB checkpoint whose config asks for 64 experts made the loader build a 98 M-parameter model
    (635 MB) before it found the weights missing: the shapes are now compared on the meta device first."""
    from dasr_model import infer
    from dasr_model.infer import load_model

    state = _state(_model())
    state["config"]["model"]["num_experts"] = 64
    state["model"] = {}
    save_checkpoint(tmp_path / "ckpt-7.pt", state)
    built = []
    monkeypatch.setattr(infer, "DASR", lambda config: built.append(torch.empty(0).device) or DASR(config))
    with pytest.raises(DASRError, match="its weights do not fit its config \\(missing key"):
        load_model(tmp_path / "ckpt-7.pt")
    assert built == [torch.device("meta")]  # never on the CPU


def test_an_export_over_its_own_source_is_refused(tmp_path):
    model_file = tmp_path / "m.safetensors"
    save_model_file(_model(), model_file)
    before = model_file.read_bytes()
    result = CliRunner().invoke(export_main, [str(model_file), "-o", str(tmp_path / "." / "m.safetensors")])
    assert result.exit_code == 1 and "is the file the model was read from" in result.output
    run = tmp_path / "run"  # a run folder holding only its model file: the model is read from that file
    run.mkdir()
    save_model_file(_model(), run / "model.safetensors")
    before_run = (run / "model.safetensors").read_bytes()
    result = CliRunner().invoke(export_main, [str(run), "-o", str(run / "model.safetensors")])
    assert result.exit_code == 1 and "is the file the model was read from (" in result.output
    assert model_file.read_bytes() == before and (run / "model.safetensors").read_bytes() == before_run
    assert CliRunner().invoke(export_main, [str(run), "-o", str(tmp_path / "copy.safetensors")]).exit_code == 0


def test_a_checkpoint_of_shared_nested_lists_is_walked_once(tmp_path):
    """_storages walked every path through the pickled containers: lists nested 60 deep, each holding the
    one below twice, are a 2 kB file and 2^61 visits (dasr-export spun for ever; a security review). Each
    container is walked once now. An alarm fails the test instead of hanging it."""
    import signal

    nested = [torch.zeros(2)]
    for _ in range(60):
        nested = [nested, nested]
    torch.save({"config": {}, "step": 1, "model": {}, "junk": nested}, tmp_path / "ckpt-1.pt")
    assert (tmp_path / "ckpt-1.pt").stat().st_size < 16_000

    class Stuck(BaseException):  # past any handler of the loader's
        pass

    def stuck(signum, frame):
        raise Stuck("still walking after 20 s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(20)
    try:
        try:  # read or refused: soon, either way
            load_checkpoint(tmp_path / "ckpt-1.pt")
        except DASRError:
            pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
