"""The model file (dasr-export): safetensors layout checked against the `safetensors` package, round trips,
hostile files refused before allocation, and export -> dasr-sr == the checkpoint's image."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import cv2  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import degrade  # noqa: E402
from cli.sr import export_main, sr_main  # noqa: E402
from dasr_model import modelfile  # noqa: E402
from dasr_model.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from dasr_model.errors import DASRError  # noqa: E402
from dasr_model.infer import load_model  # noqa: E402
from dasr_model.model import DASR, MAX_PARAMETERS, DASRConfig  # noqa: E402
from dasr_model.modelfile import read_model_file, save_model_file  # noqa: E402
from dasr_model.release import load_release_weights  # noqa: E402
from dasr_model.train import TrainConfig  # noqa: E402

TINY = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8, mixing="softmax", mapping_gain=1.0)


def _model(seed: int = 0) -> DASR:
    torch.manual_seed(seed)
    return DASR(TINY).eval()


def _ckpt(path, model: DASR, step: int = 7):
    ema = DASR(TINY).generator  # a different EMA generator: the file must carry the EMA one
    save_checkpoint(path, {"config": TrainConfig(shards="", out="", model=TINY).to_dict(), "step": step,
                           "model": model.state_dict(), "ema_generator": ema.state_dict()})
    return path


def _outputs(model: DASR, seed: int = 1) -> torch.Tensor:
    lr = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(lr)


def test_float32_round_trip_is_exact_and_bf16_close(tmp_path):
    model = _model()
    back, meta = read_model_file(save_model_file(model, tmp_path / "m.safetensors", dtype=torch.float32, step=5))
    assert back.config == TINY and meta["step"] == "5" and meta["format"] == "dasr-model"
    for name, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    half, _ = read_model_file(save_model_file(model, tmp_path / "h.safetensors"))  # bf16 by default
    torch.testing.assert_close(_outputs(half), _outputs(model), atol=2e-2, rtol=0)


def test_the_safetensors_package_reads_our_file_and_we_read_its(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    model = _model()
    path = save_model_file(model, tmp_path / "m.safetensors", dtype=torch.float16)
    theirs = st.load_file(str(path))
    ours = {f"predictor.{k}": t for k, t in model.predictor.state_dict().items()}
    ours |= {f"generator.{k}": t for k, t in model.generator.state_dict().items()}
    assert set(theirs) == set(ours)
    for name, t in ours.items():
        assert theirs[name].dtype == torch.float16 and torch.equal(theirs[name], t.half()), name
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == TINY.to_dict()
    other = tmp_path / "theirs.safetensors"
    st.save_file({k: t.float() for k, t in ours.items()}, str(other),
                 metadata={"format": "dasr-model", "version": "1", "config": json.dumps(TINY.to_dict())})
    back, _ = read_model_file(other)
    torch.testing.assert_close(_outputs(back), _outputs(model), atol=0, rtol=0)


def _write(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _good_header(tmp_path):
    path = save_model_file(_model(), tmp_path / "good.safetensors", dtype=torch.float32)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


@pytest.mark.parametrize("case,message", [
    ("huge header length", "header length"),
    ("header not JSON", "not JSON"),
    ("deep JSON", "not JSON"),
    ("other format", "not a dasr model file"),
    ("unknown config key", "unknown field"),
    ("0 experts", "num_experts must be at least 1"),
    ("huge model", "over the limit"),
    ("wrong shape", "shape"),
    ("byte range outside the file", "byte range"),
    ("missing tensor", "missing"),
    ("pickle dtype", "dtype"),
    ("a list as dtype", "dtype must be one of"),  # looked up in a dict: a TypeError's traceback
    ("a header without its tensors", "bytes of tensors, where its config needs at least"),
    ("config not a string", "metadata values must be strings"),
    ("float shape", "shape"),
    ("a million tiny blocks", "num_block must be at most 256"),
    ("a thousand experts", "num_experts must be at most 64"),
    ("a float overflowing", "mapping_gain must be a finite number, got an integer of 1329 bits"),
    ("overlapping tensors", "overlap or gap"),
    ("bytes after the last tensor", "after the last tensor"),
    ("a tensor named twice", "in its header the key .* appears twice in one object"),
    ("a config key named twice", "unreadable config \\(the key 'num_block' appears twice"),
])
def test_hostile_model_files_are_refused_in_one_line(tmp_path, monkeypatch, case, message):
    header, data = _good_header(tmp_path)
    meta = header["__metadata__"]
    first = next(k for k in header if k != "__metadata__")
    path = tmp_path / "bad.safetensors"
    if case == "huge header length":
        _write(path, b"{}", length=2**62)
    elif case == "header not JSON":
        _write(path, b"{nope")
    elif case == "deep JSON":
        _write(path, _deep(100_000))
    elif case == "a tensor named twice":  # two byte ranges for one name: which one counts is the reader's guess
        text = json.dumps(header)
        entry = f'"{first}": {json.dumps(header[first])}'
        _write(path, text.replace(entry, f'{entry}, "{first}": {json.dumps({**header[first], "data_offsets": [0, 4]})}',
                                  1).encode(), data)
    else:
        if case == "other format":
            meta["format"] = "something-else"
        elif case == "unknown config key":
            meta["config"] = json.dumps({**TINY.to_dict(), "run_this": "rm -rf /"})
        elif case == "0 experts":
            meta["config"] = json.dumps({**TINY.to_dict(), "num_experts": 0})
        elif case == "huge model":  # would be terabytes: refused from the sizes, before anything is allocated
            meta["config"] = json.dumps({**TINY.to_dict(), "num_feat": 100_000})
        elif case == "a million tiny blocks":  # 1-feature blocks: under the parameter cap, yet 25 s and 1.6 GB
            # per 100,000 blocks to build before the tensors are checked
            meta["config"] = json.dumps({**TINY.to_dict(), "num_block": 10**6, "num_feat": 1, "num_experts": 1,
                                         "predictor_feat": 1, "mapping_hidden": 1})
        elif case == "a float overflowing":  # float(10**400) raised OverflowError: a traceback
            meta["config"] = json.dumps({**TINY.to_dict(), "mapping_gain": 10**400})
        elif case == "a config key named twice":
            meta["config"] = json.dumps(TINY.to_dict()).replace('"num_block": ', '"num_block": 7, "num_block": ', 1)
        elif case == "a thousand experts":
            meta["config"] = json.dumps({**TINY.to_dict(), "num_experts": 1000, "num_block": 1, "num_feat": 1})
        elif case == "wrong shape":
            header[first]["shape"] = [1]
        elif case == "byte range outside the file":
            header[first]["data_offsets"] = [0, 10**12]
        elif case == "missing tensor":
            del header[first]
        elif case == "pickle dtype":
            header[first]["dtype"] = "object"
        elif case == "a list as dtype":
            header[first]["dtype"] = ["F32"]
        elif case == "a header without its tensors":  # refused before the model is built (up to 100M parameters)
            data = b""
        elif case == "config not a string":
            meta["config"] = TINY.to_dict()
        elif case == "float shape":
            header[first]["shape"] = [float(n) for n in header[first]["shape"]]
        elif case == "overlapping tensors":
            a, b = next((a, b) for a in header for b in header if a < b != "__metadata__" != a
                        and header[a]["shape"] == header[b]["shape"])  # two tensors of one shape
            header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b reads a's bytes too
        elif case == "bytes after the last tensor":
            data += b"\0" * 100
        _write(path, header, data)
    if case in ("a million tiny blocks", "a thousand experts", "a header without its tensors"):  # no model built
        monkeypatch.setattr(modelfile, "DASR", lambda config: pytest.fail("built the model"))
    with pytest.raises(DASRError, match=message):
        read_model_file(path)
    assert MAX_PARAMETERS < 10**9


def test_a_model_file_of_another_version_is_refused_naming_it(tmp_path):
    """A file of format version "2" is refused, naming its version and the one this reader reads: with the
    version check dropped, every test passed (a mutation audit: no test wrote another version) and such a
    file would be read as if its layout were version 1's. Oracle: the module's VERSION, "1", written out."""
    header, data = _good_header(tmp_path)
    header["__metadata__"]["version"] = "2"
    with pytest.raises(DASRError, match="model file version '2'; this version reads 1$"):
        read_model_file(_write(tmp_path / "v2.safetensors", header, data))


def test_a_dtype_whose_byte_range_does_not_hold_its_shape_is_one_line(tmp_path):
    """A tensor's byte range must be exactly its shape's element count times its dtype's size: a header
    claiming F16 over the span of F32 bytes (twice what F16 needs) got past the check with the size
    comparison dropped, and the reshape raised torch's RuntimeError, a traceback; every test passed (a
    mutation audit). Oracle: the safetensors layout (a span of prod(shape) x itemsize bytes), refused as a
    one-line DASRError naming the byte range."""
    header, data = _good_header(tmp_path)
    first = next(k for k in header if k != "__metadata__")
    begin, end = header[first]["data_offsets"]
    assert header[first]["dtype"] == "F32" and end - begin == 4 * np.prod(header[first]["shape"])
    header[first]["dtype"] = "F16"
    with pytest.raises(DASRError, match="byte range") as exc:
        read_model_file(_write(tmp_path / "f16.safetensors", header, data))
    assert "\n" not in str(exc.value)


def test_tensors_that_overlap_without_leaving_a_gap_are_refused(tmp_path):
    """The byte ranges tile the data exactly: a range that starts before the one before it ends is an
    overlap. With only a range starting past the last end refused (a gap), every test passed (a mutation
    audit: the overlap case also left a gap, refused as one). Oracle: the last tensor moved 4 bytes back over
    the one before and the data cut by 4 bytes, so the ranges overlap and cover the data with no gap or tail."""
    header, data = _good_header(tmp_path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    begin, end = header[last]["data_offsets"]
    assert end == len(data) and begin > 0
    header[last]["data_offsets"] = [begin - 4, end - 4]
    with pytest.raises(DASRError, match=f"byte range starts at {begin - 4}, expected {begin} \\(overlap or gap\\)"):
        read_model_file(_write(tmp_path / "overlap.safetensors", header, data[:-4]))


def test_the_header_is_padded_so_the_data_starts_8_byte_aligned(tmp_path):
    """The safetensors format pads the header with spaces so the tensors start at a multiple of 8 bytes:
    padding by len % 8 instead of -len % 8 passed every test (a mutation audit: it is right when the JSON's
    length is 0 or 4 mod 8, and our reader does not need the alignment). Oracle: (8 + header length) % 8 == 0
    and the header's JSON followed by spaces only, for sources of 0 to 7 characters (every length mod 8)."""
    model = _model()
    residues = set()
    for k in range(8):
        raw = save_model_file(model, tmp_path / f"m{k}.safetensors", source="x" * k).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        text = raw[8 : 8 + n].decode()
        assert (8 + n) % 8 == 0, k
        assert text.rstrip(" ").endswith("}") and len(text) - len(text.rstrip(" ")) < 8
        residues.add(len(text.rstrip(" ")) % 8)
        assert json.loads(text)["__metadata__"]["source"] == "x" * k
    assert residues == set(range(8))  # the unpadded lengths took every value mod 8


