"""The dataset pipeline: sources, cleaning with a drop report, transforms and aspect buckets."""

from difftrain.data.images import ImageError, decode_rgb
from difftrain.data.sources import CleanPair, DatasetError, RawPair, detect_format, iter_pairs

__all__ = [
    "CleanPair",
    "DatasetError",
    "ImageError",
    "RawPair",
    "decode_rgb",
    "detect_format",
    "iter_pairs",
]
