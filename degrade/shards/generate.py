"""Per-sample generation: sample `i` of a dataset depends only on (seed, i), the options and the sources.

Its random stream is ``SeedSequence(seed, spawn_key=(i,))``, from which it draws, in this order, the source
image (uniform over usable images), the crop position (uniform), then the degradation parameters
(docs/dataset-format.md, "How each sample is drawn"). So the output is the same for any number of
workers, and any sample can be regenerated alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from degrade.errors import DatasetError, SampleIndexError
from degrade.io import to_uint8
from degrade.params import DegradationParams
from degrade.pipeline import apply
from degrade.recipe import SCALE
from degrade.sampling import sample_params
from degrade.shards.format import DatasetConfig
from degrade.shards.sample import Sample
from degrade.shards.sources import SourceCache
from degrade.sharpen import unsharp_mask
from degrade.vector import VECTOR_LENGTH, encode

CHUNK = 16  # samples per unit of parallel work


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of global sample `index` of a dataset made with `seed`."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def draw_sample(config: DatasetConfig, index: int) -> tuple[int, tuple[int, int], DegradationParams]:
    """Sample `index`'s source, crop corner (y, x) and record, from its own stream only. SampleIndexError for an
    index outside the dataset (0 to count - 1: a sample the dataset does not hold)."""
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or not (
            0 <= index < config.count):
        raise SampleIndexError(f"sample {index!r} out of range: the dataset has {config.count} samples")
    rng = sample_rng(config.seed, index)
    src = int(rng.integers(len(config.sources)))
    s = config.sources[src]
    y = int(rng.integers(s.height - config.patch_size + 1))
    x = int(rng.integers(s.width - config.patch_size + 1))
    return src, (y, x), sample_params(config.level, rng)


def chunk_ranges(rows: range) -> list[range]:
    """`rows` cut into units of parallel work of CHUNK samples."""
    return [range(s, min(s + CHUNK, rows.stop)) for s in range(rows.start, rows.stop, CHUNK)]


@dataclass(eq=True)
class SampleMaker:
    """Makes the samples of one dataset configuration; owns the cache of decoded sources it reads.

    Picklable (the cache travels empty) and compared by configuration and pixel cap only, so a worker
    process can be handed one at start-up and keep it, and an equal one does not restart the workers.

    `max_pixels` is the decoded-image cap of :func:`degrade.read_image` for the sources (None: the cap of
    the process that reads, :func:`degrade.io.pixel_limit`). It travels with the task because a Dask
    worker is someone else's long-lived process: neither this process's environment nor its globals
    reach it.
    """

    config: DatasetConfig
    max_pixels: int | None = None
    cache: SourceCache = field(default_factory=SourceCache, compare=False, repr=False)

    def sample(self, index: int) -> tuple[int, tuple[int, int], Sample]:
        """Sample `index`: (source row, crop corner (y, x), the sample)."""
        config = self.config
        src, (y, x), params = draw_sample(config, index)
        image = self.cache.load(str(config.source_path(src)), max_pixels=self.max_pixels,
                                sha256=config.sources[src].sha256)
        p = config.patch_size
        if image.shape[0] < y + p or image.shape[1] < x + p:
            raise DatasetError(f"{config.sources[src].path}: changed since it was scanned (smaller now)")
        hr = np.ascontiguousarray(image[y : y + p, x : x + p])
        source = hr.astype(np.float32) / np.float32(255)
        lr = to_uint8(apply(unsharp_mask(source) if config.sharpen_hr else source, params))
        return src, (y, x), Sample(hr, lr, encode(params), params)

    def chunk(self, indices: range) -> dict[str, Any]:
        """Samples `indices` as arrays ready to store (the shard datasets' rows; `params` as JSON strings)."""
        n, p = len(indices), self.config.patch_size
        out: dict[str, Any] = {
            "hr": np.empty((n, p, p, 3), np.uint8),
            "lr": np.empty((n, p // SCALE, p // SCALE, 3), np.uint8),
            "v": np.empty((n, VECTOR_LENGTH), np.float32),
            "level": np.empty(n, np.uint8),
            "index": np.asarray(indices, np.int64),
            "source": np.empty(n, np.int32),
            "crop": np.empty((n, 4), np.int32),
            "params": [],
        }
        for j, i in enumerate(indices):
            src, (y, x), s = self.sample(i)
            out["hr"][j], out["lr"][j], out["v"][j] = s.hr, s.lr, s.v
            out["level"][j] = s.params.level
            out["source"][j] = src
            out["crop"][j] = (y, x, p, p)
            out["params"].append(s.params.to_json())
        return out

    __call__ = chunk  # the task of an OrderedMap: compared (hence reused by loky's workers) by configuration


def make_sample(config: DatasetConfig, index: int) -> tuple[int, tuple[int, int], Sample]:
    """Re-create sample `index` of `config` alone: (source row, crop corner (y, x), the sample).

    Decodes its source image each call; to make many samples, keep one :class:`SampleMaker`.
    """
    return SampleMaker(config).sample(index)
