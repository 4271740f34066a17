"""degrade make-testset / degrade.testset: whole images degraded at fixed seeds into image folders, read back
checked, and scored by dasr-eval --testset exactly as dasr-eval --hr-dir scores the same HR folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import degrade
from cli.main import main as degrade_cli
from degrade.errors import DegradeError
from degrade.testset import make_testset, open_testset, read_test_hr
from degrade.testset import testset_params as draw  # imported as a name pytest does not collect


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory) -> Path:
    """Three bundled photos, one in a subfolder, one 16-bit with odd sides (cropped to a multiple of 4)."""
    root = tmp_path_factory.mktemp("hr")
    photos = degrade.sample_images()
    (root / "sub").mkdir()
    shutil.copy(photos[0], root / "a.png")
    shutil.copy(photos[1], root / "sub" / "b.png")
    img = cv2.imread(str(photos[2]), cv2.IMREAD_UNCHANGED)[:201, :303]
    cv2.imwrite(str(root / "c.png"), img.astype(np.uint16) * 257)
    return root


@pytest.fixture(scope="module")
def testset(hr_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ts") / "set"
    make_testset(hr_dir, out, levels=(1, 2, 3), seed=5)
    return out


def test_the_files_are_the_degradations_of_the_cropped_hr(hr_dir, testset):
    """Oracle: read_test_hr + degrade.apply with the draw (seed, i, L), image by image."""
    names = ["a", "c", "sub/b"]  # sorted by relative path
    m = json.loads((testset / "manifest.json").read_text())
    assert [e["name"] for e in m["images"]] == names and m["levels"] == [1, 2, 3] and m["seed"] == 5
    for i, name in enumerate(names):
        src = hr_dir / f"{name}.png"
        hr = read_test_hr(src)
        assert hr.dtype == np.uint8 and hr.shape[0] % 4 == 0 and hr.shape[1] % 4 == 0
        assert np.array_equal(degrade.read_image(testset / "HR" / f"{name}.png"), hr.astype(np.float32) / 255)
        for level in (1, 2, 3):
            params = draw(level, 5, i)
            lr = degrade.apply(hr, params)
            assert np.array_equal(degrade.read_image(testset / "LR" / f"level{level}" / f"{name}.png"), lr)
            record = json.loads((testset / "params" / f"level{level}" / f"{name}.json").read_text())
            assert degrade.DegradationParams.from_dict(record) == params and record["level"] == level
            assert m["images"][i]["lr"][str(level)]["v"] == [float(x) for x in degrade.encode(params)]
    assert read_test_hr(hr_dir / "c.png").shape == (200, 300, 3)


def test_the_draw_is_the_documented_seed_sequence():
    """Image i at level L is drawn from SeedSequence([seed, i, L]) (this module's docstring, docs/inference.md):
    the order is the set's public contract, so a set can be rebuilt from its seed. With [seed, L, i], every
    test passed (a mutation audit: the tests' oracle drew through testset_params itself). Oracle:
    degrade.sample_params with the documented SeedSequence, written out."""
    for i in range(3):
        for level in (1, 2, 3):
            want = degrade.sample_params(level, np.random.default_rng(np.random.SeedSequence([5, i, level])))
            assert draw(level, 5, i) == want, (i, level)


def test_a_record_replays_to_the_same_lr_bytes(testset, tmp_path):
    """`degrade apply HR/NAME.png --params params/levelL/NAME.json` writes the set's LR file, byte for byte."""
    out = tmp_path / "replay.png"
    res = CliRunner().invoke(degrade_cli, ["apply", str(testset / "HR" / "sub" / "b.png"), "-o", str(out),
                                           "--params", str(testset / "params" / "level3" / "sub" / "b.json")])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == (testset / "LR" / "level3" / "sub" / "b.png").read_bytes()


def test_the_bytes_do_not_depend_on_the_number_of_workers(hr_dir, testset, tmp_path):
    make_testset(hr_dir, tmp_path / "j2", levels=(1, 2, 3), seed=5, jobs=2)
    files = sorted(p.relative_to(testset) for p in testset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "j2") for p in (tmp_path / "j2").rglob("*") if p.is_file())
    assert len(files) == 1 + 3 + 3 * 3 * 2
    for f in files:
        same = (testset / f).read_bytes() == (tmp_path / "j2" / f).read_bytes()
        assert same or f.name == "manifest.json", f
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (testset, tmp_path / "j2"))
    assert a == b  # the source folder too: the same


def test_read_back_equals_the_pairs_dasr_eval_makes_from_the_hr_folder(hr_dir, testset):
    pytest.importorskip("torch")
    from dasr_model.evaluate import pairs_from_hr_dir, pairs_from_testset

    want, got = list(pairs_from_hr_dir(hr_dir, [1, 2, 3], 5)), list(pairs_from_testset(testset))
    assert len(want) == len(got) == 9
    for (lv, hr, lr, v), (lv2, hr2, lr2, v2) in zip(want, got):
        assert lv == lv2 and np.array_equal(hr, hr2) and np.array_equal(lr, lr2) and np.array_equal(v, v2)
    assert [p[0] for p in pairs_from_testset(testset, [3, 1])] == [3, 1] * 3


