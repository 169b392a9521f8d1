"""The dataset pipeline: sources, cleaning with a drop report, transforms and aspect buckets."""

from difftrain.data.boomerang import BoomerangError, boomerang_variants
from difftrain.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from difftrain.data.cache import CachedSample, CacheError, LatentCache, cache_space
from difftrain.data.cleaning import (
    REASONS,
    CleaningResult,
    clean,
    format_report,
    load_dataset,
    read_report,
    write_report,
)
from difftrain.data.images import ImageError, decode_rgb
from difftrain.data.sources import CleanPair, DatasetError, RawPair, detect_format, iter_pairs
from difftrain.data.transforms import ImageTransform

__all__ = [
    "REASONS",
    "BoomerangError",
    "BucketBatchSampler",
    "CacheError",
    "CachedSample",
    "CleanPair",
    "CleaningResult",
    "DatasetError",
    "ImageError",
    "ImageTransform",
    "LatentCache",
    "RawPair",
    "boomerang_variants",
    "cache_space",
    "clean",
    "decode_rgb",
    "detect_format",
    "format_report",
    "iter_pairs",
    "load_dataset",
    "make_buckets",
    "nearest_bucket",
    "read_report",
    "write_report",
]
