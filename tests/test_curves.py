"""dasr-curves: training curves from metrics.jsonl (reading, smoothing, the picture and the CLI's refusals)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
import cv2  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from cli.train import curves_main  # noqa: E402
from dasr_model.curves import _shared_bicubic, read_metrics, smooth  # noqa: E402
from dasr_model.errors import DASRError  # noqa: E402
from dasr_model.model import DASRConfig  # noqa: E402
from dasr_model.train import TrainConfig, train  # noqa: E402

from .conftest import make_small_dataset  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("curves")
    shards = make_small_dataset(folder / "ds", count=6, seed=2, shard_size=6)
    cfg = TrainConfig(shards=shards, out=str(folder / "run"), steps=4, lr_crop=8, workers=0, batch_size=2,
                      device="cpu", val_shards=shards, val_every=2, val_samples=3, warmup_steps=2,
                      model=DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8))
    train(cfg)
    return folder / "run"


def test_the_series_are_the_metrics_lines(run):
    """Oracle: the lines parsed here, one by one."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    r = read_metrics(run)
    assert r["step"].tolist() == [m["step"] for m in lines] == [1, 2, 3, 4]
    assert r["loss"].tolist() == [m["loss"] for m in lines]
    assert r["lr"].tolist() == [m["lr"] for m in lines] and r["lr"][0] < r["lr"][-1]  # the warm-up
    val = [m for m in lines if "val" in m]
    assert r["val_step"].tolist() == [2, 4]
    assert r["mae"].tolist() == [m["val"]["mae"]["all"] for m in val]
    for level in val[0]["val"]["psnr_y"]:
        assert r["psnr_y"][level].tolist() == [m["val"]["psnr_y"][level] for m in val]
        assert r["bicubic_psnr_y"][level].tolist() == [m["val"]["bicubic_psnr_y"][level] for m in val]
    assert _shared_bicubic([r, r], list(r["psnr_y"])) == {lv: r["bicubic_psnr_y"][lv][0] for lv in r["psnr_y"]}


def test_a_torn_last_line_is_left_out_and_any_other_bad_line_refused(run, tmp_path):
    good = (run / "metrics.jsonl").read_bytes()
    (tmp_path / "torn.jsonl").write_bytes(good + b'{"step": 5, "loss": 0.')
    assert read_metrics(tmp_path / "torn.jsonl")["step"].tolist() == [1, 2, 3, 4]
    lines = good.splitlines(keepends=True)
    for name, data, line in (("middle", lines[0] + b"not json\n" + b"".join(lines[1:]), 2),
                             ("nostep", b'{"loss": 1}\n' + good, 1),
                             ("long", b'{"step": 1, "x": "' + b"a" * 70000 + b'"}\n' + good, 1)):
        (tmp_path / f"{name}.jsonl").write_bytes(data)
        with pytest.raises(DASRError, match=f"{name}.jsonl: line {line} is not a dasr-train metrics line"):
            read_metrics(tmp_path / f"{name}.jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DASRError, match="no metrics yet"):
        read_metrics(tmp_path / "empty.jsonl")


def test_smooth_is_the_running_mean_of_the_last_n_values_without_nans_and_none_where_y_has_none():
    y = np.array([1.0, np.nan, 3.0, 5.0, np.nan, np.nan, np.nan, 2.0])
    expected = []
    for i in range(len(y)):
        window = [v for v in y[max(0, i - 2) : i + 1] if not np.isnan(v)]
        expected.append(np.mean(window) if window and not np.isnan(y[i]) else np.nan)  # none where y has none
    np.testing.assert_allclose(smooth(y, 3), expected, equal_nan=True)
    np.testing.assert_array_equal(smooth(y, 1), y)
    np.testing.assert_array_equal(smooth(np.array([np.inf]), 5), [np.nan])  # one value: still not finite
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 10):  # every window size against windows cut out one by one, across block edges
        for length in (1, 5, 13, 40):
            z = rng.random(length)
            z[rng.random(length) < 0.2] = np.nan
            windows = [z[max(0, i - n + 1) : i + 1] for i in range(length)]
            want = [np.mean(w[np.isfinite(w)]) if not np.isnan(w[-1]) else np.nan for w in windows]
            np.testing.assert_allclose(smooth(z, n), want, equal_nan=True)
    np.testing.assert_allclose(smooth(np.arange(10.0), 10**9), np.arange(10.0) / 2)  # a window past the series
    spiky = np.array([1.0, np.inf, 1.0, 1e20, 1.0, 1.0, 1.0])  # neither poisons nor cancels what follows
    np.testing.assert_allclose(smooth(spiky, 2)[-2:], [1.0, 1.0])
    assert np.isfinite(smooth(spiky, 2)[:3]).all()


