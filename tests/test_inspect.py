"""degrade inspect: readings equal the stored records, statistics equal independent numbers, valid pictures."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import degrade
from cli.main import main
from degrade import inspect as insp

from .conftest import make_small_dataset


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    return make_small_dataset(tmp_path_factory.mktemp("insp") / "ds", count=40, seed=5, shard_size=16)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_sample_readings_equal_the_stored_record(small):
    ds = degrade.open_dataset(small)
    for i in range(len(ds)):
        s = ds[i]
        rows = {r.name: r for r in insp.read_fields(s.v, s.params)}
        for name, row in rows.items():
            step_name, attr = name.split(".")
            step = getattr(s.params, step_name)
            value = None if step is None else getattr(step, attr)
            assert row.present == (value is not None), name
            assert row.value == value
        if s.params.blur1 is not None:
            assert rows["blur1.sigma_x"].text == f"{s.params.blur1.sigma_x:.2f} px"
        if s.params.jpeg1 is not None:
            assert rows["jpeg1.quality"].text == f"JPEG q {s.params.jpeg1.quality}"


def test_cli_sample_json_matches_the_record(small):
    result = run("inspect", small, "--index", 7, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    record = degrade.open_dataset(small)[7].params
    assert data["level"] == record.level and data["index"] == 7
    fields = {f["name"]: f for f in data["fields"]}
    assert len(data["fields"]) == len(degrade.VECTOR_FIELDS)
    assert fields["noise1.type"]["value"] == record.noise1.type
    assert fields["final.mode"]["value"] == record.final.mode
    assert data["pipeline"][-1].startswith(("resize to 16 px", "sinc", "JPEG 2"))
    assert fields["jpeg2.quality"]["present"] == (record.jpeg2 is not None)


def test_cli_sample_table_names_fields_and_pipeline(small):
    result = run("inspect", small, "--index", 0)
    assert result.exit_code == 0
    assert "blur1.sigma_x" in result.output and "pipeline:" in result.output
    record = degrade.open_dataset(small)[0].params
    assert f"JPEG q {record.jpeg1.quality}" in result.output


def test_pipeline_steps_follow_the_record_order():
    p = degrade.sample_params(3, np.random.default_rng(2))
    steps = insp.pipeline_steps(p, 256)
    assert steps[0].startswith("blur") and "JPEG q" in " ".join(steps)
    final = [s for s in steps if s.startswith(("resize to", "sinc", "JPEG 2"))]
    expected = ["resize to", "sinc", "JPEG 2"] if p.final.order == "A" else ["JPEG 2", "resize to", "sinc"]
    expected = [e for e in expected if (e != "sinc" or p.sinc) and (e != "JPEG 2" or p.jpeg2)]
    assert [next(e for e in expected if s.startswith(e)) for s in final] == expected


def test_dataset_statistics_equal_independent_numbers(small):
    """Every statistic against numbers worked from the records and v directly. The histogram per level
    holds that level's samples only: histogramming every sample into each level's passed every test (a
    mutation audit: no test read histogram_by_level). Oracle for it: numpy's histogram over 16 equal bins
    of [0, 1] of the entry's values in the samples of that level whose field is present."""
    ds = degrade.open_dataset(small)
    stats = insp.dataset_stats(ds)
    v = np.stack([ds[i].v for i in range(len(ds))]).astype(np.float64)
    levels = [ds[i].params.level for i in range(len(ds))]
    assert stats["samples"] == 40
    assert stats["levels"] == {str(k): levels.count(k) for k in (1, 2, 3)}
    by_index = {f["index"]: f for f in stats["fields"]}
    assert sorted(by_index) == list(range(33))
    # Which record field each entry reads, written out from the layout table in docs/degradation.md. An
    # entry is present where that field has a value: final.order only in level-3 records, final.mode in all.
    blur = ["size", "sigma_x", "sigma_y", "theta"]
    fields = [("blur1", a) for a in blur] + [("blur2", a) for a in blur] + [("sinc", "size"), ("sinc", "omega_c")] \
        + [("resize1", "scale")] + [("resize1", "mode")] * 3 + [("resize2", "scale")] + [("resize2", "mode")] * 3 \
        + [("noise1", "strength"), ("noise1", "gray"), ("noise1", "type"), ("noise1", "type")] \
        + [("noise2", "strength"), ("noise2", "gray"), ("noise2", "type"), ("noise2", "type")] \
        + [("jpeg1", "quality"), ("jpeg2", "quality")] + [("final", "order")] * 2 + [("final", "mode")] * 3

    def has(params, step: str, attr: str) -> bool:
        s = getattr(params, step)
        return s is not None and getattr(s, attr) is not None

    for j in range(33):
        here = np.array([has(ds[i].params, *fields[j]) for i in range(len(ds))])
        assert by_index[j]["present_share"] == pytest.approx(here.mean())
        col = v[here, j]
        assert by_index[j]["absent"] == int((~here).sum())
        assert sum(by_index[j]["histogram"]) == here.sum()  # absent steps are not in the histogram
        for n in (1, 2, 3):
            at, got = here & (np.array(levels) == n), by_index[j]["histogram_by_level"][str(n)]
            assert got == np.histogram(v[at, j], np.linspace(0, 1, 17))[0].tolist() and sum(got) == at.sum()
        assert by_index[j]["outside"] == 0
        if here.any():
            assert by_index[j]["min"] == pytest.approx(col.min())
            assert by_index[j]["mean"] == pytest.approx(col.mean())
            assert by_index[j]["max"] == pytest.approx(col.max())
        else:
            assert by_index[j]["min"] is None and by_index[j]["mean"] is None
    # blur2 happens only at level 3; the share counts records where the step is present.
    blur2_share = sum(ds[i].params.blur2 is not None for i in range(len(ds))) / 40
    assert by_index[4]["present_share"] == pytest.approx(blur2_share)
    assert by_index[0]["present_share"] == 1.0
    # final.order is set only at level 3: a level-mix dataset must not report it in every sample.
    level3_share = levels.count(3) / 40
    assert 0 < level3_share < 1
    assert by_index[28]["present_share"] == by_index[29]["present_share"] == pytest.approx(level3_share)
    assert by_index[28]["absent"] == 40 - levels.count(3)
    assert [by_index[j]["present_share"] for j in (30, 31, 32)] == [1.0] * 3


