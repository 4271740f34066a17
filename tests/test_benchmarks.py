"""The prepared study scripts run end to end on CPU (their --smoke modes), so a GPU session never
finds them broken. Sizes are tiny; the figures mean nothing, only the outputs' shape is checked."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_train_run_smoke_leaves_every_result(tmp_path):
    out = tmp_path / "out"
    # --jobs 1: the smoke's datasets (64 + 8 samples) on one process, a worker pool's start-up saved (make-dataset's
    # --jobs is its own tests'); the rest as on the GPU
    subprocess.run([sys.executable, "benchmarks/gpu_train_run.py", "--smoke", "--minutes", "0.02", "--out", str(out),
                    "--work", str(tmp_path / "work"), "--jobs", "1"], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["compare.png", "eval.json", "log.txt", "metrics-e1.jsonl", "metrics-e5.jsonl",
                     "model.safetensors", "summary.md"]
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())  # what the device returns: 8 files, 16 MiB
    steps = [json.loads((out / f"metrics-e{k}.jsonl").read_text().splitlines()[-1])["step"] for k in (5, 1)]
    assert steps[0] == steps[1] >= 1  # 1 expert trains exactly as many steps as 5 experts did
    evals = json.loads((out / "eval.json").read_text())
    assert set(evals) == {"5 experts", "1 expert"} and set(evals["5 experts"]["levels"]) == {"1", "2", "3"}
    summary = (out / "summary.md").read_text()
    assert "Validation over steps" in summary and "5 experts - bicubic" in summary
    assert f"steps: 5 experts {steps[0]}, 1 expert {steps[1]} (" in summary
    assert "- expert convolutions (5 experts, `--expert-impl auto`): grouped, NCHW" in summary  # CPU: no probe
    for run in ("run-e5", "run-e1"):  # the GPU's arithmetic, under CPU autocast
        assert json.loads((tmp_path / "work" / run / "config.json").read_text())["run"]["dtype"] == "bfloat16 autocast"

    from dasr_model.infer import load_checkpoint_model

    assert load_checkpoint_model(out / "model.safetensors").config.num_experts == 5


def test_gpu_train_run_retries_an_early_failure_once_on_the_reference_path(tmp_path, monkeypatch):
    """A dasr-train that fails before its first logged step (a GPU-only path: the CUDA graph's recording,
    the expert-impl probe) is run once more with --expert-impl grouped --no-cuda-graph; one that fails after
    training, or twice, is not, and the end of its console reaches log.txt. Stand-in commands play
    dasr-train."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_train_run import train_run

    out, run_dir = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    argv = tmp_path / "argv.txt"
    only_grouped = [sys.executable, "-c", "import sys, time; print('probe failed', file=sys.stderr); "
                    f"open({str(argv)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n'); "
                    "ok = '--expert-impl' in sys.argv; time.sleep(0 if ok else 0.6); sys.exit(0 if ok else 3)",
                    "--max-minutes", "1.0"]
    assert train_run(out, run_dir, "5 experts", only_grouped)
    log = (out / "log.txt").read_text()
    assert "exit 3" in log and "probe failed" in log and log.count("--expert-impl grouped") == 2  # note, command
    first, second = argv.read_text().splitlines()
    assert first == "--max-minutes 1.0"  # the retry gets the minutes the failed attempt left
    impl, minutes = second.split(" --max-minutes ")
    assert impl == "--max-minutes 1.0 --expert-impl grouped --no-cuda-graph" and 0.9 < float(minutes) <= 0.99
    late = [sys.executable, "-c", "import time; time.sleep(0.6); raise SystemExit(6)", "--max-minutes", "0.01"]
    assert not train_run(out, run_dir, "5 experts", late)  # 0.6 s of a 0.6 s budget spent: no retry
    assert re.search(r"5 experts: no retry, \d+ s of its 0.01 minutes are spent", (out / "log.txt").read_text())
    always = [sys.executable, "-c", "import sys; sys.exit(4)"]
    assert not train_run(out, run_dir, "1 expert", always)
    assert (out / "log.txt").read_text().count("1 expert: dasr-train exit 4") == 2
    trained_then_failed = [sys.executable, "-c", f"import pathlib, sys; d = pathlib.Path({str(run_dir)!r}); "
                           "d.mkdir(); (d / 'metrics.jsonl').write_text('{\"step\": 10}\\n'); sys.exit(5)"]
    assert not train_run(out, run_dir, "5 experts", trained_then_failed)
    assert (out / "log.txt").read_text().count("5 experts: dasr-train exit 5") == 1  # no second attempt


