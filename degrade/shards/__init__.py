"""Training shards: reproducible, resumable HDF5 files of (HR patch, LR patch, v, params).

docs/dataset-format.md is the public contract. The package, one job per module (no module imports a
later one in this list):

- ``strings``: a shard's attributes and string rows, read so that shared strings cannot inflate;
- ``format``: the format's constants, :class:`DatasetConfig`, the manifest, the checks of a shard file;
- ``sample``: :class:`Sample` and :class:`SampleBatch`, what reading gives;
- ``sources``: the scan of the source images and the per-worker cache of decoded ones;
- ``generate``: sample `i` from (seed, i) alone (:class:`SampleMaker`, :func:`make_sample`);
- ``executor``: one ordered map over a thread, loky worker processes or a joblib backend (Dask);
- ``write``: :func:`make_dataset`, crash-safe and resumable;
- ``read``: :func:`open_dataset` and :class:`ShardDataset`;
- ``verify``: :func:`verify_dataset`.
"""

from degrade.errors import DatasetError, SampleIndexError, SampleIndexTypeError
from degrade.shards.format import COMPRESSIONS, DatasetConfig, Source, read_manifest
from degrade.shards.generate import SampleMaker, make_sample, sample_rng
from degrade.shards.read import ShardDataset, open_dataset
from degrade.shards.sample import Sample, SampleBatch
from degrade.shards.sources import SourceCache, SourceScan, scan_sources
from degrade.shards.verify import verify_dataset
from degrade.shards.write import MakeReport, abandoned_writes, make_dataset, shard_bytes_bound

__all__ = [
    "COMPRESSIONS",
    "DatasetConfig",
    "DatasetError",
    "MakeReport",
    "Sample",
    "SampleBatch",
    "SampleIndexError",
    "SampleIndexTypeError",
    "SampleMaker",
    "ShardDataset",
    "Source",
    "SourceCache",
    "SourceScan",
    "abandoned_writes",
    "make_dataset",
    "make_sample",
    "open_dataset",
    "read_manifest",
    "sample_rng",
    "scan_sources",
    "shard_bytes_bound",
    "verify_dataset",
]