def test_a_blur_angle_reads_in_degrees():
    """A blur's theta, stored in radians, reads in degrees: printing the radians with "deg" after them
    passed every test (a mutation audit: no test read the angle's text). Oracle: pi / 4 is 45 degrees, to
    one decimal "45.0 deg"; pi / 2 - 0.0001 reads "90.0 deg"."""
    from dataclasses import replace

    from degrade.params import BlurParams

    record = degrade.sample_params(1, np.random.default_rng(0))
    for theta, text in ((math.pi / 4, "45.0 deg"), (math.pi / 2 - 1e-4, "90.0 deg")):
        p = replace(record, blur1=BlurParams.canonical(size=7, sigma_x=2.0, sigma_y=0.5, theta=theta))
        row = next(r for r in insp.read_fields(degrade.encode(p), p) if r.name == "blur1.theta")
        assert row.present and row.value == theta and row.text == text


def test_a_damaged_level_or_v_is_counted_and_said_not_dropped(tmp_path):
    """A level of 7 left the three level counts short of the samples, and a v of 5 or NaN fell out of the
    histograms without a word: both are counted, and the table warns."""
    import h5py

    src = make_small_dataset(tmp_path / "ds", count=6, seed=2, shard_size=6)
    with h5py.File(f"{src}/shard-00000.h5", "r+") as f:
        f["level"][1] = 7
        f["v"][0, 30], f["v"][2, 30], f["v"][3, 30] = 5.0, np.nan, -0.5
        absent = [int(i) for i in np.flatnonzero(~np.any(f["v"][:, 4:8], axis=1))][:1]  # blur2 absent: zeros
        assert absent  # the entry of a field the sample lacks holds a value too: damaged, it counts
        f["v"][absent[0], 5] = np.nan
    stats = insp.dataset_stats(degrade.open_dataset(src))
    assert sum(stats["levels"].values()) == 6 and stats["levels"]["other"] == 1
    field = next(f for f in stats["fields"] if f["index"] == 30)
    assert field["outside"] == 3 and sum(field["histogram"]) == 3
    assert next(f for f in stats["fields"] if f["index"] == 5)["outside"] == len(absent)
    assert sum(f["outside"] for f in stats["fields"]) == 3 + len(absent)
    result = CliRunner().invoke(main, ["inspect", src], catch_exceptions=False)
    assert result.exit_code == 0 and "other levels: 1" in result.stdout
    assert f"{3 + len(absent)} stored v value(s) outside [0, 1] or NaN" in " ".join(result.stderr.split())
    assert "warning" not in CliRunner().invoke(main, ["inspect", make_small_dataset(
        tmp_path / "ok", count=2, seed=2, shard_size=2)]).stderr