def test_gpu_train_run_shrinks_the_runs_to_fit_its_total_budget(monkeypatch):
    """--total-minutes 9.5 with 120 s kept and the 1-expert run's 30 s safety net: after 40 s of datasets
    two 3-minute runs fit; after 300 s each gets (570 - 300 - 120 - 30) / 2 s = 1 minute; never under a
    tenth of what was asked."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_train_run import RESERVE_S, SAFETY_NET_S, run_minutes

    assert (RESERVE_S, SAFETY_NET_S) == (120, 30)
    assert run_minutes(3.0, 9.5, 40) == 3.0
    assert run_minutes(3.0, 9.5, 300) == pytest.approx(1.0)
    assert run_minutes(3.0, 9.5, 560) == pytest.approx(0.3)


def test_gpu_train_run_stops_an_overrunning_trainer_and_salvages_a_failed_run(tmp_path, monkeypatch, ckpt):
    """A dasr-train still running START_SLACK_S past its --max-minutes, or at the script's deadline, gets
    SIGTERM, on which dasr-train saves its model and exits 143: that run is kept; one that ignores it is
    killed; a run that failed after training leaves its metrics in OUT and, for 5 experts, a model file
    exported from its newest checkpoint."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_train_run as g

    monkeypatch.setattr(g, "START_SLACK_S", 0.5)
    monkeypatch.setattr(g, "STOP_GRACE_S", 1)
    out, run_dir = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    # as dasr-train on SIGTERM: its last step's line and model file, then exit 143
    saves = (f"import json, pathlib, signal, sys, time; d = pathlib.Path({str(run_dir)!r}); d.mkdir(exist_ok=True)\n"
             "def stop(*a):\n    (d / 'metrics.jsonl').write_text(json.dumps({'step': 7}) + '\\n')\n"
             "    (d / 'model.safetensors').write_bytes(b'm'); sys.exit(143)\n"
             "signal.signal(signal.SIGTERM, stop); time.sleep(60)")
    start = time.perf_counter()
    assert g.train_run(out, run_dir, "5 experts", [sys.executable, "-c", saves, "--max-minutes", "0"])
    assert time.perf_counter() - start < 30
    log = (out / "log.txt").read_text()
    assert "5 experts: still running after 0 s: stopping it (SIGTERM)" in log
    assert "5 experts: stopped (exit 143) after saving its model at step 7" in log
    start = time.perf_counter()  # the deadline comes first: past already, the run gets MIN_RUN_S
    monkeypatch.setattr(g, "START_SLACK_S", 600)
    monkeypatch.setattr(g, "MIN_RUN_S", 1)
    assert g.train_run(out, run_dir, "1 expert", [sys.executable, "-c", saves, "--max-minutes", "1"],
                       deadline=time.perf_counter() - 5)
    assert 0.9 < time.perf_counter() - start < 30
    monkeypatch.setattr(g, "START_SLACK_S", 0.5)
    monkeypatch.setattr(g, "MIN_RUN_S", 2)  # the failed run's 1 s left is under it, however slow its start
    early = [sys.executable, "-c", "import sys; sys.exit(3)", "--max-minutes", "1"]  # fails before a step
    assert not g.train_run(out, tmp_path / "early", "1 expert", early, deadline=time.perf_counter() + 1)
    assert re.search(r"1 expert: failed before its first logged step; no retry, [01] s left before the runs' "
                     "deadline", (out / "log.txt").read_text())  # under MIN_RUN_S
    starting = [sys.executable, "-c", "import time; time.sleep(60)", "--max-minutes", "0"]  # SIGTERM ends it
    assert not g.train_run(out, tmp_path / "late", "5 experts", starting)  # out of time: no retry
    log = (out / "log.txt").read_text()
    assert "5 experts: stopped (exit -15) before it saved a model" in log and "once more" not in log
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "time.sleep(60)", "--max-minutes", "0"]
    assert not g.train_run(out, run_dir, "1 expert", stubborn)
    assert "1 expert: killed, 1 s after SIGTERM" in (out / "log.txt").read_text()
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    shutil.copyfile(ckpt, run_dir / "ckpt-1.pt")
    g.salvage(out, run_dir, "5 experts", "5", time.perf_counter() + 300)
    assert (out / "metrics-e5.jsonl").read_text() == '{"step": 1}\n'
    from dasr_model.infer import load_checkpoint_model

    assert load_checkpoint_model(out / "model.safetensors").config.num_experts == 2  # the checkpoint's model


def test_gpu_train_run_says_in_its_summary_what_did_not_happen(tmp_path, monkeypatch):
    """main() with stand-ins for the datasets and dasr-train: a 5-expert run that fails, and one with no time
    left to start, each end the script with summary.md saying so (not only log.txt)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_train_run as g

    monkeypatch.setattr(g, "make_dataset", lambda files, out, **kw: str(out))
    monkeypatch.setattr(g, "train_run", lambda *args, **kw: False)
    out = tmp_path / "failed"
    with pytest.raises(SystemExit, match="5 experts: dasr-train failed"):
        g.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work")])
    assert "- 5 experts: dasr-train failed or was stopped before it saved a model (log.txt)" in \
        (out / "summary.md").read_text()
    out = tmp_path / "late"
    with pytest.raises(SystemExit, match="5 experts: no time left to train"):
        g.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--total-minutes", "1"])
    summary = (out / "summary.md").read_text()
    assert re.search(r"- 5 experts: not trained, \d+ s left before the runs' deadline", summary)


def test_gpu_train_run_compares_with_1_expert_only_where_both_were_evaluated(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_train_run import final_table

    level = {"psnr_y": 25.0, "ssim_y": 0.7, "bicubic_psnr_y": 24.0, "bicubic_ssim_y": 0.6}
    five = {"levels": {"1": level}}
    one = {"levels": {"1": {**level, "psnr_y": 24.5}}}
    both, alone = final_table({"5 experts": five, "1 expert": one}), final_table({"5 experts": five})
    assert both[0].endswith("| 5 experts - bicubic | 5 experts - 1 expert |") and both[2].endswith(" +0.50 dB |")
    assert alone[0].endswith("| 5 experts - bicubic |") and alone[2].endswith("| +1.00 dB |")
    assert [row.count("|") for row in alone] == [5, 5, 5]


def test_gpu_train_run_fits_its_loader_workers_to_dev_shm(monkeypatch):
    """Batches in flight (2 per worker, 48 x 3 x (256^2 + 64^2) bytes = 10.0 MB each) take at most half of
    /dev/shm: 12 workers need 241 MB, so a 64 MiB container default gets 1, 256 MiB gets 6, 8 GiB all 12."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_train_run import shm_workers

    batch = 48 * 3 * (256 * 256 + 64 * 64)
    assert batch == 10_027_008
    assert shm_workers(64 * 2**20, 48, 256) == 1
    assert shm_workers(256 * 2**20, 48, 256) == 6  # 128 MiB / 19.5 MB = 6.9
    assert shm_workers(8 * 2**30, 48, 256) >= 12
    assert shm_workers(4 * batch, 48, 256) == 1 and shm_workers(4 * batch - 1, 48, 256) == 1


def test_expert_study_smoke_writes_results_and_a_table(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/expert_study.py", "--smoke", "--work", str(tmp_path),
                          "--runs", "single,softmax_teacher", "--jobs", "1"],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["single-s0.json", "softmax_teacher-s0.json"]
    assert "| softmax_teacher | 1 |" in res.stdout and "median v for every image" in res.stdout