def test_dasr_eval_scores_a_testset_as_it_scores_the_hr_folder(ckpt, hr_dir, testset):
    pytest.importorskip("torch")
    from cli.sr import eval_main

    def run(*args: str) -> dict:
        res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--device", "cpu", "--json", *args])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    fresh = run("--hr-dir", str(hr_dir), "--levels", "1,3", "--seed", "5")
    saved = run("--testset", str(testset), "--levels", "1,3")
    assert fresh == saved and set(saved["levels"]) == {"1", "3"} and saved["mae"]
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--testset", str(testset), "--seed", "1"])
    assert res.exit_code == 2 and "with --testset the LR images are given" in res.output
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--testset", str(testset), "--levels", "1,1"])
    assert res.exit_code == 2 and "each level once" in res.output
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--shards", str(testset), "--levels", "1"])
    assert res.exit_code == 2 and "--levels chooses how --hr-dir is degraded; with --shards" in res.output


def test_a_changed_file_or_a_hostile_manifest_is_refused(testset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(testset, bad)
    lr = bad / "LR" / "level2" / "a.png"
    img = cv2.imread(str(lr))
    img[0, 0] ^= 1
    cv2.imwrite(str(lr), img)
    with pytest.raises(DegradeError, match=r"a\.png: its bytes differ from the test set's manifest"):
        list(open_testset(bad).pairs([2]))
    m = json.loads((testset / "manifest.json").read_text())
    for name in ("../a", "/etc/passwd", "sub/../../a", "a\\..\\b", "", "./a"):
        m["images"][0]["name"] = name
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(DegradeError, match="not a plain relative path"):
            open_testset(bad)
    m["images"][0]["name"] = "c"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DegradeError, match="appears twice"):
        open_testset(bad)
    m["images"][0]["name"] = "a"
    m["images"][0]["lr"]["1"]["v"] = [float("nan")] * 33
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DegradeError, match="finite numbers"):
        open_testset(bad)
    with pytest.raises(DegradeError, match="not a test set"):
        open_testset(tmp_path)


def test_make_testset_refuses_and_leaves_nothing_behind(hr_dir, tmp_path, monkeypatch):
    res = CliRunner().invoke(degrade_cli, ["make-testset", str(hr_dir), "--out", str(hr_dir)])
    assert res.exit_code == 1 and "lies inside" in res.output
    before = sorted(p.relative_to(hr_dir).as_posix() for p in hr_dir.rglob("*"))
    res = CliRunner().invoke(degrade_cli, ["make-testset", str(hr_dir), "--out", str(hr_dir / "ts")])  # a next run
    assert res.exit_code == 1 and f"{hr_dir / 'ts'} lies inside {hr_dir}: its HR and LR images would be taken for " \
        "HR photos" in " ".join(res.output.split())  # would have read the set's images as photos
    assert sorted(p.relative_to(hr_dir).as_posix() for p in hr_dir.rglob("*")) == before
    twins = tmp_path / "twins"
    twins.mkdir()
    shutil.copy(hr_dir / "a.png", twins / "x.png")
    cv2.imwrite(str(twins / "x.jpg"), cv2.imread(str(hr_dir / "a.png")))
    with pytest.raises(DegradeError, match="two images of one name"):
        make_testset(twins, tmp_path / "t1")
    with pytest.raises(DegradeError, match="distinct levels among 1, 2, 3"):
        make_testset(hr_dir, tmp_path / "t1", levels=(2, 4))
    calls = []

    def fail_second(self, index):
        calls.append(index)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, index)

    from degrade.testset import _Degrade

    real = _Degrade.__call__
    monkeypatch.setattr(_Degrade, "__call__", fail_second)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="No space left"):
        make_testset(hr_dir, tmp_path / "empty", levels=(1,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "twins"]  # no half set, no hidden folder
    assert not any((tmp_path / "empty").iterdir())


def test_make_testset_cli_writes_a_set_of_the_bundled_photos(tmp_path):
    res = CliRunner().invoke(degrade_cli, ["make-testset", "--out", str(tmp_path / "s"), "--levels", "2"])
    assert res.exit_code == 0, res.output
    ts = open_testset(tmp_path / "s")
    assert ts.levels == [2] and len(ts.images) == len(degrade.sample_images())
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["HR", "LR", "manifest.json", "params"]
    res = CliRunner().invoke(degrade_cli, ["make-testset", "--out", str(tmp_path / "t"), "--levels", "two"])
    assert res.exit_code == 2 and "expected a subset of 1,2,3" in res.output


def test_odd_json_in_a_manifest_is_one_line_never_a_crash(testset, tmp_path):
    """Numbers Python reads but float32 cannot hold, digits past int's limit, nesting past recursion's."""
    bad = tmp_path / "bad"
    shutil.copytree(testset, bad)
    m = json.loads((testset / "manifest.json").read_text())
    texts = {}
    for name, value in (("huge int", 10**400), ("1e300", 1e300)):
        m["images"][0]["lr"]["1"]["v"] = [value] + [0.0] * 32
        texts[name] = json.dumps(m)
    texts["5000 digits"] = json.dumps(m).replace('"seed": 5', '"seed": ' + "9" * 5000)
    texts["deep"] = json.dumps(m).replace('"levels": [1, 2, 3]', '"levels": ' + "[" * 100000 + "]" * 100000)
    for name, text in texts.items():
        (bad / "manifest.json").write_text(text)
        with pytest.raises(DegradeError, match="finite numbers|not a readable JSON manifest") as info:
            open_testset(bad)
        assert "\n" not in str(info.value), name


def test_a_link_leading_out_of_the_set_is_refused(testset, tmp_path):
    linked = tmp_path / "linked"
    shutil.copytree(testset, linked)
    outside = tmp_path / "outside"
    shutil.move(str(linked / "LR" / "level1"), outside)
    (linked / "LR" / "level1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DegradeError, match="leads out of the test set"):
        list(open_testset(linked).pairs([1]))
    assert len(list(open_testset(linked).pairs([2]))) == 3  # the other levels still read


def test_an_empty_folder_keeps_itself_its_mode_included(hr_dir, tmp_path, monkeypatch):
    """The set moves into an empty --out instead of replacing it (mode, owner, a mount point stay); `.` too."""
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o2770)
    inode = out.stat().st_ino
    make_testset(hr_dir, out, levels=(1,))
    assert out.stat().st_ino == inode and out.stat().st_mode & 0o7777 == 0o2770
    assert sorted(p.name for p in out.iterdir()) == ["HR", "LR", "manifest.json", "params"]
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    make_testset(hr_dir, ".", levels=(2,))
    assert open_testset(here).levels == [2]


def test_sigterm_leaves_no_hidden_folder(hr_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    big = tmp_path / "big"
    big.mkdir()
    for i in range(300):  # seconds of work: the signal lands mid-run, not after it (40 took under a second)
        (big / f"{i:03d}.png").symlink_to(hr_dir / "a.png")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "make-testset", str(big), "--out",
                             str(tmp_path / "set")], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".make-testset.") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated: nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