def test_truncated_model_file_is_refused(tmp_path):
    path = save_model_file(_model(), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DASRError, match="byte range|truncated"):
        read_model_file(path)


def test_config_sizes_are_exact_and_bounded():
    for cfg in (DASRConfig(), TINY, DASRConfig(num_experts=1, num_block=3, num_feat=12, mapping_hidden=4)):
        assert cfg.parameter_count() == sum(p.numel() for p in DASR(cfg).parameters())
    with pytest.raises(DASRError, match="unknown field"):
        DASRConfig.from_dict({"num_experts": 5, "bogus": 1})
    with pytest.raises(DASRError, match="must be int"):
        DASRConfig.from_dict({**DASRConfig().to_dict(), "num_feat": "64"})
    without_mixing = TINY.to_dict()
    del without_mixing["mixing"]  # a default would silently turn this softmax model linear
    with pytest.raises(DASRError, match="missing field.*mixing"):
        DASRConfig.from_dict(without_mixing)
    with pytest.raises(DASRError, match="over the limit"):
        DASRConfig(num_feat=4096)  # the 28.8 GB allocation the issue saw is refused from the sizes


class _Evil:
    def __reduce__(self):  # unpickling this would run a shell command
        import os

        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_bearing_checkpoint_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ckpt-1.pt"
    torch.save({"config": {"model": {}}, "model": {}, "evil": _Evil()}, path)
    with pytest.raises(DASRError, match="refused"):
        load_checkpoint(path)
    result = CliRunner().invoke(sr_main, [str(path), "-o", str(tmp_path / "o"), "--model", str(path)])
    assert result.exit_code == 1 and "refused" in result.output and "Traceback" not in result.output
    assert "weights_only" not in result.output and not (tmp_path / "pwned.txt").exists()
    (tmp_path / "ckpt-2.pt").write_bytes(b"PK\x03\x04" + b"\0" * 50)  # looks like a zip, is not one
    with pytest.raises(DASRError, match="damaged or truncated"):
        load_checkpoint(tmp_path / "ckpt-2.pt")


