"""The `degrade` command line: every command's --help, the happy paths, and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import degrade
from cli.main import main

from .conftest import make_small_dataset, refuse_files_in


@pytest.fixture()
def run():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.mark.parametrize("command", [[], ["levels"], ["apply"]])
def test_help_of_every_command(run, command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_levels_prints_the_recipes_from_code(run):
    result = run("levels")
    assert result.exit_code == 0
    for recipe in degrade.LEVELS.values():
        lo, hi = recipe.stage1.gaussian_sigma_range
        assert f"U[{lo:g}, {hi:g}]" in result.output
    assert "0.3 / 0.3 / 0.4" in result.output


def test_apply_on_the_bundled_sample_and_replays(run, tmp_path):
    out, params = tmp_path / "lr.png", tmp_path / "p.json"
    result = run("apply", "-o", out, "--level", "3", "--seed", "7", "--params-out", params)
    assert result.exit_code == 0, result.output
    lr = degrade.read_image(out)
    hr = degrade.read_image(degrade.sample_images()[0])
    assert lr.shape == (hr.shape[0] // 4, hr.shape[1] // 4, 3)
    record = degrade.DegradationParams.from_json(params.read_text())
    assert record.level == 3

    # Replaying the record gives the same bytes.
    again = tmp_path / "again.png"
    assert run("apply", "-o", again, "--params", params).exit_code == 0
    assert again.read_bytes() == out.read_bytes()

    # The printed vector replays to an image close to the original (float32 parameters, same seeds).
    line = next(x for x in result.output.splitlines() if x.startswith("v = "))
    v = np.array([float(x) for x in line[4:].split(",")])
    np.testing.assert_allclose(v, degrade.encode(record), atol=1e-4)
    vec_out = tmp_path / "vec.png"
    result = run("apply", "-o", vec_out, "--vector", ",".join(map(str, degrade.encode(record))),
                 "--noise-seed", str(record.noise1.seed))
    assert result.exit_code == 0, result.output
    assert degrade.read_image(vec_out).shape == lr.shape


def test_same_seed_same_bytes(run, tmp_path):
    for name in ("a.png", "b.png"):
        assert run("apply", "-o", tmp_path / name, "--level", "mix", "--seed", "3").exit_code == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_any_size_is_cropped_to_a_multiple_of_4(run, tmp_path):
    src = tmp_path / "odd.png"
    cv2.imwrite(str(src), np.random.default_rng(0).integers(0, 255, (70, 130, 3), dtype=np.uint8))
    result = run("apply", src, "-o", tmp_path / "lr.png", "--level", "1")
    assert result.exit_code == 0, result.output
    assert "cropped 130x70 to 128x68" in result.output
    assert degrade.read_image(tmp_path / "lr.png").shape == (17, 32, 3)


@pytest.mark.parametrize("kind", ["16bit", "gray", "alpha"])
def test_converted_inputs_work(run, tmp_path, kind):
    rng = np.random.default_rng(1)
    array = {
        "16bit": rng.integers(0, 65535, (64, 64, 3), dtype=np.uint16),
        "gray": rng.integers(0, 255, (64, 64), dtype=np.uint8),
        "alpha": rng.integers(0, 255, (64, 64, 4), dtype=np.uint8),
    }[kind]
    cv2.imwrite(str(tmp_path / "in.png"), array)
    result = run("apply", tmp_path / "in.png", "-o", tmp_path / "lr.png")
    assert result.exit_code == 0, result.output
    assert degrade.read_image(tmp_path / "lr.png").shape == (16, 16, 3)


def _bad_inputs(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    cv2.imwrite(str(tmp_path / "tiny.png"), np.zeros((16, 40, 3), np.uint8))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad_record.json").write_text(json.dumps({"level": 2}))
    out = str(tmp_path / "o.png")
    return {
        "missing file": (["apply", tmp_path / "nope.png", "-o", out], "no such file", 1),
        "not an image": (["apply", tmp_path / "text.png", "-o", out], "not a readable image", 1),
        "tiny image": (["apply", tmp_path / "tiny.png", "-o", out], "too small", 1),
        "short vector": (["apply", "-o", out, "--vector", "0.1,0.2"], "33 values", 1),
        "vector out of range": (["apply", "-o", out, "--vector", ",".join(["0"] * 32 + ["2"])], "outside [0, 1]", 1),
        "vector not numbers": (["apply", "-o", out, "--vector", "a,b"], "not a number", 1),
        "unknown level": (["apply", "-o", out, "--level", "4"], "unknown level", 2),
        "bad json": (["apply", "-o", out, "--params", tmp_path / "bad.json"], "not valid JSON", 1),
        "bad record": (["apply", "-o", out, "--params", tmp_path / "bad_record.json"], "lacks", 1),
        "missing params": (["apply", "-o", out, "--params", tmp_path / "none.json"], "cannot read", 1),
        "both replays": (["apply", "-o", out, "--params", tmp_path / "bad.json", "--vector", "0"], "not both", 2),
        "seed with replay": (["apply", "-o", out, "--seed", "3", "--vector", "0"], "cannot be combined", 2),
        "lossy output": (["apply", "-o", tmp_path / "o.jpg"], "lossless", 1),
        "missing output folder": (["apply", "-o", tmp_path / "no" / "o.png"], "does not exist", 1),
        "negative seed": (["apply", "-o", out, "--seed", "-1"], "-1", 2),
        "output is a folder": (["apply", "-o", tmp_path], "is a folder", 1),
        "params-out folder missing": (["apply", "-o", out, "--params-out", tmp_path / "no" / "p.json"],
                                      "does not exist", 1),
        "noise seed without vector": (["apply", "-o", out, "--noise-seed", "3"], "only applies to --vector", 2),
    }


BAD_CASES = [
    "missing file", "not an image", "tiny image", "short vector", "vector out of range", "vector not numbers",
    "unknown level", "bad json", "bad record", "missing params", "both replays", "seed with replay",
    "lossy output", "missing output folder", "negative seed", "output is a folder", "params-out folder missing",
    "noise seed without vector",
]


def test_bad_cases_are_all_listed(tmp_path):
    assert sorted(_bad_inputs(tmp_path)) == sorted(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gives_one_clear_line_and_nonzero_exit(run, tmp_path, case):
    args, message, code = _bad_inputs(tmp_path)[case]
    result = run(*args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1
    assert not (tmp_path / "o.png").exists()


def test_make_dataset_names_the_sources_it_skips(run, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    cv2.imwrite(str(src / "big.png"), np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    cv2.imwrite(str(src / "tiny.png"), np.zeros((40, 40, 3), np.uint8))
    (src / "broken.png").write_bytes(b"not a png")
    result = run("make-dataset", str(src), "--out", str(tmp_path / "ds"), "--count", "2", "--patch-size", "64")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "skipped" in text and "tiny.png: smaller than --patch-size 64" in text
    assert "skipped unreadable" in text and "broken.png" in text


def test_a_name_with_a_newline_stays_on_its_line(run, tmp_path):
    """A source named 'bad\nError: fake.png' printed a line of its own, a fake `Error: ...` among the skip
    lines, with exit status 0 (a review). Names are shown with control characters escaped."""
    src = tmp_path / "photos"
    src.mkdir()
    cv2.imwrite(str(src / "big.png"), np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    cv2.imwrite(str(src / "tiny\nError: small.png"), np.zeros((40, 40, 3), np.uint8))
    (src / "bad\nError: fake.png").write_bytes(b"not a png")
    (src / "esc\x1b[31mred.png").write_bytes(b"not a png")  # an escape sequence, and a C1 one (CSI), in a name
    result = run("make-dataset", str(src), "--out", str(tmp_path / "ds"), "--count", "2", "--patch-size", "64")
    assert result.exit_code == 0, result.output
    assert not [line for line in result.output.splitlines() if line.startswith("Error")], result.output
    assert "\x1b" not in result.output and "skipped unreadable esc\\x1b[31mred.png: not a readable" in result.output
    import io

    from cli.common import _show_degrade_warning, one_line

    printed = io.StringIO()  # the warnings the commands print (a folder search's names a file)
    _show_degrade_warning(degrade.DegradeWarning("gone\x9b2J\nx.png: skipped"), degrade.DegradeWarning, "f", 1,
                          file=printed)
    assert printed.getvalue() == "warning: gone\\x9b2J\\nx.png: skipped\n"
    assert one_line(degrade.ImageError("a\x1b[2J.png: not a readable image")) == "a\\x1b[2J.png: not a readable image"
    assert "skipped unreadable bad\\nError: fake.png: not a readable image" in result.output
    assert "skipped tiny\\nError: small.png: smaller than --patch-size 64" in result.output
    from cli.common import os_error

    assert os_error(FileNotFoundError(2, "No such file or directory", "a\nb\x1b[2J")) == (
        "a\\nb\\x1b[2J: No such file or directory")  # (an escape sequence is shown, not run, as well)


def test_make_dataset_picks_worker_processes_by_the_work(run, tmp_path, monkeypatch):
    import os

    from cli import main as cli_main
    from degrade import shards

    seen = []
    real = shards.make_dataset
    monkeypatch.setattr(shards, "make_dataset", lambda *a, **k: seen.append(k["jobs"]) or real(*a, **k))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert run("make-dataset", "--out", str(tmp_path / "a"), "--count", "8").exit_code == 0
    assert run("make-dataset", "--out", str(tmp_path / "b"), "--count", "8", "--jobs", "2").exit_code == 0
    assert seen == [1, 2]
    assert [cli_main.auto_jobs(n) for n in (256, 999, 1000, 2600, 10**6)] == [1, 1, 2, 5, 8]


def test_inspect_png_never_overwrites_the_dataset(run, tmp_path):
    """--png writes a new .png outside the dataset: a shard, the manifest or a file inside the dataset
    folder is refused before anything is written (a shard given as --png became a PNG, exit 0)."""
    ds = tmp_path / "ds"
    make_small_dataset(ds, count=4, seed=0, shard_size=2)
    before = {p.name: p.read_bytes() for p in ds.iterdir()}
    shard = ds / "shard-00000.h5"
    for target, png, message in ((ds, shard, "must end in .png"), (ds, ds / "manifest.json", "must end in .png"),
                                 (ds, ds / "sub" / "pic.png", "would overwrite part of the dataset"),
                                 (shard, shard, "must end in .png"), (ds, tmp_path / "pic.PNG.h5", ".png")):
        args = ["inspect", target, "--png", png] + (["--index", "0"] if png != ds / "sub" / "pic.png" else [])
        result = run(*args)
        assert result.exit_code == 2 and message in result.output, (png, result.output)
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == before and not (tmp_path / "pic.PNG.h5").exists()


def test_inspect_png_without_matplotlib_is_one_line_before_any_output(run, tmp_path, monkeypatch):
    """The picture needs the optional matplotlib: without it, a one-line error and exit 1 before the
    table (it was a RuntimeError traceback after the table)."""
    import sys

    ds = make_small_dataset(tmp_path / "ds", count=2, seed=0, shard_size=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = CliRunner().invoke(main, ["inspect", ds, "--index", "0", "--png", str(tmp_path / "s.png")])
    assert result.exit_code == 1 and result.output.strip() == (
        "Error: pictures need matplotlib: pip install '.[plot]' in the checkout (the plot extra)")


def test_paths_with_brackets_are_printed_as_they_are(run, tmp_path):
    """Rich's markup read '[x]' in a path as a style and dropped it, and failed on '[/x]' (a MarkupError's
    traceback), and ':ok:' became an emoji: the commands print every path as it is."""
    folder = tmp_path / "[/x] [b] :ok:"
    out = folder / "ds"
    made = run("make-dataset", "--out", out, "--count", "4", "--patch-size", "64", "--jobs", "1")
    assert made.exit_code == 0 and f"{out}: 4 samples in 1 shard(s)" in made.output
    lr = folder / "[red]lr.png"
    applied = run("apply", "-o", lr, "--level", "1", "--seed", "1")
    assert applied.exit_code == 0 and f"wrote {lr} (" in applied.output
    assert run("inspect", out).output.startswith(f"{out}: 4 samples")
    assert run("verify", out).output.strip().endswith(f"{out}: OK")


def test_inspect_labels_a_sample_by_its_stored_index(run, tmp_path):
    """A lone shard file other than the first: --index is a position in it, the label and --json give the
    sample's own index (the key of its random stream). The heading is one line with the path as it is, however
    long (a table's title was folded at the table's width) and whatever it holds ('[b]' was read as markup)."""
    ds = tmp_path / ("a" * 90) / "[b]ds"
    make_small_dataset(ds, count=4, seed=0, shard_size=2)
    result = run("inspect", ds / "shard-00001.h5", "--index", "1", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["index"] == 3
    lines = run("inspect", ds / "shard-00001.h5", "--index", "1").output.splitlines()
    assert lines[0] == f"{ds / 'shard-00001.h5'} sample 3 (position 1): level 2"
    assert run("inspect", ds, "--index", "1").output.startswith(f"{ds} sample 1: level ")
    assert run("inspect", ds).output.startswith(f"{ds}: 4 samples (level 1: ")


@pytest.mark.parametrize("module,name", [("cli.main:main", "degrade"), ("cli.train:main", "dasr-train"),
                                         ("cli.train:curves_main", "dasr-curves"), ("cli.sr:sr_main", "dasr-sr"),
                                         ("cli.sr:eval_main", "dasr-eval"), ("cli.sr:export_main", "dasr-export")])
def test_every_command_says_its_version(module, name):
    import importlib

    from degrade import __version__

    mod, attr = module.split(":")
    result = CliRunner().invoke(getattr(importlib.import_module(mod), attr), ["--version"])
    assert result.exit_code == 0 and result.output == f"{name}, version {__version__}\n"


VECTOR_TEXT = ",".join(f"{x:.6f}" for x in degrade.encode(degrade.sample_params(3, np.random.default_rng(4))))


def _library_bug(*args, **kwargs):
    raise ValueError("invalid literal for int() with base 10: 'x'")  # a plain ValueError: a bug, not a refusal


@pytest.mark.parametrize("where", ["decode", "check_vector", "encode"])
def test_a_library_bug_keeps_its_traceback(tmp_path, monkeypatch, where):
    """The commands catch only DegradeError (and OSError): a plain ValueError raised inside the library must
    not be printed as if it were the user's bad --vector."""
    target = degrade.vector if where == "check_vector" else degrade
    monkeypatch.setattr(target, where, _library_bug)
    args = ["apply", "-o", str(tmp_path / "o.png")]
    if where != "encode":
        args += ["--vector", VECTOR_TEXT]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, ValueError) and not isinstance(result.exception, SystemExit), result.output
    assert "invalid literal" not in result.output  # not turned into an "Error: --vector: ..." line
    if where != "encode":
        inspected = CliRunner().invoke(main, ["inspect", "--vector", VECTOR_TEXT])
        assert isinstance(inspected.exception, ValueError), inspected.output