def test_dasr_eval_writes_per_image_scores_and_the_sr_images_dasr_sr_would(ckpt, testset, tmp_path):
    """The CSV's rows average to the table's means; each saved SR image is, byte for byte, what dasr-sr
    writes for that LR file (an independent path: its own reading, tiling and writing)."""
    import csv

    pytest.importorskip("torch")
    from cli.sr import eval_main, sr_main

    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--device", "cpu", "--json", "--testset",
                                         str(testset), "--levels", "2,3", "--per-image", str(tmp_path / "s.csv"),
                                         "--save-sr", str(tmp_path / "sr")])
    assert res.exit_code == 0, res.output
    means = json.loads(res.stdout)["levels"]
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [(r["level"], r["name"]) for r in rows] == [(lv, n) for n in ("a", "c", "sub/b") for lv in ("2", "3")]
    assert list(rows[0])[:7] == ["level", "name", "psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y", "psnr_rgb"]
    for level in ("2", "3"):
        for key in ("psnr_y", "ssim_y", "bicubic_psnr_y", "psnr_rgb"):
            values = [float(r[key]) for r in rows if r["level"] == level]
            assert np.mean(values) == pytest.approx(means[level][key], rel=1e-12)
    res = CliRunner().invoke(sr_main, [str(testset / "LR" / "level3" / "sub" / "b.png"), "-o", str(tmp_path / "o"),
                                       "--model", str(ckpt), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sr" / "level3" / "sub" / "b.png").read_bytes() == (tmp_path / "o" / "b_x4.png").read_bytes()
    assert len(list((tmp_path / "sr").rglob("*.png"))) == 6
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--testset", str(testset),
                                         "--save-sr", str(testset / "out")])
    assert res.exit_code == 2 and "lies inside" in res.output and not (testset / "out").exists()
    # the SR images never land on images read (symlinks followed), nor inside a test set (its LR images have
    # the HR's names); a DIR holding the folders read is not empty, and refused as such
    before = {p: p.read_bytes() for p in testset.rglob("*") if p.is_file()}
    for name in ("d", "link"):
        shutil.copytree(testset / "HR", tmp_path / name / "HR")
    shutil.copytree(testset / "HR", tmp_path / "d" / "level1")
    (tmp_path / "link" / "level1").symlink_to(tmp_path / "link" / "HR")
    kept = {p: p.read_bytes() for p in tmp_path.glob("[dl]*/**/*.png")}
    for args, said, status in (
            (["--hr-dir", str(testset / "HR"), "--levels", "1", "--save-sr", str(testset / "LR")],
             f"lies inside the test set {testset.resolve()}", 2),
            (["--hr-dir", str(tmp_path / "d" / "level1"), "--levels", "1", "--save-sr", str(tmp_path / "d")],
             f"--save-sr {tmp_path / 'd'}: exists and is not an empty folder", 1),
            (["--hr-dir", str(tmp_path / "link" / "HR"), "--levels", "1", "--save-sr", str(tmp_path / "link")],
             f"--save-sr {tmp_path / 'link'}: exists and is not an empty folder", 1)):
        res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--device", "cpu", *args])
        assert res.exit_code == status and said in " ".join(res.output.split()), res.output
    assert {p: p.read_bytes() for p in testset.rglob("*") if p.is_file()} == before
    assert {p: p.read_bytes() for p in tmp_path.glob("[dl]*/**/*.png")} == kept


def test_dasr_eval_save_sr_takes_a_new_or_empty_folder_and_refuses_one_holding_anything(ckpt, testset, tmp_path):
    """A second run into the --save-sr DIR of a first (levels 1-3), scoring level 1 alone, left the first
    run's level2/ and level3/ beside its own without a word: a DIR that exists and is not empty is refused
    in one line before any work (the model is not even loaded); a new one, or an empty one, is fine."""
    pytest.importorskip("torch")
    from cli.sr import eval_main

    base = ["--model", str(ckpt), "--device", "cpu", "--json", "--testset", str(testset)]
    res = CliRunner().invoke(eval_main, [*base, "--save-sr", str(tmp_path / "sr")])
    assert res.exit_code == 0, res.output
    first = {p: p.read_bytes() for p in (tmp_path / "sr").rglob("*") if p.is_file()}
    assert sorted({p.parent.name for p in first if p.parent.parent == tmp_path / "sr"}) == [
        "level1", "level2", "level3"]
    res = CliRunner().invoke(eval_main, [*base, "--model", str(tmp_path / "no-such-model.pt"), "--levels", "1",
                                         "--save-sr", str(tmp_path / "sr")])
    assert res.exit_code == 1 and re.fullmatch(
        re.escape(f"Error: --save-sr {tmp_path / 'sr'}: exists and is not an empty folder (it holds ") + r"level[123]"
        + re.escape("); the SR images are saved into a new or empty one, so that no earlier run's image is taken "
                    "for this run's\n"), res.output), res.output
    assert {p: p.read_bytes() for p in (tmp_path / "sr").rglob("*") if p.is_file()} == first
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(eval_main, [*base, "--levels", "1", "--save-sr", str(tmp_path / "empty")])
    assert res.exit_code == 0, res.output
    assert sorted(p.relative_to(tmp_path / "empty").as_posix() for p in (tmp_path / "empty").rglob("*.png")) == [
        "level1/a.png", "level1/c.png", "level1/sub/b.png"]
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    res = CliRunner().invoke(eval_main, [*base, "--save-sr", str(tmp_path / "link")])
    assert res.exit_code == 1 and "a symbolic link to nothing" in res.output, res.output