def test_checkpoint_with_a_bad_config_or_weights_is_refused(tmp_path):
    model = _model()
    bad = {"config": {**TrainConfig(shards="", out="", model=TINY).to_dict(), "model": {**TINY.to_dict(),
                                                                                        "num_experts": 0}},
           "model": model.state_dict(), "step": 1}
    save_checkpoint(tmp_path / "a.pt", bad)
    with pytest.raises(DASRError, match="num_experts"):
        load_model(tmp_path / "a.pt")
    state = model.state_dict()
    state.pop("generator.conv_hr.bias")
    save_checkpoint(tmp_path / "b.pt", {"config": TrainConfig(shards="", out="", model=TINY).to_dict(),
                                        "model": state, "step": 1})
    with pytest.raises(DASRError, match="do not fit"):
        load_model(tmp_path / "b.pt")


def test_release_weights_with_wrong_keys_are_one_line():
    with pytest.raises(DASRError, match="conv_first"):
        load_release_weights({"something": torch.zeros(1)}, {})
    for bad in ([torch.zeros(3)], torch.zeros(3), {"conv_first.weight": "a string"}):  # params not a state dict
        for g, p in (({"params": bad}, {}), ({"params_ema": bad, "params": {}}, {}), ({}, {"params": bad})):
            with pytest.raises(DASRError, match="must be a dict of named tensors"):
                load_release_weights(g, p)


