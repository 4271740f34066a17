from __future__ import annotations

import os

# Under pytest-xdist (`-n auto`: a worker process per core) each worker computes on one thread, and so do
# the processes its tests start (the variables are inherited): torch's, OpenMP's and OpenBLAS's default, a
# thread per core in every worker, oversubscribed the cores (the suite took longer on 2 workers than on 1).
# Set before numpy (OpenBLAS sizes its pool when loaded) and torch are imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import degrade  # noqa: E402

# The longest tests (20-60 s each on 2 cores, 2026-11-27; the rest take under 15 s), longest first. Under
# pytest-xdist they run first: one of them handed out among the last tests would leave the other workers idle
# at the end (the suite's wall time is its tests' time over the workers only while the ends are short ones).
LONGEST = ("test_benchmarks.py::test_gpu_speed_run_smoke_leaves_every_result",
           "test_benchmarks.py::test_gpu_train_run_smoke_leaves_every_result",
           "test_train.py::test_ddp_with_gloo_equals_one_process_with_the_global_batch",
           "test_benchmarks.py::test_expert_study_smoke_writes_results_and_a_table")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` (`-m cuda` selects them: what a GPU session runs) skip without a CUDA device. Under
    pytest-xdist the LONGEST tests come first (each worker collects, in the same order)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST)}
        items.sort(key=lambda item: rank.get(item.nodeid.rpartition("/")[2], len(rank)))  # stable: the rest as is
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda:
        return
    import torch

    if not torch.cuda.is_available():
        for item in cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A bundled sample photo, (H, W, 3) float32 in [0, 1]."""
    return degrade.read_image(degrade.sample_images()[0])


@pytest.fixture(scope="session")
def hr_patch(photo: np.ndarray) -> np.ndarray:
    """A 128x128 HR patch of real photo content (read-only, so mutation would raise)."""
    patch = np.ascontiguousarray(photo[100:228, 200:328])
    patch.setflags(write=False)
    return patch


def rng_for(seed: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def make_small_dataset(out, *, count: int, seed: int, shard_size: int, level="mix", compression: str = "none") -> str:
    """A dataset of 64-px patches from the bundled photos, written to `out`; returns its path."""
    from degrade import shards as dsm

    scan = dsm.scan_sources([], 64)
    config = dsm.DatasetConfig(level=level, count=count, patch_size=64, seed=seed, shard_size=shard_size,
                               compression=compression, source_root=scan.root, sources=tuple(scan.sources))
    dsm.make_dataset(config, out)
    return str(out)


def refuse_files_in(monkeypatch, folder, error: OSError) -> list:
    """degrade.io's files in `folder` (temporary ones, what every write of ours makes first) refused with
    `error`: a read-only file system, say, which chmod cannot make for root. Returns the (descriptor,
    name) of each file made elsewhere."""
    import degrade.io as dio

    real, made = dio.tempfile.mkstemp, []

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and dio.real_path(dir) == dio.real_path(folder):
            raise error
        made.append(real(*args, dir=dir, **kwargs))
        return made[-1]

    monkeypatch.setattr(dio.tempfile, "mkstemp", mkstemp)
    return made


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A dasr-train checkpoint of a tiny untrained model (2 experts, 1 block, 8 features; seed 0), for the
    inference and evaluation tests."""
    torch = pytest.importorskip("torch")
    from dasr_model.checkpoints import save_checkpoint
    from dasr_model.model import DASR, DASRConfig
    from dasr_model.train import TrainConfig

    torch.manual_seed(0)
    config = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8)
    model = DASR(config)
    path = tmp_path_factory.mktemp("ck") / "ckpt-1.pt"
    save_checkpoint(path, {"config": TrainConfig(shards="", out="", model=config).to_dict(), "step": 1,
                           "model": model.state_dict(), "ema_generator": model.generator.state_dict()})
    return path