def test_two_dasr_evals_given_one_new_save_sr_folder_cannot_both_write_into_it(ckpt, testset, tmp_path,
                                                                               monkeypatch):
    """Two runs given the same new DIR each found it empty before either wrote: both wrote into it (two
    models' images side by side), and the one that failed took back the other's. A run now claims DIR with
    a marker made exclusively before any work, and removes it when it ends: a run that finds the marker is
    refused; one that claims DIR after another wrote and ended there is refused too."""
    pytest.importorskip("torch")
    import cli.sr
    from cli.sr import SAVE_SR_CLAIM, eval_main

    base = ["--model", str(ckpt), "--device", "cpu", "--json", "--testset", str(testset), "--levels", "1"]
    out = tmp_path / "sr"
    inner: list = []
    real_check = cli.sr._check_save_sr

    def a_run_meanwhile(path):  # run B's early check finds DIR empty; run A runs to its end meanwhile
        real_check(path)
        if not inner:
            inner.append(None)
            inner[0] = CliRunner().invoke(eval_main, [*base, "--save-sr", str(path)])
            assert SAVE_SR_CLAIM not in {p.name for p in path.iterdir()}  # A's marker gone with A

    monkeypatch.setattr(cli.sr, "_check_save_sr", a_run_meanwhile)
    res = CliRunner().invoke(eval_main, [*base, "--save-sr", str(out)])
    assert inner[0].exit_code == 0, inner[0].output
    assert res.exit_code == 1 and "is not an empty folder (it holds level1, written since this run looked)" in \
        " ".join(res.output.split()), res.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "level1", "level1/a.png", "level1/c.png", "level1/sub", "level1/sub/b.png"]  # A's images, untouched
    monkeypatch.setattr(cli.sr, "_check_save_sr", real_check)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / SAVE_SR_CLAIM).touch()  # a run writing there now (its claim alone, so far)
    monkeypatch.setattr(cli.sr, "_check_save_sr", lambda path: None)  # past the early check, as a run racing it
    res = CliRunner().invoke(eval_main, [*base, "--save-sr", str(tmp_path / "busy")])
    assert res.exit_code == 1 and "another dasr-eval is writing into it" in res.output, res.output
    assert [p.name for p in (tmp_path / "busy").iterdir()] == [SAVE_SR_CLAIM]  # the other run's claim stays


def test_a_failing_dasr_eval_writes_no_csv_and_takes_back_the_sr_images_it_saved(ckpt, testset, tmp_path,
                                                                                  monkeypatch):
    """A run that fails late wrote --per-image anyway (replacing an earlier CSV with one of empty rows when
    NIQE could score none of the images) and left the SR images saved before the failure: now an earlier
    CSV stays as it was and the run takes back its SR images and the folders it made for them, whether it
    fails after the evaluation (NIQE none, the CSV's own write) or in the middle (an SR image's write)."""
    import math

    pytest.importorskip("torch")
    import cli.sr
    import dasr_model.evaluate as evaluate
    from cli.sr import eval_main

    from .niqe_golden import make_params

    with open(tmp_path / "p.npz", "wb") as f:
        np.savez(f, **make_params())
    csv_file = tmp_path / "scores.csv"
    csv_file.write_text("an earlier run's scores\n")
    (tmp_path / "empty").mkdir()
    base = ["--model", str(ckpt), "--device", "cpu", "--json", "--per-image", str(csv_file)]
    niqe = [*base, "--lr-dir", str(testset / "LR" / "level1"), "--niqe-params", str(tmp_path / "p.npz")]
    monkeypatch.setattr(evaluate, "_niqe_or_nan", lambda img, params: math.nan)
    for out in (tmp_path / "new" / "sr", tmp_path / "empty"):
        res = CliRunner().invoke(eval_main, [*niqe, "--save-sr", str(out)])
        assert res.exit_code == 1 and "NIQE could score none of the 3 image(s)" in res.output, res.output
        assert csv_file.read_text() == "an earlier run's scores\n"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["empty", "p.npz", "scores.csv"]
    monkeypatch.setattr(evaluate, "_niqe_or_nan", lambda img, params: 3.0)  # scored: the run writes both
    res = CliRunner().invoke(eval_main, [*niqe, "--save-sr", str(tmp_path / "empty")])
    assert res.exit_code == 0, res.output
    assert csv_file.read_text().startswith("level,name,") and len(list((tmp_path / "empty").rglob("*.png"))) == 3
    shutil.rmtree(tmp_path / "empty")
    csv_file.write_text("an earlier run's scores\n")

    real_write, writes = cli.sr.write_image, []

    def full_disk_at_the_third(path, img):
        writes.append(path)
        if len(writes) == 3:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, img)

    def failing_csv(path, data):
        raise OSError(28, "No space left on device", str(path))

    testset_run = [*base, "--testset", str(testset), "--levels", "1,2", "--save-sr", str(tmp_path / "new" / "sr")]
    monkeypatch.setattr(cli.sr, "write_image", full_disk_at_the_third)
    res = CliRunner().invoke(eval_main, testset_run)
    assert res.exit_code == 1 and "No space left on device" in res.output and len(writes) == 3, res.output
    monkeypatch.setattr(cli.sr, "write_image", real_write)
    monkeypatch.setattr(cli.sr, "write_bytes_atomic", failing_csv)
    res = CliRunner().invoke(eval_main, testset_run)
    assert res.exit_code == 1 and res.output.splitlines()[-1] == f"Error: {csv_file}: No space left on device"
    assert csv_file.read_text() == "an earlier run's scores\n"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["p.npz", "scores.csv"]


