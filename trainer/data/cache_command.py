"""``difftrain dataset cache``: clean a dataset and encode it into the latent cache ahead of time.

The cache goes where a training job looks for it (``<dataset uri>/.difftrain-cache``), each sample
under the address the job computes from the same image, caption, preprocessing settings and
model, so the job's first run skips the encoders; run again after adding images, it encodes only
those. The argument parser lives in :mod:`difftrain.cli` (this module
imports torch, which the operator's image does not have).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

from difftrain.api import EXIT_CONFIG_ERROR


@dataclass(frozen=True)
class CacheOutcome:
    """What ``dataset cache`` did: where the cache is and whether it was already there."""

    uri: str
    key: str
    report_uri: str
    hit: bool
    samples: int
    encoded: int  # samples whose latents this run encoded (0 on a hit)
    augmented: int
    size_bytes: int
    seconds: float

    def to_wire(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _preprocessing(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from difftrain.api import PreprocessingSpec, SpecError
    from difftrain.api.base import format_validation_error

    doc: dict[str, Any] = {
        "resolution": args.resolution,
        "crop": args.crop,
        "flipProbability": args.flip_probability,
        "maxRotationDegrees": args.max_rotation_degrees,
        "cacheLatents": True,
    }
    if args.buckets:
        doc["buckets"] = {"enabled": True}
    if args.boomerang_copies or args.boomerang_strength is not None:
        doc["boomerang"] = {
            "enabled": True,
            **({"copies": args.boomerang_copies} if args.boomerang_copies else {}),
            **(
                {"strength": args.boomerang_strength} if args.boomerang_strength is not None else {}
            ),
        }
    try:
        return PreprocessingSpec.model_validate({k: v for k, v in doc.items() if v is not None})
    except ValidationError as exc:
        raise SpecError("preprocessing", format_validation_error(exc)) from None


def _device_and_dtype(name: str, dtype: str) -> tuple[Any, Any]:
    import torch

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype == "auto":
        # As the training run: full precision where it trains on the CPU, half on an accelerator.
        return device, torch.float32 if device.type == "cpu" else torch.float16
    return device, dtypes[dtype]


def build_dataset_cache(args: argparse.Namespace, bars: bool = True) -> CacheOutcome:
    """Load the model and the dataset, then find or encode every sample; raises domain errors.

    The same preparation as a training run's (:mod:`difftrain.train.shared_data`): cleaning that
    reuses the kept facts of objects seen before, and a per-sample cache in which only new or
    changed samples are encoded.
    """
    from tqdm import tqdm

    from difftrain.api import BaseModelSpec
    from difftrain.data.buckets import make_buckets, nearest_bucket
    from difftrain.data.cache import CACHE_FOLDER
    from difftrain.data.cleaning import write_report
    from difftrain.data.command import _dataset_spec, open_store_from_args
    from difftrain.data.transforms import ImageTransform
    from difftrain.models import load_base_model
    from difftrain.models.placement import frozen_dtype
    from difftrain.storage import join, scratch_dir
    from difftrain.train.shared_data import (
        CacheSettings,
        SingleProcess,
        cached_dataset,
        clean_dataset,
    )

    started = time.monotonic()
    spec = _dataset_spec(args)
    pre = _preprocessing(args)
    device, dtype = _device_and_dtype(args.device, args.dtype)
    work = scratch_dir("difftrain-dataset-cache-")
    try:
        components = load_base_model(
            BaseModelSpec(uri=args.model),
            open_store_from_args(args.model, args),
            work_dir=work / "model",
        )
        tokenizer = components.tokenizer
        store = open_store_from_args(spec.uri, args)
        root = args.cache_root or join(spec.uri, CACHE_FOLDER)
        cache_store = open_store_from_args(root, args)
        with tqdm(desc="clean", unit="pair", file=sys.stderr, disable=not bars or None) as bar:
            cleaned = clean_dataset(
                spec,
                store,
                facts_root=root,
                facts_store=cache_store,
                count_tokens=lambda text: len(tokenizer(text).input_ids),
                max_tokens=tokenizer.model_max_length,
                progress=lambda n: bar.update(n - bar.n),
                workers=args.workers,
            )
        pairs = list(cleaned.pairs)
        sizes = [(pre.resolution, pre.resolution)] * len(pairs)
        if pre.buckets.enabled:
            buckets = make_buckets(pre.buckets, pre.resolution)
            sizes = [nearest_bucket(p.width, p.height, buckets) for p in pairs]
        with tqdm(desc="encode", unit="image", file=sys.stderr, disable=not bars or None) as bar:
            settings = CacheSettings(
                pre=pre,
                seed=args.seed,
                root=root,
                dtype=dtype,
                # Boomerang's networks in full precision (as this command always ran them)
                generation_dtype=frozen_dtype(device, "no"),
                batch_size=args.batch_size,
                progress=bar.update,
            )
            cached = cached_dataset(
                SingleProcess(device),
                settings,
                pairs,
                sizes,
                components,
                ImageTransform(pre),
                store,
                work / "cache",
                cache_store=cache_store,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cleaned.report.augmented = len(cached.samples) - len(pairs)
    # Beside the shards: what the cleaning dropped to make this cache (the latest run's).
    report_uri = write_report(cache_store, root, cleaned)
    return CacheOutcome(
        uri=root,
        key=cached.key,
        report_uri=report_uri,
        hit=cached.hit,
        samples=len(cached.samples),
        encoded=cached.encoded,
        augmented=len(cached.samples) - len(pairs),
        size_bytes=cached.size_bytes,
        seconds=round(time.monotonic() - started, 3),
    )


def cmd_cache(args: argparse.Namespace) -> int:
    """Build or reuse the cache and print it; exit 3 when the inputs cannot work as given."""
    from difftrain.api import SpecError
    from difftrain.data.boomerang import BoomerangError
    from difftrain.data.cache import CacheError
    from difftrain.data.images import ImageError
    from difftrain.data.sources import DatasetError
    from difftrain.models import ModelError
    from difftrain.storage import StorageError

    try:
        outcome = build_dataset_cache(args)
    except SpecError as exc:
        print(f"dataset cache: {'; '.join(exc.errors)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (DatasetError, ModelError, CacheError, BoomerangError, ImageError) as exc:
        print(f"dataset cache: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except StorageError as exc:
        print(f"dataset cache: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR if exc.permanent else 1
    if args.json:
        print(json.dumps(outcome.to_wire(), indent=1))
        return 0
    print(f"cache   {outcome.uri}")
    print(f"key     {outcome.key}")
    result = "hit (reused, nothing encoded)" if outcome.hit else f"encoded {outcome.encoded} new"
    print(f"result  {result}")
    extra = f" ({outcome.augmented} Boomerang variants)" if outcome.augmented else ""
    print(f"samples {outcome.samples}{extra}")
    print(f"size    {_human(outcome.size_bytes)} ({outcome.size_bytes} bytes)")
    print(f"report  {outcome.report_uri}")
    print(f"time    {outcome.seconds:.1f} s")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