def test_cli_draws_the_runs_and_refuses_what_it_cannot(run, tmp_path):
    out = tmp_path / "curves.png"
    res = CliRunner().invoke(curves_main, [str(run), str(run / "metrics.jsonl"), "-o", str(out),
                                           "--label", "a", "--label", "b", "--smooth", "2"])
    assert res.exit_code == 0, res.output
    h, w = cv2.imread(str(out)).shape[:2]
    assert f"wrote {out} ({w}x{h})" in res.output and w > 1000
    for args, message in ((["-o", str(tmp_path / "c.jpg")], "must end in .png"),
                          (["-o", str(out), "--label", "x", "--label", "y"], "2 label(s) for 1 run(s)"),
                          (["-o", str(out), str(run)], "two runs are both called 'run'"),
                          (["-o", str(run / "metrics.png")], None)):
        res = CliRunner().invoke(curves_main, [str(run), *args])
        if message is None:  # a picture inside the run folder is fine: only its metrics must stay
            assert res.exit_code == 0, res.output
            continue
        assert res.exit_code == 2 and message in res.output, res.output
    plain = tmp_path / "plain.jsonl"  # no validation: one row of panels
    plain.write_text("".join(json.dumps({"step": i, "loss": 1 / i, "l1": 0.5 / i, "lr": 1e-4}) + "\n"
                             for i in range(1, 30)))
    res = CliRunner().invoke(curves_main, [str(plain), "-o", str(tmp_path / "plain.png")])
    assert res.exit_code == 0, res.output
    assert cv2.imread(str(tmp_path / "plain.png")).shape[0] < h * 0.6
    gan = tmp_path / "gan" / "metrics.jsonl"  # a GAN run's terms get a panel; its default name is its folder's
    gan.parent.mkdir()
    gan.write_text("".join(json.dumps({"step": i, "l1": 0.1, "regression": 0.2, "gan": 0.7, "perceptual": 0.3,
                                       "lr": 1e-4}) + "\n" for i in range(1, 5)))
    res = CliRunner().invoke(curves_main, [str(gan), str(run), "-o", str(tmp_path / "gan.png")])
    assert res.exit_code == 0, res.output
    os.mkfifo(tmp_path / "fifo.jsonl")  # a FIFO would block for ever: refused
    res = CliRunner().invoke(curves_main, [str(tmp_path / "fifo.jsonl"), "-o", str(out)])
    assert res.exit_code == 1 and "not a regular file" in res.output
    res = CliRunner().invoke(curves_main, [str(tmp_path / "nothing"), "-o", str(out)])
    assert res.exit_code == 1 and str(tmp_path / "nothing") in res.output and "Traceback" not in res.output


def test_the_titles_name_the_window_the_curves_had(run, tmp_path, monkeypatch):
    """A 4-step run's curves average at most 4 logged steps: the titles said "mean of 50" (fresh-user review)."""
    pytest.importorskip("matplotlib")
    import degrade.plots
    from dasr_model.curves import plot_curves

    figures = []
    monkeypatch.setattr(degrade.plots, "_save", lambda fig, path: figures.append(fig))
    plot_curves({"a": read_metrics(run)}, tmp_path / "c.png", window=50)
    titles = [ax.get_title() for ax in figures[0].axes]
    assert "pixel L1 loss\n(mean of 4 logged steps)" in titles
    assert not any("mean of 50" in t for t in titles)


def test_every_title_fits_its_picture(run, tmp_path, monkeypatch):
    """With GAN terms the fourth panel's title, 'GAN and perceptual (mean of 6 logged steps)' on one line,
    ran off the picture's right edge (a review). Oracle: the rendered extents of the titles and the figure."""
    pytest.importorskip("matplotlib")
    import degrade.plots
    from dasr_model.curves import plot_curves

    gan = tmp_path / "gan.jsonl"
    gan.write_text("".join(json.dumps({"step": i, "l1": 0.1, "regression": 0.2, "gan": 0.7, "perceptual": 0.3,
                                       "lr": 1e-4}) + "\n" for i in range(1, 7)))
    def boxes(fig):  # measured before plot_curves closes the figure
        fig.canvas.draw()
        return fig.bbox, [(ax.get_title(), ax.title.get_window_extent(fig.canvas.get_renderer()))
                          for ax in fig.axes if ax.get_visible() and ax.get_title()]

    drawn = []
    monkeypatch.setattr(degrade.plots, "_save", lambda fig, path: drawn.append(boxes(fig)))
    plot_curves({"gan": read_metrics(gan), "a": read_metrics(run)}, tmp_path / "c.png")
    whole, titles = drawn[0]
    assert any(text.startswith("GAN and perceptual") for text, _ in titles)
    for text, box in titles:
        assert whole.x0 <= box.x0 and box.x1 <= whole.x1 and box.y1 <= whole.y1, text