def test_a_run_that_loses_a_race_for_an_empty_folder_leaves_the_winners_set_whole(hr_dir, tmp_path, monkeypatch):
    """Two runs into one empty folder: the second to finish is refused and takes back only what it moved
    (it removed the first one's HR, LR and params). A hidden folder of a killed run does not count as
    content: a retry is not refused."""
    import degrade.testset as ts

    out = tmp_path / "shared"
    (out / ".make-testset.killed.tmp" / "HR").mkdir(parents=True)  # what a SIGKILL leaves
    real = ts.find_images

    def find_and_let_another_run_finish_first(paths, **kw):
        monkeypatch.setattr(ts, "find_images", real)
        make_testset(hr_dir, out, levels=(1,))  # the winner
        return real(paths, **kw)

    monkeypatch.setattr(ts, "find_images", find_and_let_another_run_finish_first)
    with pytest.raises(DegradeError, match="is not an empty folder \\(it holds "):
        make_testset(hr_dir, out, levels=(2,))
    assert open_testset(out).levels == [1] and len(list(open_testset(out).pairs())) == 3
    assert sorted(p.name for p in out.iterdir()) == [".make-testset.killed.tmp", "HR", "LR", "manifest.json",
                                                     "params"]


def test_names_of_a_file_given_alone_and_save_paths_that_would_clash(ckpt, hr_dir, tmp_path):
    pytest.importorskip("torch")
    from cli.sr import eval_main
    from dasr_model.evaluate import pairs_from_hr_dir, pairs_from_lr_dir

    assert pairs_from_lr_dir(hr_dir / "a.png").names == ["a"]  # a file, not a folder (the Python API takes it)
    assert pairs_from_hr_dir(hr_dir / "sub" / "b.png", [1, 2], 0).names == ["b", "b"]
    odd = tmp_path / "odd"
    (odd / "x.png").mkdir(parents=True)
    shutil.copy(hr_dir / "a.png", odd / "x.jpg")
    shutil.copy(hr_dir / "c.png", odd / "x.png" / "y.png")
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--hr-dir", str(odd), "--levels", "1",
                                         "--save-sr", str(tmp_path / "sr"), "--per-image", str(tmp_path / "s.csv")])
    assert res.exit_code == 1 and "x.png would be both an SR image and the folder of x.png/y.png" in res.output
    assert not (tmp_path / "sr").exists()


def _failing_degrade(monkeypatch):
    """Make the second image's degradation fail, as a full disk would."""
    from degrade.testset import _Degrade

    real, calls = _Degrade.__call__, []

    def fail_second(self, index):
        calls.append(index)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, index)

    monkeypatch.setattr(_Degrade, "__call__", fail_second)