def test_cli_dataset_json_is_valid_and_table_has_sparklines(small):
    result = run("inspect", small, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["samples"] == 40
    table = run("inspect", small)
    assert "resize1.mode[" in table.output and any(c in table.output for c in insp.SPARKS)


def test_sparkline():
    assert insp.sparkline([0, 1, 2, 4]) == " ▃▅█"
    assert insp.sparkline([0, 0]) == "  "


def test_cli_vector_decodes_any_vector():
    v = degrade.encode(degrade.sample_params(3, np.random.default_rng(9)))
    result = run("inspect", "--vector", ",".join(f"{x:.6f}" for x in v), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["level"] is None and len(data["fields"]) == len(degrade.VECTOR_FIELDS)


def _png_size(path) -> tuple[int, int]:
    img = cv2.imread(str(path))
    assert img is not None, f"{path} is not a readable image"
    return img.shape[1], img.shape[0]


def test_pictures_are_valid_pngs_of_the_expected_size(small, tmp_path):
    pytest.importorskip("matplotlib")
    assert run("inspect", small, "--index", 3, "--png", tmp_path / "s.png").exit_code == 0
    assert _png_size(tmp_path / "s.png") == (1600, 700)
    assert run("inspect", small, "--png", tmp_path / "h.png").exit_code == 0
    assert _png_size(tmp_path / "h.png") == (1800, 1260)
    assert run("inspect", small, "--png", tmp_path / "g.png", "--grid", 6).exit_code == 0
    assert _png_size(tmp_path / "g.png") == (1760, math.ceil(6 / 4) * 270)


def test_the_contact_sheets_text_overlaps_no_picture(tmp_path, monkeypatch):
    """Level-3 captions take two lines: tight_layout drew a one-row sheet's title over them and a second
    row's captions over the pictures above (a review, and the docs' own sheet). Oracle: matplotlib's
    rendered extents of every text and every picture on the figure, pairwise."""
    pytest.importorskip("matplotlib")
    from degrade import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: (fig.canvas.draw(), drawn.append(_boxes(fig))))
    ds = degrade.ShardDataset(make_small_dataset(tmp_path / "l3", count=8, seed=3, shard_size=8, level=3))
    for indices in ([0, 1, 2], list(range(8))):  # one row, two rows
        plots.contact_sheet(tmp_path / "g.png", ds, indices)
    for texts, pictures in drawn:
        assert texts and pictures
        for name, box in texts:
            assert not any(box.overlaps(p) for p in pictures), name
    assert any("\n" in name for texts, _ in drawn for name, _box in texts)  # two-line captions were drawn


def _boxes(fig):
    """The figure's texts (suptitle, titles, the legend) and the axes' image areas, as display boxes."""
    renderer = fig.canvas.get_renderer()
    texts = [(t.get_text(), t.get_window_extent(renderer)) for t in [fig._suptitle, fig._supxlabel,
                                                                     *(ax.title for ax in fig.axes)]
             if t is not None and t.get_text()]
    pictures = [ax.get_window_extent(renderer) for ax in fig.axes if ax.images]
    return texts, pictures


@pytest.mark.parametrize("args,message", [
    (["inspect", "missing-folder"], "no such file"),
    (["inspect", "README.md"], "not an HDF5 file"),
    (["inspect", "{small}", "--index", "40"], "out of range"),
    (["inspect", "--vector", "0.1,0.2"], "33 values"),
    (["inspect"], "there is no ./degrade-dataset here"),
    (["inspect", "{small}", "--vector", "0.1"], "not both"),
    (["inspect", "{small}", "--grid", "4"], "--grid needs --png"),
    (["inspect", "{small}", "--png", "nodir/x.png"], "x.png: folder nodir does not exist"),
    (["inspect", "{small}", "--png", "dir.png"], "dir.png: Is a directory"),  # was said after the whole table
    (["inspect", "{small}", "--png", "link.png"], "link.png: Is a directory"),  # a link to a folder: 'a device'
    # a lone later shard: its labels say 'sample 16' for position 0, so the refusal says which --index means
    (["inspect", "{small}/shard-00001.h5", "--index", "16"], "holds samples 16 to 31, at positions 0 to 15"),
    (["verify", "{small}/shard-00000.h5"], "verify checks a dataset folder"),  # was '.../manifest.json: Not a dir'
])
def test_bad_input_is_one_clear_line(small, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("not a shard")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "dir.png", target_is_directory=True)
    result = CliRunner().invoke(main, [a.replace("{small}", small) for a in args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a raw exception CliRunner caught
    assert "samples (level" not in result.output  # refused before any statistics are printed


def test_inspect_defaults_to_the_folder_make_dataset_writes(small, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(small, tmp_path / "degrade-dataset")
    result = CliRunner().invoke(main, ["inspect", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 40


def test_piped_tables_are_never_cut(small):
    result = run("inspect", small)  # CliRunner is not a terminal: rich would assume 80 columns
    assert result.exit_code == 0 and "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) > 80
    sample = run("inspect", small, "--index", "3")
    assert sample.exit_code == 0 and "…" not in sample.output


def test_a_vector_alone_can_be_drawn(tmp_path):
    v = ",".join(["0.5"] * 4 + ["0"] * 4 + ["0", "1"] + ["0.6", "1", "0", "0"] + ["0"] * 4
                 + ["0.3", "0", "1", "0"] + ["0"] * 4 + ["0.5", "1"] + ["0", "0"] + ["1", "0", "0"])
    result = run("inspect", "--vector", v, "--png", tmp_path / "v.png")
    assert result.exit_code == 0, result.output
    assert _png_size(tmp_path / "v.png") == (1000, 700)


def test_dataset_statistics_parse_one_shard_of_records_at_a_time(small, monkeypatch):
    """A parsed record is about 2 KB: all of a million-sample dataset's at once were 2 GB. The statistics
    parse them shard by shard (16 samples per shard here, 40 in all), so memory follows the shard size."""
    seen = []
    real = insp._present_matrix
    monkeypatch.setattr(insp, "_present_matrix", lambda records: seen.append(len(records)) or real(records))
    assert insp.dataset_stats(degrade.open_dataset(small))["samples"] == 40
    assert seen == [16, 16, 8]


def test_a_record_that_does_not_parse_is_named_by_its_sample(tmp_path):
    import h5py

    from degrade.errors import DegradeError

    src = make_small_dataset(tmp_path / "ds", count=6, seed=2, shard_size=3)
    with h5py.File(f"{src}/shard-00001.h5", "r+") as f:
        f["params"][1] = "{"
    with pytest.raises(DegradeError, match=r"^sample 4 \(shard-00001.h5 row 1\): not valid JSON"):
        insp.dataset_stats(degrade.open_dataset(src))
    result = CliRunner().invoke(main, ["inspect", src])
    assert result.exit_code == 1 and "sample 4 (shard-00001.h5 row 1): not valid JSON" in result.output


def test_a_damaged_stored_v_is_named_and_an_incomplete_dataset_said(small, tmp_path):
    """A NaN in one sample's stored v was refused as 'the vector contains NaN or infinite values', which reads
    like a bad --vector: it names the dataset and sample now. An incomplete dataset (a run stopped midway)
    was shown as if its shards were all there: a note gives the samples made of those planned."""
    import shutil

    import h5py

    damaged = tmp_path / "damaged"
    shutil.copytree(small, damaged)
    with h5py.File(damaged / "shard-00001.h5", "r+") as f:
        f["v"][2, 5] = np.nan
    result = run("inspect", damaged, "--index", 18)
    assert result.exit_code == 1
    assert f"{damaged} sample 18: its stored v: the vector contains NaN" in " ".join(result.output.split())
    assert "degrade verify" in result.output
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest.update(complete=False, shards=manifest["shards"][:2])
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    result = run("inspect", damaged)
    assert result.exit_code == 0 and "is incomplete: 32 of its 40 samples are made" in " ".join(result.output.split())
    manifest["shards"] = [manifest["shards"][1]]  # a folder whose first shard is not made yet: samples 16-31
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    result = run("inspect", damaged, "--index", 16)  # a folder's range is not a lone shard's one run
    assert result.exit_code == 1 and "out of range" in result.output and "holds samples" not in result.output