def test_export_then_dasr_sr_gives_the_checkpoints_image(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = _ckpt(run / "ckpt-7.pt", _model())
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), np.random.default_rng(2).integers(0, 255, (18, 22, 3), dtype=np.uint8))
    result = CliRunner().invoke(export_main, [str(run), "-o", str(tmp_path / "m.safetensors"), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "ckpt-7.pt (checkpoint): step 7, 2 experts" in text and "wrote" in text
    images = {}
    for name, model in (("checkpoint", ckpt), ("run folder", run), ("model file", tmp_path / "m.safetensors")):
        res = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / name), "--model", str(model),
                                           "--device", "cpu"])
        assert res.exit_code == 0, res.output
        images[name] = cv2.imread(str(tmp_path / name / "a_x4.png"))
    assert np.array_equal(images["model file"], images["checkpoint"])
    assert np.array_equal(images["run folder"], images["checkpoint"])
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.step == 7 and loaded.kind == "model file"
    bf16 = CliRunner().invoke(export_main, [str(ckpt), "-o", str(tmp_path / "small.safetensors")])
    assert bf16.exit_code == 0, bf16.output
    assert (tmp_path / "small.safetensors").stat().st_size < (tmp_path / "m.safetensors").stat().st_size * 0.6
    assert CliRunner().invoke(export_main, [str(ckpt), "-o", str(tmp_path / "x.pt")]).exit_code == 2
    assert degrade.read_image(tmp_path / "checkpoint" / "a_x4.png").shape == (72, 88, 3)


def test_a_model_file_step_and_checkpoint_step_are_checked(tmp_path):
    import re

    path = save_model_file(_model(), tmp_path / "m.safetensors", dtype=torch.float32, step=3)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["step"] = "\u00b2"  # isdigit() is True, int() refuses it
    _write(tmp_path / "odd.safetensors", header, raw[8 + n :])
    assert load_model(tmp_path / "odd.safetensors").step is None
    run = tmp_path / "run"
    run.mkdir()
    for bad in ("abc", [1], 7.9, True, -5, None):
        state = {"config": TrainConfig(shards="", out="", model=TINY).to_dict(), "model": _model().state_dict(),
                 "ema_generator": _model().generator.state_dict(), "step": bad}
        save_checkpoint(run / "ckpt-7.pt", state)
        with pytest.raises(DASRError, match=re.escape("its step is")):
            load_model(run / "ckpt-7.pt")
        with pytest.raises(DASRError, match="no readable"):  # the run folder skips it
            load_model(run)


def test_a_fifo_is_not_opened_as_a_model(tmp_path):
    import os

    fifo = tmp_path / "m.fifo"
    os.mkfifo(fifo)
    with pytest.raises(DASRError, match="not a regular file"):
        load_model(fifo)