def test_missing_parents_of_out_are_made_and_a_failure_takes_back_those_it_made(hr_dir, tmp_path, monkeypatch):
    """The documented `make-testset photos/val --out testsets/val` with no testsets/ yet (it said 'no such
    folder'); a failed run leaves neither set nor the parents it made, and keeps those it found."""
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(degrade_cli, ["make-testset", str(hr_dir), "--out", "testsets/val", "--levels", "1"])
    assert res.exit_code == 0, res.output
    assert open_testset(tmp_path / "testsets" / "val").levels == [1]
    (tmp_path / "keep").mkdir()
    _failing_degrade(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        make_testset(hr_dir, tmp_path / "keep" / "new" / "deeper" / "set", levels=(1,))
    assert not any((tmp_path / "keep").iterdir())

    def interrupt(done, total):  # Ctrl-C in the progress callback, before any image: the parents go too
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_testset(hr_dir, tmp_path / "keep" / "a" / "b" / "set", levels=(1,), progress=interrupt)
    assert not any((tmp_path / "keep").iterdir())
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(degrade_cli, ["make-testset", str(hr_dir), "--out", "file/sub/set"])
    assert res.exit_code == 1 and res.output.splitlines()[-1] == "Error: file: exists and is not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "keep", "testsets"]


def test_the_manifest_is_one_line_an_image_and_a_set_too_big_for_it_is_refused_before_any_work(
        hr_dir, testset, tmp_path, monkeypatch):
    """indent=1 put each number of v on a line (2 kB an image: 36,000 images made a manifest open_testset
    refused). Now one line an image, 40,000 of which fit, and the size is known before any image is read:
    one byte over the limit is refused up front, the exact size is written and read back."""
    import degrade.testset as ts

    text = (testset / "manifest.json").read_bytes()
    lines = text.splitlines()
    images = [line for line in lines if line.lstrip().startswith(b'{"name"')]
    assert len(images) == 3 and len(lines) < 20  # indent=1 gave 33 lines to each v alone
    assert [json.loads(line.rstrip(b",")) for line in images] == json.loads(text)["images"]
    assert max(map(len, images)) * 40_000 < ts.MANIFEST_BYTES
    read = []
    monkeypatch.setattr(ts, "read_test_hr", lambda path: read.append(path) or read_test_hr(path))
    monkeypatch.setattr(ts, "MANIFEST_BYTES", len(text) - 1)
    with pytest.raises(DegradeError, match=r"3 images at 3 level\(s\) make a manifest of .* MiB, over the "):
        make_testset(hr_dir, tmp_path / "set", levels=(1, 2, 3), seed=5)
    assert not read and not any(tmp_path.iterdir())
    monkeypatch.setattr(ts, "MANIFEST_BYTES", len(text))
    make_testset(hr_dir, tmp_path / "set", levels=(1, 2, 3), seed=5)
    assert len(open_testset(tmp_path / "set").images) == 3 and len(read) == 3


def test_a_vector_outside_0_1_is_refused(testset, tmp_path):
    """v is [0, 1] as encode makes it: 33 x 1e30 was accepted (dasr-eval reported a predictor MAE of 5.6e28)."""
    bad = tmp_path / "bad"
    shutil.copytree(testset, bad)
    m = json.loads((testset / "manifest.json").read_text())
    for v in ([1e30] * 33, [1.0000001] + [0.0] * 32, [0.0] * 32 + [-1e-9], [0] * 32 + [2]):
        m["images"][1]["lr"]["2"]["v"] = v
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(DegradeError, match=r"c, level 2: .* 33 finite numbers in \[0, 1\]") as info:
            open_testset(bad)
        assert "\n" not in str(info.value)
    m["images"][1]["lr"]["2"]["v"] = [0] * 32 + [1]  # integers at the ends of the range are fine
    (bad / "manifest.json").write_text(json.dumps(m))
    assert open_testset(bad).images[1].lr[2][1][-1] == 1


def test_the_params_files_are_checksummed_and_checked_as_they_are_read(testset, tmp_path):
    """The manifest holds every file's SHA-256, the params records' too: an edited record stops pairs(),
    naming it. A manifest without params_sha256 (written before it was kept) is read, its records unchecked."""
    import hashlib

    m = json.loads((testset / "manifest.json").read_text())
    for e in m["images"]:
        for level in ("1", "2", "3"):
            record = (testset / "params" / f"level{level}" / f"{e['name']}.json").read_bytes()
            assert e["lr"][level]["params_sha256"] == hashlib.sha256(record).hexdigest()
    bad = tmp_path / "bad"
    shutil.copytree(testset, bad)
    record = bad / "params" / "level2" / "sub" / "b.json"
    record.write_text(record.read_text().replace('"level": 2', '"level": 1'))
    assert len(list(open_testset(bad).pairs([1, 3]))) == 6  # the other levels' records are whole
    with pytest.raises(DegradeError, match=r"b\.json: its bytes differ from the test set's manifest"):
        list(open_testset(bad).pairs([2]))
    for e in m["images"]:
        for item in e["lr"].values():
            del item["params_sha256"]
    (bad / "manifest.json").write_text(json.dumps(m, indent=1))
    assert len(list(open_testset(bad).pairs())) == 9
    m["images"][0]["lr"]["1"]["params_sha256"] = "x" * 64
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DegradeError, match="a, level 1: params_sha256 'x+' is not a SHA-256"):
        open_testset(bad)


def test_a_manifest_whose_v_is_not_its_records_is_refused_as_pairs_are_read(testset, tmp_path):
    """The manifest has no checksum of its own and dasr-eval scores the predictor against its v: zeros in
    place of one image's v (which scored an MAE of 0.02 instead of 0.25, exit 0) or one digit changed is
    refused, naming the record, where the record's checksum holds."""
    bad = tmp_path / "bad"
    shutil.copytree(testset, bad)
    m = json.loads((testset / "manifest.json").read_text())
    good = list(m["images"][1]["lr"]["2"]["v"])
    for v in ([0.0] * 33, [good[0] + 0.01, *good[1:]]):
        m["images"][1]["lr"]["2"]["v"] = v
        (bad / "manifest.json").write_text(json.dumps(m))
        assert len(list(open_testset(bad).pairs([1, 3]))) == 6  # the other levels are whole
        with pytest.raises(DegradeError, match=r"level2/c\.json: the manifest's v or level for this image does not"):
            list(open_testset(bad).pairs([2]))


@pytest.mark.parametrize("folder", ["a.png", "a.json"])
def test_a_name_whose_file_would_be_another_names_folder_is_refused_naming_both(hr_dir, tmp_path, folder):
    """a.jpg makes HR/a.png and params/levelL/a.json; a.png/b.png or a.json/b.png needs a folder there. It
    failed after the work with 'File exists' on a hidden path; now it is refused before, naming both inputs."""
    clash = tmp_path / "clash"
    (clash / folder).mkdir(parents=True)
    cv2.imwrite(str(clash / "a.jpg"), cv2.imread(str(hr_dir / "a.png")))
    shutil.copy(hr_dir / "c.png", clash / folder / "b.png")
    with pytest.raises(DegradeError, match=rf"a\.jpg and .*{folder}/b\.png: {folder} would be both a file in the "
                                           rf"test set and the folder holding {folder}/b\.png; rename one"):
        make_testset(clash, tmp_path / "set", levels=(1,))
    res = CliRunner().invoke(degrade_cli, ["make-testset", str(clash), "--out", str(tmp_path / "set")])
    assert res.exit_code == 1 and f"{folder} would be both" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clash"]


