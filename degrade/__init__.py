"""degrade: the DASR degradation space as a library (docs/degradation.md).

Sample, then apply::

    rng = np.random.default_rng(0)
    params = degrade.sample_params(2, rng)   # every random choice, recorded
    lr = degrade.apply(hr, params)           # deterministic given the record
    v = degrade.encode(params)               # (33,) float32, layout "dasr33-v1"
    replay = degrade.decode(v)               # a record again, for any image

Importing this package does not import torch.
"""

from degrade._version import __version__ as __version__  # re-exported
from degrade.errors import DatasetError, DegradeError, DegradeWarning, ImageError
from degrade.io import read_image, write_image
from degrade.kernels import gaussian_kernel, sinc_kernel
from degrade.params import (
    BlurParams,
    DegradationParams,
    FinalParams,
    JpegParams,
    NoiseParams,
    ResizeParams,
    SincParams,
)
from degrade.pipeline import apply
from degrade.recipe import LEVELS, MIX_PROBS, SCALE, FinalRecipe, LevelRecipe, StageRecipe, parse_level
from degrade.samples import sample_images
from degrade.sampling import sample_params
from degrade.shards import Sample, ShardDataset, open_dataset
from degrade.testset import TestSet, make_testset, open_testset
from degrade.vector import VECTOR_FIELDS, VECTOR_LAYOUT, VECTOR_LENGTH, VectorField, decode, encode

__all__ = [
    "LEVELS",
    "MIX_PROBS",
    "SCALE",
    "VECTOR_FIELDS",
    "VECTOR_LAYOUT",
    "VECTOR_LENGTH",
    "BlurParams",
    "DatasetError",
    "DegradeError",
    "DegradeWarning",
    "DegradationParams",
    "FinalParams",
    "FinalRecipe",
    "ImageError",
    "JpegParams",
    "LevelRecipe",
    "NoiseParams",
    "ResizeParams",
    "Sample",
    "ShardDataset",
    "SincParams",
    "StageRecipe",
    "TestSet",
    "VectorField",
    "apply",
    "decode",
    "encode",
    "gaussian_kernel",
    "make_testset",
    "open_dataset",
    "open_testset",
    "parse_level",
    "read_image",
    "sample_images",
    "sample_params",
    "sinc_kernel",
    "write_image",
]