def test_a_bad_vector_is_still_one_line():
    for text, message in (("1,x", "'x' is not a number"), (",".join(["0.5"] * 32 + ["nan"]), "NaN")):
        result = CliRunner().invoke(main, ["inspect", "--vector", text])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_make_dataset_and_make_testset_run_from_another_thread(tmp_path):
    """Only the main thread may set a signal handler: the SIGTERM handler made make-dataset, called from
    another thread (an embedding program, a GUI), fail with 'signal only works in main thread'; from
    there the commands run without one, and the main thread's handler is left as it was."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    results = {}

    def run(name, args):
        results[name] = CliRunner().invoke(main, args)

    threads = [threading.Thread(target=run, args=("dataset", ["make-dataset", "--out", str(tmp_path / "ds"), "--count",
                                                               "4", "--patch-size", "64", "--jobs", "1"])),
               threading.Thread(target=run, args=("testset", ["make-testset", "--out", str(tmp_path / "ts"),
                                                              "--levels", "1"]))]
    for t in threads:
        t.start()
        t.join()
    for name, result in results.items():
        assert result.exit_code == 0, (name, result.output, result.exception)
    assert signal.getsignal(signal.SIGTERM) is before


def test_apply_refuses_a_lossy_output_before_reading_and_writes_no_image_without_its_record(tmp_path, monkeypatch):
    """-o out.jpg was refused only after the image was read and degraded (1.35 GB and 2.6 s for a 4096 x 2736
    photo): now before the read (a missing input is not even looked at). A --params-out folder that refuses
    a file (an immutable folder, a full disk) left the LR image written without its record: both are
    written to temporary files first, so a failure leaves neither."""
    import degrade.io as dio

    res = CliRunner().invoke(main, ["apply", str(tmp_path / "missing.png"), "-o", str(tmp_path / "out.jpg")])
    assert res.exit_code == 1 and "out.jpg: output must be a lossless image" in res.output
    import os

    os.mkfifo(tmp_path / "fifo.json")  # what the write would refuse, too, is refused before the input is read
    for args in (["-o", str(tmp_path / "fifo.json.png")], ["-o", str(tmp_path / "x.png"), "--params-out",
                                                           str(tmp_path / "fifo.json")]):
        if "fifo.json.png" in args[1]:
            os.mkfifo(args[1])
        res = CliRunner().invoke(main, ["apply", str(tmp_path / "missing.png"), *args])
        assert res.exit_code == 1 and "exists and is a FIFO" in res.output and "missing.png" not in res.output
    for name in ("fifo.json", "fifo.json.png"):
        (tmp_path / name).unlink()
    refusing = tmp_path / "ro"
    refusing.mkdir()
    refuse_files_in(monkeypatch, refusing, PermissionError(1, "Operation not permitted"))
    res = CliRunner().invoke(main, ["apply", "-o", str(tmp_path / "lr.png"), "--params-out", str(refusing / "p.json")])
    assert res.exit_code == 1 and "p.json: Operation not permitted" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"] and not list(refusing.iterdir())
    res = CliRunner().invoke(main, ["apply", "-o", str(tmp_path / "lr.png"), "--params-out", str(tmp_path / "p.json")])
    assert res.exit_code == 0 and (tmp_path / "lr.png").is_file() and (tmp_path / "p.json").is_file()
    # the image's own write failing (a full disk, found at its sync): named as the image's, and the pair
    # there before left as it was (the record was once renamed first and blamed for the image's error)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    real_fsync, calls = dio.os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 1:  # the first sync: the image's, before the record is begun
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(dio.os, "fsync", fsync)
    res = CliRunner().invoke(main, ["apply", "-o", str(tmp_path / "lr.png"), "--params-out", str(tmp_path / "p.json"),
                                    "--seed", "3"])
    assert res.exit_code == 1 and f"{tmp_path / 'lr.png'}: No space left on device" in res.output, res.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_outputs_in_a_folder_that_takes_no_file_are_refused_before_the_work(tmp_path, monkeypatch):
    """A read-only folder (or file system, or one without permission) was found only by the write: `degrade
    inspect --png` printed its whole table first, `dasr-eval --per-image` ran the whole evaluation and then
    lost it (a review). degrade.io.check_can_write makes and removes a file there first. (As root chmod
    does not refuse a write, so the folder's refusal is the file system's EROFS, made here.)"""
    import errno

    import degrade.io as dio

    (tmp_path / "ro").mkdir()
    made = refuse_files_in(monkeypatch, tmp_path / "ro", OSError(errno.EROFS, "Read-only file system"))
    with pytest.raises(OSError, match="Read-only file system") as caught:
        dio.check_can_write(tmp_path / "ro" / "x.png")
    assert caught.value.filename == str(tmp_path / "ro" / "x.png")  # named as the output, not the probe
    dio.check_can_write(tmp_path / "ok.png")
    assert len(made) == 1 and not Path(made[0][1]).exists() and list(tmp_path.iterdir()) == [tmp_path / "ro"]
    ds = make_small_dataset(tmp_path / "ok-ds", count=4, seed=0, shard_size=4)
    result = CliRunner().invoke(main, ["inspect", ds, "--png", str(tmp_path / "ro" / "h.png")])
    assert result.exit_code == 1 and "ro/h.png: Read-only file system" in result.output
    assert "samples" not in result.output  # before the statistics, not after
    result = CliRunner().invoke(main, ["apply", "-o", str(tmp_path / "ro" / "lr.png")])
    assert result.exit_code == 1 and "ro/lr.png: Read-only file system" in result.output
    (tmp_path / "a-file.png").write_bytes(b"x")  # a file where the folder should be: it said 'does not exist'
    result = CliRunner().invoke(main, ["apply", "-o", str(tmp_path / "a-file.png" / "lr.png")])
    assert result.exit_code == 1 and f"{tmp_path / 'a-file.png'} is not a folder" in result.output, result.output


def test_a_reader_gone_from_the_pipe_is_no_error_line(tmp_path, monkeypatch):
    """`degrade inspect DS | head -1` printed 'Error: [Errno 32] Broken pipe' and exited 1: the commands
    turn an OSError into one line, a closed pipe included. It is now click's own quiet exit."""
    import errno

    from cli import common
    from cli import main as cli_main

    ds = make_small_dataset(tmp_path / "ds", count=4, seed=0, shard_size=4)

    def gone(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(cli_main.console, "print", gone)
    monkeypatch.setattr(common, "_stdout_is_a_pipe", lambda: True)
    result = CliRunner().invoke(main, ["inspect", ds])
    assert result.exit_code == 1 and "Broken pipe" not in result.output and "Error" not in result.output
    assert isinstance(result.exception, SystemExit)
    # with the output on a terminal or in a file, a broken pipe is another process's: said, as before
    monkeypatch.setattr(common, "_stdout_is_a_pipe", lambda: False)
    result = CliRunner().invoke(main, ["inspect", ds])
    assert result.exit_code == 1 and "Error: [Errno 32] Broken pipe" in result.output


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_stop_that_lands_in_a_finaliser_still_ends_the_command(signum):
    """A signal's exception raised while Python runs a finaliser is printed as "Exception ignored" and
    dropped: a make-dataset stopped by `timeout` ran on and finished its dataset (a review saw it once in 8
    runs, in a weakref callback). Under sigterm_as_exit such a stop is sent again as a signal, and raised
    in the code that runs next, a blocking wait too (a second review: a stop re-raised by interrupt_main
    waited for the wait to end). Here the signal is raised inside a __del__ (raise_signal runs the handler
    there); the code after it waits on an Event for 10 s. Restored at once after the drop, the stop meets
    the default handler and ends the process with SIGTERM (it was lost, exit 0)."""
    import signal
    import subprocess
    import sys
    import threading

    from cli.common import sigterm_as_exit

    class StopsWhenCollected:
        def __del__(self):
            signal.raise_signal(getattr(signal, signum))

    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a test worker may ignore it)
    restore = sigterm_as_exit()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt if signum == "SIGINT" else SystemExit) as caught:
            StopsWhenCollected()
            threading.Event().wait(10)  # the code after the finaliser: the stop must end it
    finally:
        restore()
        signal.signal(signal.SIGINT, previous_int)
    assert time.monotonic() - start < 5
    if signum == "SIGTERM":
        assert caught.value.code == 143
        code = ("import signal, time\nfrom cli.common import sigterm_as_exit\nclass S:\n    def __del__(self):\n"
                "        signal.raise_signal(signal.SIGTERM)\nrestore = sigterm_as_exit()\nS()\nrestore()\n"
                "time.sleep(10)\nprint('ran on')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == -signal.SIGTERM and "ran on" not in done.stdout, (done.returncode, done.stderr)


def test_make_dataset_refuses_what_needs_no_source_before_its_scan(run, tmp_path, monkeypatch):
    """The scan reads every source image (3 s for three 48 MP photos, hours for a large corpus), and a
    --patch-size of 66 or an --out that is a file was refused only after it (a review)."""
    from degrade import shards as ds

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned")

    monkeypatch.setattr(ds, "scan_sources", no_scan)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    for args, message in ((["--patch-size", "66"], "--patch-size must be a multiple of 4 and >= 32, got 66"),
                          (["--out", str(tmp_path / "a-file")], f"{tmp_path / 'a-file'}: exists and is not a folder"),
                          (["--out", str(tmp_path / "other")], "folder is not empty and holds no manifest.json"),
                          (["--count", "200000", "--shard-size", "1", "--out", str(tmp_path / "new")],
                           "in at most 100,000 shards")):
        result = run("make-dataset", "--out", str(tmp_path / "ds"), *args)
        assert result.exit_code == 1 and message in result.output and "scanned" not in result.output, result.output
    assert not (tmp_path / "ds").exists() and not (tmp_path / "new").exists()