def test_dasr_eval_per_image_never_overwrites_what_it_reads(ckpt, testset, hr_dir, tmp_path):
    pytest.importorskip("torch")
    from cli.sr import eval_main

    model_bytes, manifest = ckpt.read_bytes(), (testset / "manifest.json").read_bytes()
    given = ["--testset", str(testset)]
    for target, source in ((ckpt, given), (testset / "manifest.json", given),
                           (hr_dir / "a.png", ["--hr-dir", str(hr_dir), "--levels", "1"])):
        res = CliRunner().invoke(eval_main, ["--model", str(ckpt), *source, "--per-image", str(target)])
        assert res.exit_code == 2 and "which the evaluation reads" in res.output, res.output
    assert ckpt.read_bytes() == model_bytes and (testset / "manifest.json").read_bytes() == manifest
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--testset", str(testset),
                                         "--per-image", str(tmp_path / "afile" / "s.csv")])
    assert res.exit_code == 1 and "folder" in res.output and "does not exist" in res.output
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)  # refused before the evaluation, not when the CSV is written after it
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--testset", str(testset), "--per-image", str(fifo)])
    assert res.exit_code == 1 and "not a regular file" in res.output and "evaluating" not in res.output
    # a CSV beside the inputs is read by none of their readers: as before, allowed
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--device", "cpu", "--hr-dir", str(hr_dir),
                                         "--levels", "1", "--per-image", str(hr_dir / "scores.csv")])
    assert res.exit_code == 0 and (hr_dir / "scores.csv").exists(), res.output
    (hr_dir / "scores.csv").unlink()


def test_dasr_eval_per_image_keeps_a_name_that_is_not_utf8(ckpt, hr_dir, tmp_path):
    """A file name's bytes that are not UTF-8 (Python holds them as surrogates) go into the CSV as they are,
    instead of failing after the whole evaluation."""
    pytest.importorskip("torch")
    from cli.sr import eval_main

    odd = tmp_path / "odd"
    odd.mkdir()
    name = os.fsdecode(b"b\xffd")
    try:
        shutil.copy(hr_dir / "a.png", odd / f"{name}.png")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses a name that is not UTF-8")
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--device", "cpu", "--hr-dir", str(odd), "--levels", "1",
                                         "--per-image", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "s.csv").read_bytes().splitlines()
    assert len(lines) == 2 and lines[1].startswith(b"1,b\xffd,")


@pytest.mark.parametrize("name,message", [("a\\b.png", "not a plain relative path"),
                                          ("..png", "would be '.', not a plain relative path"),
                                          ("x" * 237 + ".png", "its name is too long")])
def test_make_testset_refuses_names_its_reader_would_refuse_before_any_work(tmp_path, name, message):
    """'a\\b.png' (a name with a backslash) and '..png' (named '.') made sets that dasr-eval --testset then
    refused; a 237-byte name failed at its write, after the work, naming a hidden temporary file."""
    hr = tmp_path / "hr"
    hr.mkdir()
    photo = degrade.sample_images()[0].read_bytes()
    (hr / "good.png").write_bytes(photo)
    (hr / name).write_bytes(photo)
    with pytest.raises(DegradeError, match=message):
        make_testset(hr, tmp_path / "t", levels=(1,))
    assert not (tmp_path / "t").exists()
    (hr / name).rename(hr / ("x" * 236 + ".png"))  # the longest name that fits
    make_testset(hr, tmp_path / "t", levels=(1,))
    assert len(open_testset(tmp_path / "t").images) == 2


def test_a_manifest_name_the_os_cannot_take_is_refused_in_one_line(testset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(testset, bad)
    m = json.loads((testset / "manifest.json").read_text())
    m["images"][0]["name"] = "a\ud800"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DegradeError, match="not a plain relative path"):
        open_testset(bad)


@pytest.mark.parametrize("kw,message", [({"seed": True}, "seed must be an integer >= 0, got True"),
                                        ({"seed": 1.5}, "seed must be an integer"),
                                        ({"levels": (1.7,)}, "expected distinct levels among 1, 2, 3"),
                                        ({"levels": (True,)}, "expected distinct levels"),
                                        ({"levels": 2}, "expected distinct levels")])
def test_make_testset_refuses_what_open_testset_would(hr_dir, tmp_path, kw, message):
    """seed=True wrote a manifest open_testset refuses ("seed": true); levels=(1.7,) became level 1."""
    with pytest.raises(DegradeError, match=message):
        make_testset(hr_dir, tmp_path / "t", **kw)
    assert not (tmp_path / "t").exists()