def test_profile_degrade_smoke_prints_a_per_op_table():
    """With --before (here this checkout itself) the other checkout's package is swapped in for its
    column and ours restored: the two columns time the same code."""
    res = subprocess.run([sys.executable, "benchmarks/profile_degrade.py", "--samples", "4", "--repeats", "1",
                          "--before", "."], cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| blur ") for r in rows) and any(r.startswith("| all ops ") for r in rows)
    assert any("before/now" in r for r in rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--one-core pins threads through /proc (Linux)")
def test_bench_make_dataset_smoke_prints_the_scaling_lines():
    res = subprocess.run([sys.executable, "benchmarks/bench_make_dataset.py", "--count", "8", "--repeats", "1",
                          "--compressions", "none", "--jobs", "2", "--one-core"],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    rows = [line for line in res.stdout.splitlines() if line.startswith("| make-dataset | none |")]
    assert [r.split("|")[3].strip() for r in rows] == ["1", "1 (1 core)", "2"]
    assert "- none: " in res.stdout and "x --jobs 1 on one core (" in res.stdout


def test_gpu_speed_run_smoke_leaves_every_result(tmp_path):
    """Issue 10's unattended GPU script, its --smoke path on CPU: every file, every table filled."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, "benchmarks/gpu_speed_run.py", "--smoke", "--tests", "--out", str(out),
                    "--work", str(tmp_path / "work")], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in out.iterdir()) == ["bf16.md", "compile.md", "environment.txt", "infer.md",
                                                      "log.txt", "profile.md", "summary.md", "train.md"]
    train, dense_last = (out / "train.md").read_text().split("\n## The step with the last convolution dense")
    # the smoke run's small networks (bench_train and bench_infer --small), said in each table's header
    assert "networks: generator of 5 experts, 2 blocks, 8 features; discriminator of 8 features (--small)" in train
    assert "model: DASR, 2 experts, 2 blocks, 8 features;" in (out / "infer.md").read_text()
    rows = [r for r in train.splitlines() if r.startswith("| 2 |")]
    # The smoke run takes the GPU's arithmetic (bf16 under CPU autocast) and so its tables' shape: per GAN
    # setting the float32 grouped baseline, then grouped and folded channels_last, each eager and as a CUDA
    # graph (which a CPU refuses)
    assert len(rows) == 10 and sum("| float32 | grouped | NCHW | eager |" in r for r in rows) == 2
    for impl in ("grouped | NCHW", "folded | channels_last"):
        assert sum(f"| bf16 autocast | {impl} | eager |" in r for r in rows) == 2
        assert sum(f"| bf16 autocast | {impl} | cuda graph | a CUDA graph needs a CUDA device" in r
                   for r in rows) == 2
    log = (out / "log.txt").read_text()
    best = log.split("at batch 2 without GAN: ")[1].split()[0]  # train.md's fastest eager bf16 no-GAN row
    no_gan = [r.split("|") for r in rows if r.startswith("| 2 | no | bf16 autocast |") and "| eager |" in r]
    fastest = min(no_gan, key=lambda c: float(c[7]))
    assert best == fastest[4].strip() + (":cl" if fastest[5].strip() == "channels_last" else "")
    compiled, combo = (out / "compile.md").read_text().split("## Compiled in the whole-step graph, the last "
                                                              "convolution dense")
    compiled = [r for r in compiled.splitlines() if r.startswith("| 2 |")]
    assert len(compiled) == 3 and "| bf16 autocast | folded |" in compiled[1]  # no GAN (the smoke traces one row)
    assert "| default (aot_eager) |" in compiled[1] and "| float32 | grouped | NCHW | eager |" in compiled[0]
    assert "| blocks compiled (aot_eager) | " in compiled[2] and re.search(r"\| [\d.]+ \| [\d.]+x \|", compiled[2])
    infer = (out / "infer.md").read_text()
    assert "| loader workers |" in train and "| 16 | experts fp32 |" in infer
    assert "| 16 | experts bf16 (autocast) |" in infer and "| 16 | fused bf16 channels_last |" in infer
    # the network alone, each way: twins (the bits' equality is tests/test_expert_impl.py's)
    alone = [r.split("|")[2].strip() for r in infer.splitlines() if r.startswith("| 16 | fused bf16 channels_last")]
    assert alone[1:3] == ["fused bf16 channels_last, network alone",
                          "fused bf16 channels_last, network alone, flat element-wise"]
    assert "### Profile: LR 16, fused bf16 channels_last" in infer and "ms per image (" in infer
    compiled = infer.split("### torch.compile (aot_eager): the fused bf16 channels_last network")[1]  # the last table
    for mode in ("default", "reduce-overhead"):  # the fused network compiled (aot_eager in the smoke run)
        assert re.search(rf"\| 16 \| fused bf16 channels_last, torch.compile {mode} \(first call \d+ s\) \| [\d.]+ \|",
                         compiled)
    assert "| mean |" in (out / "bf16.md").read_text()
    assert all(f"{name}: exit 0" in log for name in ("tests", "dataset", "train", "dense-last", "profile", "compile",
                                                     "combo", "infer", "sr-folder", "bf16", "autotune"))
    # appended to infer.md: dasr-sr over a folder, outputs written one after another, then on a writer thread
    folder = infer.split("## dasr-sr over a folder (bench_sr.py)")[1].split("\n## ")[0]
    assert [r.split("|")[1].strip() for r in folder.splitlines() if re.match(r"\| \d+ \| [\d.]+ \|", r)] == ["0", "1"]
    assert "outputs byte-identical across rows: yes" in folder
    # appended to train.md, the experiment: folded but for the last convolution, without and with GAN
    assert [r.split("|")[2:5] for r in dense_last.splitlines() if r.startswith("| 2 |")] == [
        [" no ", " bf16 autocast ", " folded+dense-last "], [" yes ", " bf16 autocast ", " folded+dense-last "]]
    # appended to compile.md: both experiments together (the smoke run: compiled without the graph), beside float32
    combo = [r.split("|")[2:7] for r in combo.splitlines() if r.startswith("| 2 |")]
    assert combo == [[" no ", " float32 ", " grouped ", " NCHW ", " eager "],
                     [" no ", " bf16 autocast ", " folded+dense-last ", " channels_last ", " default (aot_eager) "]]
    assert " skipped" in log.split("tests: exit 0")[1]  # the CUDA tests' own summary line, in the log
    profile = (out / "profile.md").read_text()  # one row profiled: its wall and busy time, its top operators
    assert profile.count("### Profile: batch 2, GAN no, bf16 autocast, folded, channels_last, eager") == 1
    assert "### Profile: batch 2, GAN no, bf16 autocast, folded, channels_last, cuda graph\n\nnot profiled: a CUDA " \
        "graph" in profile
    assert "under the profiler); cpu busy" in profile and "| `aten::convolution_backward` |" in profile
    # the layout trace of the eager row: tensors of a quarter of the LR feature maps (2 x 8 features x 8 x 8) or more
    assert "calls per step on tensors of 256 elements or more, " in profile
    assert re.search(r"calls per image on tensors of [\d,]+ elements or more, ", infer)
    summary = (out / "summary.md").read_text()
    fastest_rows = [r for r in summary.split("## environment.txt")[0].splitlines() if r.startswith("| 2 |")]
    assert [r.split("|")[2].strip() for r in fastest_rows] == ["no", "yes"]


def test_bench_train_row_out_of_memory_is_reported_and_the_rest_still_run(monkeypatch, capsys):
    """One row out of GPU memory prints 'out of memory' and the next rows still run; gpu_speed_run's parser
    skips that row. Any other error stops the script."""
    import torch

    bench = _bench_module("bench_train")
    error = {"dense": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")}

    def fake_step(device, batch, gan, warmup, repeats, impl, *args, **kwargs):
        if impl in error:
            raise error[impl]
        return 0.01, None, 0.1

    monkeypatch.setattr(bench, "bench_step", fake_step)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--batch-sizes", "2",
                                      "--impl", "grouped,dense,stacked"])
    bench.main()
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 2 |")]
    assert [r.split("|")[4].strip() for r in rows] == ["grouped", "dense", "stacked"]
    assert "| out of memory |" in rows[1] and "| 10.0 |" in rows[2]
    step_rows = _bench_module("gpu_speed_run").step_rows
    assert [r["expert impl"] for r in step_rows("\n".join(rows))] == ["grouped", "stacked"]
    error["stacked"] = RuntimeError("expected scalar type Float but found BFloat16")
    with pytest.raises(RuntimeError, match="expected scalar type"):
        bench.main()


def test_bench_fuse_prints_a_row_per_network():
    res = subprocess.run([sys.executable, "benchmarks/bench_fuse.py", "--features", "4", "--repeats", "2",
                          "--rounds", "1"], cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    rows = [r for r in res.stdout.splitlines() if r.startswith("| 4 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["float32", "bf16 channels_last"]
    assert "code: " in res.stdout and all(re.search(r"\| [\d.]+ \| [\d.]+ \|$", r) for r in rows)


def test_bench_train_a_failed_recording_loader_or_profile_costs_only_its_own_row(monkeypatch, capsys, tmp_path):
    """A CUDA-graph row whose recording fails, a loader whose worker dies and a profile that fails each print
    a line saying so, and the rows after them still run (the eager rows are the reference path)."""
    bench = _bench_module("bench_train")

    def fake_step(device, batch, gan, warmup, repeats, impl, *args, compile_mode="off", **kwargs):
        if compile_mode == "graph":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        return 0.01, None, 0.1

    def fake_loader(shards, batch, workers, steps):
        if workers == 2:
            raise RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error.")
        return 100.0

    def fake_profile(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "bench_step", fake_step)
    monkeypatch.setattr(bench, "bench_loader", fake_loader)
    monkeypatch.setattr(bench, "profile_step", fake_profile)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--batch-sizes", "2,1", "--impl", "grouped",
                                      "--cuda-graph", "--shards", str(tmp_path), "--loader-workers", "2,0"])
    bench.main()
    out = capsys.readouterr().out
    assert "| 2 | 48 | failed: DataLoader worker (pid 7) is killed by signal: Bus error. |" in out
    assert "| 0 | 48 | 100.0 |" in out
    rows = [r for r in out.splitlines() if re.match(r"\| [12] \| no \|", r)]
    assert [r.split("|")[6].strip() for r in rows] == ["eager", "cuda graph"] * 2
    assert "| failed: CUDA error: operation not permitted when stream is capturing | - |" in rows[1]
    bench.print_profile(__import__("torch").device("cpu"), 2, False, "grouped", False, 8, False)
    assert "not profiled: failed: CUDA out of memory. Tried to allocate 2.00 GiB" in capsys.readouterr().out


def test_bench_train_disc_upsample_times_each_gan_row_each_way(monkeypatch, capsys):
    """--disc-upsample: a GAN row per listed way, each timed with it and named in the last column (the
    float32 baseline with the release's F.interpolate, rows without GAN once); gpu_speed_run's fastest row
    names it; an unknown way is refused."""
    bench = _bench_module("bench_train")
    speed = _bench_module("gpu_speed_run")
    seen = []

    def fake_step(device, batch, gan, warmup, repeats, impl, *args, disc_upsample="auto", **kwargs):
        seen.append((gan, disc_upsample))
        return {"matmul": 0.005, "lerp": 0.02}.get(disc_upsample, 0.01) if gan else 0.01, None, 0.1

    monkeypatch.setattr(bench, "bench_step", fake_step)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--batch-sizes", "2", "--gan",
                                      "--fp32-baseline", "--precision", "bf16", "--disc-upsample", "auto,lerp,matmul"])
    bench.main()
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 2 |")]
    assert seen == [(False, "interpolate"), (False, "auto"), (True, "interpolate"), (True, "auto"), (True, "lerp"),
                    (True, "matmul")]
    assert [r.rstrip(" |").rsplit("|", 1)[1].strip() for r in rows] == ["-", "-", "interpolate", "auto", "lerp",
                                                                          "matmul"]
    parsed = speed.step_rows("\n".join(rows))
    assert [r["D up-sampling"] for r in parsed] == ["-", "-", "interpolate", "auto", "lerp", "matmul"]
    assert "| 2 | yes | bf16 autocast, grouped, NCHW, eager, D up-sampling matmul | 5.0 | 2.00x |" in \
        speed.fastest_table(parsed)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--disc-upsample", "nearest"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--disc-upsample: choose from auto, interpolate, lerp, matmul" in capsys.readouterr().err


def test_bench_train_blocks_compiled_train_like_eager_and_a_failed_experiment_is_a_row(monkeypatch, capsys):
    """The experiment "blocks" (each residual block compiled alone; aot_eager on the CPU) takes the same
    step as eager, to float rounding; a block experiment that fails is a row saying so, and the rows after
    it still run (other errors stop the script, as the test above shows)."""
    import torch

    if not hasattr(torch.nn.Module, "compile"):
        pytest.skip("nn.Module.compile: torch 2.2 or later")
    bench = _bench_module("bench_train")
    from torch._dynamo.utils import counters

    counters.clear()
    weights = {}
    for mode in ("off", "blocks"):
        parts, cfg, lr, hr, v = bench.setup_step(torch.device("cpu"), 2, False, "folded", True, 8, mode, "aot_eager")
        step, _ = bench.make_runner(parts, cfg, lr, hr, v, False, mode, torch.device("cpu"))
        step()
        step()
        weights[mode] = torch.cat([p.detach().flatten() for p in parts.model.parameters()])
    torch.testing.assert_close(weights["blocks"], weights["off"], rtol=0, atol=1e-6)
    # compiled: once for all of the generator's blocks where dynamo inlines modules (torch 2.11, 2.13: 1; 2.1: 16)
    assert counters["stats"]["unique_graphs"] >= 1

    def fake_step(device, batch, gan, warmup, repeats, impl, *args, compile_mode="off", **kwargs):
        if compile_mode in ("blocks", "default"):  # the compile step's rows: default's failure ended the script
            raise RuntimeError("BackendCompilerFailed: backend='inductor' raised:\nmore")
        return 0.01, None, 0.1

    monkeypatch.setattr(bench, "bench_step", fake_step)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--batch-sizes", "2", "--impl", "grouped",
                                      "--compile", "blocks,default,reduce-overhead"])
    bench.main()
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 2 |")]
    assert [r.split("|")[6].strip() for r in rows] == ["eager", "blocks compiled", "default", "reduce-overhead"]
    assert all("| failed: BackendCompilerFailed: backend='inductor' raised: | - |" in r for r in rows[1:3])
    assert "| 10.0 |" in rows[3]


def test_the_speed_runs_summary_takes_each_rows_speed_up_from_its_own_table():
    """summary.md's fastest row per (batch, GAN) is compared with the float32 step of its own table (one
    bench_train process), as bench_train's own column is; a row whose table has none (the up-sampling
    step's) with another table's, marked. Before, every row took train.md's: a compile.md row read 3.10x
    where its own table said 2.97x."""
    speed = _bench_module("gpu_speed_run")
    head = "| batch | GAN | precision | expert impl | memory format | compile | ms/step | x |\n|---:|\n"
    train_md = (head + "| 48 | no | float32 | grouped | NCHW | eager | 61.4 | 1.00x |\n"
                "| 48 | no | bf16 autocast | folded | channels_last | cuda graph | 24.7 | 2.49x |\n"
                "| 48 | yes | float32 | grouped | NCHW | eager | 302.8 | 1.00x |\n"
                "| 48 | yes | bf16 autocast | folded | channels_last | cuda graph | 125.0 | 2.42x |\n\n"
                + head + "| 48 | yes | bf16 autocast | folded | channels_last | cuda graph | 85.0 | 1.00x |\n")
    compile_md = (head + "| 48 | no | float32 | grouped | NCHW | eager | 58.7 | 1.00x |\n"
                  "| 48 | no | bf16 autocast | folded | channels_last | reduce-overhead | 19.8 | 2.97x |\n")
    rows = speed.step_rows(train_md, "train.md") + speed.step_rows(compile_md, "compile.md")
    assert [r["table"] for r in rows] == ["train.md#1"] * 4 + ["train.md#2", "compile.md#1", "compile.md#1"]
    summary = speed.fastest_table(rows)
    assert "| 48 | no | bf16 autocast, folded, channels_last, reduce-overhead | 19.8 | 2.96x |" in summary
    assert "| 48 | yes | bf16 autocast, folded, channels_last, cuda graph | 85.0 | 3.56x * |" in summary
    assert "\\* against the float32 step of another table of this run" in summary


def test_bench_train_net_graph_compiles_the_network_for_the_whole_step_graph(monkeypatch, capsys):
    """The "net+graph" experiment: the network compiled as dasr-train --compile default builds it (inductor's
    default mode; here the aot_eager backend), its parameters the model's own, then handed to the whole-step
    CUDA graph, which a CPU refuses: a row saying so, not the end of the table."""
    import torch

    from dasr_model.errors import DASRError

    bench = _bench_module("bench_train")
    modes, compile_net = [], bench.compile_net
    monkeypatch.setattr(bench, "compile_net", lambda net, mode, backend: modes.append(mode) or compile_net(
        net, mode, backend))
    parts, cfg, lr, hr, v = bench.setup_step(torch.device("cpu"), 2, False, "folded", True, 8, "net+graph",
                                             "aot_eager", small=True)
    assert modes == ["default"]
    assert isinstance(parts.net, torch._dynamo.eval_frame.OptimizedModule) and parts.net._orig_mod is parts.model
    with pytest.raises(DASRError, match="CUDA"):
        bench.make_runner(parts, cfg, lr, hr, v, False, "net+graph", torch.device("cpu"))
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--batch-sizes", "2", "--impl", "folded",
                                      "--lr-size", "8", "--small", "--warmup", "0", "--repeats", "1",
                                      "--compile", "net+graph", "--compile-backend", "aot_eager"])
    bench.main()
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 2 |")]
    assert [r.split("|")[6].strip() for r in rows] == ["eager", "compiled + cuda graph"]
    assert "CUDA" in rows[1].split("|")[7] and re.search(r"\| [\d.]+ \| 1.00x \|", rows[0])


def _bench_module(name: str):
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))  # _profile imports _layouts as bench_train does
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_profile_table_counts_kernels_only_on_cuda():
    """On CUDA the busy time is the kernels' own time: not the CPU operators that launched them, not the
    optimiser's annotation span (a user annotation of CUDA type whose time includes idle gaps); no kernel
    events at all is said, not shown as an idle device."""
    from types import SimpleNamespace

    import torch

    bench = _bench_module("_profile")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(key, device_type, us, count=2, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=us, count=count,
                               is_user_annotation=annotation)

    events = [ev("aten::conv2d", cpu, 9000.0), ev("Optimizer.step#Adam.step", cuda, 50000.0, annotation=True),
              ev("cudnn_grouped_kernel", cuda, 30000.0, count=74), ev("elementwise_kernel", cuda, 10000.0, count=20)]
    table = bench.profile_table(events, steps=2, wall=0.040, profiled=0.045, cuda=True)
    assert table.startswith("wall 40.0 ms per step (45.0 under the profiler); device busy 20.0 ms, 50 % of the wall")
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert rows == ["| `cudnn_grouped_kernel` | 37 | 15.00 | 75.0 % |", "| `elementwise_kernel` | 10 | 5.00 | 25.0 % |"]
    assert "no breakdown" in bench.profile_table(events[:2], steps=2, wall=0.04, profiled=0.05, cuda=True)
    image = bench.profile_table(events, steps=2, wall=0.040, profiled=0.045, cuda=True, unit="image")
    assert image.startswith("wall 40.0 ms per image (") and "| calls per image | own device ms per image |" in image


# kernel names as CUDA 13 / torch 2.11 report them (shortened where they repeat themselves)
MUL_STRIDED = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
               "BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor"
               "<float> > >(at::TensorIteratorBase&, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
               "c10::BFloat16, at::native::binary_internal::MulFunctor<float> > const&)::{lambda(int)#1}>(int, ...)")
ADD_VECTORISED = ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>, "
                  "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)")
CAST_COPY = ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
             "::{lambda()#3}::operator()() const::{lambda()#12}::operator()() const::{lambda(float)#1}, std::array<"
             "char*, 2ul>, 4, TrivialOffsetCalculator<1, unsigned int>, TrivialOffsetCalculator<1, unsigned int>, "
             "at::native::memory::LoadWithCast<1>, at::native::memory::StoreWithCast<1> >(int, ...)")
CUDNN = "sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1"


def test_short_kernel_names_say_what_the_kernel_computes():
    bench = _bench_module("_profile")
    assert bench.short_kernel(MUL_STRIDED) == "elementwise_kernel<128, 4> [BFloat16] · gpu_kernel_impl_nocast, " \
        "BinaryFunctor, MulFunctor"
    assert bench.short_kernel(ADD_VECTORISED) == "vectorized_elementwise_kernel<8> [BFloat16] · CUDAFunctor_add"
    assert bench.short_kernel(ADD_VECTORISED.replace("c10::BFloat16", "float")) == \
        "vectorized_elementwise_kernel<8> [float] · CUDAFunctor_add"  # not the same row as the bf16 one
    assert bench.short_kernel(CAST_COPY) == "unrolled_elementwise_kernel [float] · direct_copy_kernel_cuda, " \
        "LoadWithCast, StoreWithCast"
    clamp = ("void at::native::vectorized_elementwise_kernel<8, at::native::(anonymous namespace)::launch_clamp_scalar("
             "at::TensorIteratorBase&, c10::Scalar, c10::Scalar, at::native::detail::ClampLimits)::{lambda()#1}::"
             "operator()() const::{lambda()#14}::operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul>"
             " >(int, ...)")
    assert bench.short_kernel(clamp) == "vectorized_elementwise_kernel<8> [BFloat16] · launch_clamp_scalar"
    upsample = ("void at::native::(anonymous namespace)::upsample_bilinear2d_out_frame<c10::BFloat16, float>(int, "
                "float, float, bool)")
    assert bench.short_kernel(upsample) == "upsample_bilinear2d_out_frame [BFloat16]"
    assert bench.short_kernel(CUDNN) == CUDNN[:100] and bench.short_kernel("Memcpy HtoD (Pinned -> Device)") == \
        "Memcpy HtoD (Pinned -> Device)"
    assert len(bench.short_kernel(MUL_STRIDED, width=30)) == 30
    # cuDNN's layout transposes name their types in CUDA's words: a bf16 one is not a float one
    transpose = "void nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, true, false, (cudnnKernelDataType_t)0>(int)"
    assert bench.short_kernel(transpose) == "nchwToNhwcKernel [BFloat16]"
    assert bench.short_kernel(transpose.replace("__nv_bfloat16", "__half")) == "nchwToNhwcKernel [Half]"
    gemm = "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)"
    assert bench.short_kernel(gemm) == "cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8"


def test_a_table_cell_holds_an_errors_first_line_or_its_type():
    first_line = _bench_module("_profile").first_line
    assert first_line(RuntimeError("CUDA error: out of memory\nmore")) == "CUDA error: out of memory"
    assert first_line(RuntimeError("")) == "RuntimeError" and len(first_line(RuntimeError("x" * 300))) == 120


def test_operator_table_charges_kernels_to_the_operators_that_launched_them():
    """On CUDA each operator's own kernels (not its children's), per step, by where it ran (outermost >
    parent > itself) and its inputs' shapes, layouts (from the recorded strides; a tensor list's one by
    one) and dtypes; shares of all the kernels' time, of which what no operator launched (a CUDA graph's
    replay) is said; without any launching operator there is no table, and without recorded strides the
    layouts read "?" and the heading says why."""
    from types import SimpleNamespace

    import torch

    bench = _bench_module("_profile")
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    ids = iter(range(1, 1000))

    def op(name, parent=None, kernels=(), shapes=(), strides=(), dtypes=()):
        return SimpleNamespace(name=name, id=next(ids), cpu_parent=parent, device_type=cpu,
                               structured_input_shapes=list(shapes),
                               structured_input_strides=list(strides), input_dtypes=list(dtypes),
                               kernels=[SimpleNamespace(name=n, duration=us) for n, us in kernels])

    def kernel(us):  # the kernel's own event, as the profiler lists it beside the operators
        return SimpleNamespace(name="k", device_type=cuda, self_device_time_total=us, kernels=[])

    feat, nchw, nhwc = [2, 8, 4, 4], [128, 16, 4, 1], [128, 1, 32, 8]
    steps = 2
    node = op("autograd::engine::evaluate_function: MulBackward0")
    events = []
    for _ in range(steps):
        mid = op("MulBackward0", node)
        events += [op("aten::mul", mid, [(MUL_STRIDED, 700.0)], [feat, feat, []], [nchw, nhwc, []],
                      ["c10::BFloat16", "c10::BFloat16", "Scalar"]),
                   op("aten::add", None, [(ADD_VECTORISED, 100.0)], [feat, feat], [nhwc, nhwc], ["float", "float"]),
                   op("aten::cat", None, [(CAST_COPY, 100.0)], [[feat, feat, feat, feat], []],
                      [[nchw, nhwc, nchw, nchw], []], ["float", "Scalar"]),
                   op("aten::conv2d", None, [], [feat]),  # launches nothing itself: not a row
                   kernel(700.0), kernel(100.0), kernel(100.0), kernel(100.0)]  # 100 µs from no operator
    table = bench.operator_table(events, steps=steps)
    assert table.startswith("Operators by the device time of the kernels they launched themselves: 0.9 of the 1.0 "
                            "ms the kernels ran per step:")
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert rows == [
        "| `MulBackward0 > aten::mul` | 2x8x4x4 NCHW c10::BFloat16, 2x8x4x4 NHWC c10::BFloat16 | 1 | 0.70 | 70.0 % "
        "| `elementwise_kernel<128, 4> [BFloat16] · gpu_kernel_impl_nocast, BinaryFunctor, MulFunctor` |",
        "| `aten::add` | 2x8x4x4 NHWC float, 2x8x4x4 NHWC float | 1 | 0.10 | 10.0 % "
        "| `vectorized_elementwise_kernel<8> [BFloat16] · CUDAFunctor_add` |",
        "| `aten::cat` | 2x8x4x4 NCHW float, 2x8x4x4 NHWC float, 2x8x4x4 NCHW float, … | 1 | 0.10 | 10.0 % "
        "| `unrolled_elementwise_kernel [float] · direct_copy_kernel_cuda, LoadWithCast, StoreWithCast` |"]
    assert "no per-operator table" in bench.operator_table([e for e in events if e.device_type == cuda], steps=1)
    traced = {e.id: (e.structured_input_shapes, e.structured_input_strides, e.input_dtypes)
              for e in events if e.device_type == cpu}
    for e in events:
        e.structured_input_strides = []  # torch 2.11's events
    table = bench.operator_table(events, steps=steps)
    assert "(this torch's profiler records no strides: layouts read \"?\")" in table.splitlines()[0]
    assert "| `aten::add` | 2x8x4x4 ? float, 2x8x4x4 ? float |" in table
    # ... whose Chrome trace has the strides (traced_inputs): the same table as from the events' own
    assert [r for r in bench.operator_table(events, steps=steps, inputs=traced).splitlines() if r.startswith("| `")] \
        == rows


def test_traced_inputs_reads_strides_from_the_profilers_chrome_trace():
    import torch
    from torch.profiler import ProfilerActivity, profile

    bench = _bench_module("_profile")
    x = torch.rand(2, 8, 4, 4)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _ = x.contiguous(memory_format=torch.channels_last) + x
    found = bench.traced_inputs(prof)
    if not found:
        pytest.skip(f"torch {torch.__version__}'s Chrome trace records no input strides")
    add = next(e for e in prof.events() if e.name == "aten::add")
    shapes, strides, dtypes = found[add.id]
    assert shapes[:2] == [[2, 8, 4, 4]] * 2 and strides[:2] == [[128, 1, 32, 8], [128, 16, 4, 1]]
    assert dtypes[:2] == ["float", "float"]
    assert bench.traced_inputs(prof) == {}  # a profiler exports its trace once: the second time, nothing


def test_layout_names_a_tensors_dimensions_by_stride():
    import torch

    lay = _bench_module("_layouts")
    x = torch.zeros(4, 3, 8, 8)
    assert lay.layout(x) == "NCHW" and lay.layout(x.contiguous(memory_format=torch.channels_last)) == "NHWC"
    assert lay.layout(x.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)) == "HWNC"
    assert lay.layout(torch.zeros(1, 12, 8, 8).contiguous(memory_format=torch.channels_last)) == "HWC"  # a fold
    assert lay.layout(x[:, :, ::2]) == "strided" and lay.layout(x[:1, :1].expand(4, 3, 8, 8)) == "broadcast"
    assert lay.layout(torch.zeros(())) == "-" and lay.layout(torch.zeros(5)) == "N"


def test_layout_trace_flags_operators_whose_large_operands_differ_in_layout_or_broadcast():
    import torch

    lay = _bench_module("_layouts")
    x = torch.rand(2, 8, 16, 16)
    cl = x.contiguous(memory_format=torch.channels_last)
    bias = torch.rand(8, 1, 1)
    weight = torch.rand(8, 8, 3, 3)

    def run():
        (x + x).relu()  # the same layout: neither
        _ = x + cl  # NCHW + NHWC: mixed
        _ = x[:, :, ::2] + 1  # not dense: mixed (a Python number is not a broadcast tensor)
        _ = x + bias  # a smaller operand read over and over: broadcast; it does not decide a layout
        _ = x * torch.ones(()).expand(2, 8, 16, 16)  # an expanded one: broadcast
        _ = torch.nn.functional.conv2d(x, weight, padding=1)  # a weight is not broadcast; not an image either
        _ = torch.rand(2, 2) + 1  # below min_numel: not counted

    trace = lay.trace_layouts(run, min_numel=1000)
    table = lay.layout_table(trace)
    assert table.startswith("Of 7 calls per step on tensors of 1,000 elements or more, 2 mix layouts and 2 more "
                            "broadcast an input")
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert rows[:4] == [  # mixed first, then broadcast, each by elements moved
        "| `aten.add.Tensor` | 2x8x16x16 | NCHW, NHWC -> NCHW | 1 | **mixed layouts** |",
        "| `aten.add.Tensor` | 2x8x8x16 | strided -> NCHW | 1 | **mixed layouts** |",
        "| `aten.add.Tensor` | 2x8x16x16 | NCHW -> NCHW | 1 | broadcast |",
        "| `aten.mul.Tensor` | 2x8x16x16 | NCHW, broadcast -> NCHW | 1 | broadcast |"]
    assert "| `aten.add.Tensor` | 2x8x16x16 | NCHW, NCHW -> NCHW | 1 |  |" in rows
    assert "| `aten.relu.default` | 2x8x16x16 | NCHW -> NCHW | 1 |  |" in rows
    assert "| `aten.convolution.default` | 2x8x16x16 | NCHW -> NCHW | 1 |  |" in rows and len(rows) == 7
    assert [r for r in lay.layout_table(trace, flagged_only=True).splitlines() if r.startswith("| `")] == rows[:4]


def test_layout_trace_counts_a_gpu_convolutions_bias_as_a_broadcast():
    """Off the CPU (here the meta device stands in for a GPU) a convolution with a bias adds it after the
    kernel, broadcast; on a CPU, and without a bias, not."""
    import torch

    lay = _bench_module("_layouts")
    for device, bias, want in (("meta", True, True), ("meta", False, False), ("cpu", True, False)):
        x, w = torch.zeros(2, 8, 16, 16, device=device), torch.zeros(8, 8, 3, 3, device=device)
        b = torch.zeros(8, device=device) if bias else None
        trace = lay.trace_layouts(lambda: torch.nn.functional.conv2d(x, w, b, padding=1), 1000)
        assert [(c.op, c.broadcast) for c in trace.calls] == [("aten.convolution.default", want)], (device, bias)


@pytest.mark.parametrize("cuda_pixel_shuffle", [False, True])
def test_the_folded_channels_last_step_changes_the_images_layout_once_each_way(monkeypatch, cuda_pixel_shuffle):
    """dasr-train's default step on a GPU (folded, channels_last), traced on the CPU: at the SR image's
    size or more only two operators mix layouts (a transposition each on a GPU, of the fold's (H, W, N, C)
    to the batch's own): the forward's base + residual, and one copy of the gradient back into the fold
    (beside the pixel shuffle's own copies, 6-D). F.l1_loss (an NCHW gradient meeting channels_last
    tensors) and an `x[0]` unfold (its gradient NCHW, converted again by the last convolution) once added
    more. `cuda_pixel_shuffle`: F.pixel_shuffle returns NCHW whatever its input, as PyTorch's does on CUDA
    (a CPU's keeps channels_last), which the generator's own pixel_shuffle must not depend on."""
    import copy

    import torch

    if cuda_pixel_shuffle:
        plain = torch.nn.functional.pixel_shuffle
        monkeypatch.setattr(torch.nn.functional, "pixel_shuffle", lambda x, r: plain(x, r).contiguous())

    from dasr_model.config import DASRConfig
    from dasr_model.model import DASR, set_expert_impl
    from dasr_model.train import StepParts, TrainConfig, lay_out, train_step

    lay = _bench_module("_layouts")
    torch.manual_seed(0)
    model = set_expert_impl(DASR(DASRConfig(num_experts=2, num_feat=8, num_block=2, predictor_feat=8)), "folded")
    fmt = lay_out(True, model.predictor)
    parts = StepParts(net=model, model=model, ema=copy.deepcopy(model.generator).requires_grad_(False),
                      opt=torch.optim.Adam(model.parameters(), lr=1e-4), disc=None, opt_d=None)
    lr, hr = torch.rand(2, 3, 32, 32).contiguous(memory_format=fmt), torch.rand(2, 3, 128, 128).contiguous(
        memory_format=fmt)
    cfg = TrainConfig(shards="", out="")
    train_step(parts, cfg, lr, hr, torch.rand(2, 33), bf16=True)
    trace = lay.trace_layouts(lambda: train_step(parts, cfg, lr, hr, torch.rand(2, 33), bf16=True), hr.numel())
    flagged = sorted((c.op, n) for c, n in trace.calls.items() if c.mixed and len(c.shape) == 4)
    assert flagged == [("aten.add.Tensor", 1), ("aten.clone.default", 1)], lay.layout_table(trace)
    # the 6-D copies: the last pixel shuffle's own (its data must move), forward and backward
    assert sorted(c.op for c in trace.calls if c.mixed and len(c.shape) != 4) == ["aten.clone.default"] * 2
    # l1_loss's backward: the sign times the sum's expanded gradient (a broadcast, in the image's layout)
    assert [(c.op, c.layouts) for c in trace.calls if c.broadcast and c.shape == tuple(hr.shape)] == [
        ("aten.mul.Tensor", "broadcast, NHWC -> NHWC")], lay.layout_table(trace)
    assert sum(trace.calls.values()) > 10  # the HR image's and features' operators were seen


def test_bench_validate_smoke_prints_both_paths_and_their_difference():
    res = subprocess.run([sys.executable, "benchmarks/bench_validate.py", "--small", "--samples", "4", "--repeat", "1"],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    assert "| evaluate_pairs (per image, experts fused) |" in res.stdout and "| ValidationSet (batched" in res.stdout
    diff = float(res.stdout.split("largest PSNR-Y difference per level: ")[1].split()[0])
    assert diff < 1e-6


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bench_infer_experiments_compute_the_same_network(device):
    """bench_infer's inference experiments are the fused network itself: the last convolution padded to
    LAST_CHANNELS outputs (zero weights, sliced back), and on CUDA each block's conv1 + bias + ReLU in one
    cuDNN call. Oracle: the untouched network, channels_last, float64 on a CPU (1e-12: the same products),
    float32 on CUDA (2e-2 of the largest value: TF32 convolutions, which cuDNN's fused convolution-ReLU needs
    for its tensor-core engines, round at about 1e-3 per layer; a wrong rewrite is off by O(1)); a fuse into
    the changed network reaches it."""
    import torch

    from dasr_model.infer import fuse_experts
    from dasr_model.model import DASR, DASRConfig

    bench = _bench_module("bench_infer")
    torch.manual_seed(0)
    model = DASR(DASRConfig(num_experts=2, num_block=2, num_feat=8, predictor_feat=8)).to(device).eval()
    for p in model.generator.parameters():  # weights far from the 0.1-scaled init: every layer matters
        p.data.normal_(0, 0.3 if device == "cpu" else 0.1)  # (on CUDA: activations that do not grow)
    lr = torch.rand(1, 3, 12, 10, device=device)
    dtype = torch.float64 if device == "cpu" else torch.float32
    tweaks = [bench.pad_last] + ([bench.relu_in_cudnn, bench.both_tweaks] if device == "cuda" else [])
    with torch.no_grad():
        a = torch.softmax(torch.randn(1, 2, device=device), 1)
        ref = fuse_experts(model.generator, a, dtype=dtype, channels_last=True)
        for tweak in tweaks:
            net = fuse_experts(model.generator, torch.ones_like(a) / 2, dtype=dtype, channels_last=True)
            tweak(net)
            model.generator.fuse(a, into=net)  # the mix fused into it after the change, as the rows do
            want = ref(lr.to(dtype))
            outputs = []  # every convolution's output channels, seen where the network calls conv2d
            real_conv2d = bench.F.conv2d
            bench.F.conv2d = lambda x, w, *args, **kw: outputs.append(w.shape[0]) or real_conv2d(x, w, *args, **kw)
            try:
                got = net(lr.to(dtype))
            finally:
                bench.F.conv2d = real_conv2d
            if tweak in (bench.pad_last, bench.both_tweaks):  # the padded last convolution ran, not the plain one
                assert 3 not in outputs and outputs[-1] == bench.LAST_CHANNELS
            assert got.shape == want.shape == (1, 3, 48, 40)
            tol = 1e-12 if device == "cpu" else 2e-2
            assert (got.double() - want.double()).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("ci", ["", "1"])
def test_gpu_speed_run_keeps_every_test_outcome_in_the_log(tmp_path, monkeypatch, ci):
    """The GPU run's tests ran with -q -rs: pytest's -r replaces its default fE, so no FAILED line was
    printed, and only the output's last 8,000 characters reached log.txt (a review: two failures with long
    tracebacks came back naming one). Each outcome line now comes first. Oracle: a real pytest run, with and
    without CI set (pytest then prints a failure's whole message on its summary line: it made the log 23 kB)."""
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.delenv("BUILD_NUMBER", raising=False)
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_a(): assert 1 == 2, 'x' * 12000\n"
        "def test_b(): pass\n"
        "@pytest.mark.skip(reason='needs CUDA')\n"
        "def test_c(): pass\n"
        "def test_d(): raise RuntimeError('y' * 9000)\n")
    speed = _bench_module("gpu_speed_run")
    done = subprocess.run([sys.executable, "-m", "pytest", *speed.PYTEST_ARGS, "test_x.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    logged = speed.tests_for_log(done.stdout, tail=2000)
    head = logged.split("the output's tail:")[0]
    for line in ("test_x.py::test_a FAILED", "test_x.py::test_b PASSED", "test_x.py::test_c SKIPPED (needs CUDA)",
                 "FAILED test_x.py::test_a - AssertionError", "FAILED test_x.py::test_d - RuntimeError"):
        assert line in head, line
    assert len(logged) < 4000


def test_bench_eval_prints_both_ways_and_their_agreement(capsys):
    """benchmarks/bench_eval.py: the strips against the whole-image baseline, on a small pair, agree."""
    _bench_module("bench_eval").main(["--width", "200", "--height", "120", "--niqe"])
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| PSNR") or line.startswith("| NIQE")]
    assert len(rows) == 2 and "dasr-eval scores of one 200x120 pair" in out
    for row in rows:
        assert float(row[-2]) < 1e-12  # the largest difference between the two ways