def test_make_testset_takes_numpy_integers(hr_dir, tmp_path):
    make_testset(hr_dir, tmp_path / "t", seed=np.int64(3), levels=(np.int64(1),))
    assert open_testset(tmp_path / "t").levels == [1]
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["seed"] == 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks")
def test_a_killed_runs_hidden_folder_is_removed_by_the_next_run_and_no_live_one_is(hr_dir, tmp_path):
    """kill -9 leaves a run's hidden folder behind, inside an empty OUT, where the next run would then move a
    whole set in beside it. The next run removes such a folder: one no run holds (each holds its own with
    a lock) and older than a minute; a held one, a new one and a link named like one stay."""
    import fcntl
    import time

    from degrade.testset import TMP_PREFIX

    out = tmp_path / "set"
    out.mkdir()
    old = time.time() - 3600
    folders = {}
    for kind in ("killed", "held", "new"):
        folders[kind] = out / f"{TMP_PREFIX}{kind}.tmp"
        (folders[kind] / "HR").mkdir(parents=True)
        (folders[kind] / "HR" / "half.png").write_bytes(b"half an image")
        if kind != "new":
            os.utime(folders[kind], (old, old))
    (tmp_path / "elsewhere").mkdir()
    (out / f"{TMP_PREFIX}link.tmp").symlink_to(tmp_path / "elsewhere")
    os.utime(out / f"{TMP_PREFIX}link.tmp", (old, old), follow_symlinks=False)
    fd = os.open(folders["held"], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run still at work
        make_testset(hr_dir, out, levels=(1,), seed=5)
    finally:
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["HR", "LR", "params", "manifest.json", f"{TMP_PREFIX}held.tmp", f"{TMP_PREFIX}new.tmp",
         f"{TMP_PREFIX}link.tmp"])
    assert (tmp_path / "elsewhere").is_dir() and (folders["held"] / "HR" / "half.png").exists()
    open_testset(out)  # the set itself is whole


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks")
def test_a_run_killed_on_this_machine_is_cleaned_up_at_once_one_of_another_machine_after_a_while(hr_dir, tmp_path):
    """Runs under one kernel share its locks: a hidden folder whose owner file names this kernel and that no
    run holds is a dead run's at once (a retry right after a kill -9 would otherwise finish the set around
    it, for good). One made on another machine, whose locks this one may not see, only once untouched for
    STALE_S."""
    from degrade.testset import OWNER, TMP_PREFIX, _boot_id

    out = tmp_path / "set"
    for who, boot in (("here", _boot_id()), ("there", "another machine's boot id")):
        folder = out / f"{TMP_PREFIX}{who}.tmp"
        (folder / "HR").mkdir(parents=True)
        (folder / OWNER).write_text(f"{boot}\n{'0' * 32}\n")
    make_testset(hr_dir, out, levels=(1,), seed=5)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["HR", "LR", "params", "manifest.json", f"{TMP_PREFIX}there.tmp"])


def test_a_hidden_folder_removed_mid_run_is_never_taken_for_the_set(hr_dir, tmp_path):
    """If a run's hidden folder is removed while it works (by hand, or by a make-testset on another machine
    where locks are not shared), the writes after that would make it again holding only the later images:
    the run checks it is still the folder it made, and refuses in one line, leaving nothing."""
    from degrade.testset import TMP_PREFIX

    out = tmp_path / "sets" / "set"

    def remove_it(done, total):
        if done == 1:
            (hidden,) = [p for p in out.parent.iterdir() if p.name.startswith(TMP_PREFIX)]
            shutil.rmtree(hidden)

    with pytest.raises(DegradeError, match="hidden folder was removed while it was written; nothing was written"):
        make_testset(hr_dir, out, levels=(1,), seed=5, progress=remove_it)
    assert not (tmp_path / "sets").exists()


def test_a_hidden_folder_that_cannot_be_made_is_reported_naming_out(hr_dir, tmp_path, monkeypatch):
    """--out /sys/kernel/x said 'Error: /sys/kernel/.make-testset.XXXX.tmp: Operation not permitted', naming a
    hidden path the user never gave: the error names OUT and where the set was to be built, keeps its
    OSError subclass, and nothing is left."""
    import errno
    import tempfile

    def refused(prefix=None, suffix=None, dir=None):
        raise PermissionError(errno.EPERM, "Operation not permitted", os.path.join(dir, f"{prefix}abcd{suffix}"))

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    for out, where in ((tmp_path / "new", f"beside it in {tmp_path}"), (tmp_path / "empty", "inside it")):
        res = CliRunner().invoke(degrade_cli, ["make-testset", str(hr_dir), "--out", str(out), "--levels", "1"])
        assert res.exit_code == 1 and res.output.splitlines()[-1] == (
            f"Error: {out}: cannot create the test set {where}: Operation not permitted"), res.output
        with pytest.raises(PermissionError):
            make_testset(hr_dir, out, levels=(1,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())
    monkeypatch.undo()
    if os.path.isdir("/proc/self"):  # a real refusal: /proc takes no folder ('No such file or directory')
        res = CliRunner().invoke(degrade_cli, ["make-testset", str(hr_dir), "--out", "/proc/x", "--levels", "1"])
        assert res.exit_code == 1 and res.output.splitlines()[-1].startswith(
            "Error: /proc/x: cannot create the test set beside it in /proc: "), res.output


def test_an_out_that_is_a_link_to_nothing_is_refused_before_any_work(tmp_path):
    """--out as a symlink to nothing degraded every image, then failed naming its hidden folder
    ('.make-testset....tmp: Not a directory'): refused up front, naming OUT, with nothing made."""
    from degrade.testset import make_testset

    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DegradeError, match="link: a symbolic link to nothing"):
        make_testset(degrade.sample_images()[0].parent, tmp_path / "link", levels=[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_a_fifo_named_manifest_json_above_a_folder_is_not_opened(tmp_path):
    """enclosing_testset opened each parent's manifest.json plainly: a FIFO there (a shared folder, an
    unpacked archive) hung dasr-eval --save-sr before it did anything (a security review)."""
    import os

    from degrade.testset import enclosing_testset

    import signal

    os.mkfifo(tmp_path / "manifest.json")
    (tmp_path / "sr").mkdir()

    class Stuck(Exception):  # not an OSError (TimeoutError is one), which the function passes over
        pass

    def stuck(signum, frame):
        raise Stuck("opened the FIFO and waits for a writer")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(10)  # fails the test instead of hanging it
    try:
        assert enclosing_testset(tmp_path / "sr") is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
