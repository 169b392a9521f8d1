"""``difftrain dataset cache``: clean a dataset and encode it into the latent cache ahead of time.

The cache goes where a training job looks for it (``<dataset uri>/.difftrain-cache``), each sample
under the address the job computes from the same image, caption, preprocessing settings and
model, so the job's first run skips the encoders; run again after adding images, it encodes only
those. With ``--job`` it reads a DiffusionTrainingJob and caches each of its datasets (``dataset``
or every entry of ``datasets``) with the job's preprocessing, seed and base model. The argument
parser lives in :mod:`difftrain.cli` (this module imports torch, which the operator's image does
not have).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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
    from difftrain.data.command import _dataset_spec
    from difftrain.models.families import family

    spec = _dataset_spec(args)
    pre = _preprocessing(args)
    with _model(args, args.model) as components:
        # the resolution a run on this model trains at when its job leaves it unset (SDXL 1024)
        default = family(components.family).default_resolution
        if args.resolution is None and pre.resolution != default:
            pre = pre.model_copy(update={"resolution": default})
        return _cache_dataset(args, spec, pre, args.seed, components, args.cache_root, bars)


def build_job_caches(args: argparse.Namespace, bars: bool = True) -> list[CacheOutcome]:
    """``--job``: each dataset of the job (``dataset``, or each of ``datasets``) into the cache
    beside it, with the job's preprocessing, seed and base model, as its run looks them up."""
    from difftrain.api import DiffusionTrainingJob, SpecError, parse_resource

    try:
        doc = yaml.safe_load(Path(args.job).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError("job", [f"--job {args.job}: {exc}"]) from None
    job = parse_resource(doc)
    if not isinstance(job, DiffusionTrainingJob):
        raise SpecError("job", [f"--job {args.job}: a DiffusionTrainingJob, not {job.kind}"])
    spec = job.spec
    model = args.model or spec.base_model.uri
    if model is None:
        raise SpecError(
            "job", ["baseModel is a hub id: give the model's folder or file with --model"]
        )
    if spec.storage is not None and not args.endpoint:  # the job's store, keys from the env
        args.endpoint = spec.storage.endpoint
        args.insecure = not spec.storage.secure
        args.region = spec.storage.region
    seed = spec.hyperparameters.seed
    template = spec.dreambooth.instance_prompt if spec.dreambooth is not None else None
    with _model(args, model) as components:
        from difftrain.models.families import family
        from difftrain.train.family_rules import for_family

        # the job's settings as its run resolves them for this model's family (SDXL: 1024 px)
        resolved = for_family(spec.resolved(), spec, family(components.family))
        pre = resolved.preprocessing.model_copy(update={"cache_latents": True})
        return [
            _cache_dataset(args, dataset, pre, seed, components, None, bars, template)
            for dataset in spec.dataset_list
        ]


@contextlib.contextmanager
def _model(args: argparse.Namespace, uri: str) -> Iterator[Any]:
    from difftrain.api import BaseModelSpec
    from difftrain.data.command import open_store_from_args
    from difftrain.models import load_base_model
    from difftrain.storage import scratch_dir

    work = scratch_dir("difftrain-dataset-cache-")
    try:
        yield load_base_model(
            BaseModelSpec(uri=uri), open_store_from_args(uri, args), work_dir=work / "model"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cache_dataset(
    args: argparse.Namespace,
    spec: Any,
    pre: Any,
    seed: int,
    components: Any,
    cache_root: str | None,
    bars: bool,
    template: str | None = None,
) -> CacheOutcome:
    """One dataset cleaned and its samples found or encoded beside it (or in ``cache_root``),
    each caption in DreamBooth's ``template`` as the job's run encodes it."""
    from tqdm import tqdm

    from difftrain.data.buckets import make_buckets, nearest_bucket
    from difftrain.data.cache import CACHE_FOLDER
    from difftrain.data.captions import CaptionPolicy
    from difftrain.data.cleaning import write_report
    from difftrain.data.command import open_store_from_args
    from difftrain.data.transforms import ImageTransform
    from difftrain.models.placement import frozen_dtype
    from difftrain.storage import join, scratch_dir
    from difftrain.train.shared_data import (
        CacheSettings,
        SingleProcess,
        cached_dataset,
        clean_dataset,
    )

    started = time.monotonic()
    device, dtype = _device_and_dtype(args.device, args.dtype)
    work = scratch_dir("difftrain-dataset-cache-")
    try:
        tokenizer = components.tokenizer
        store = open_store_from_args(spec.uri, args)
        root = cache_root or join(spec.uri, CACHE_FOLDER)
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
        policy = CaptionPolicy.from_spec(spec.captions, template=template)
        pairs = [dataclasses.replace(p, caption=policy.fixed(p.caption)) for p in cleaned.pairs]
        sizes = [(pre.resolution, pre.resolution)] * len(pairs)
        if pre.buckets.enabled:
            buckets = make_buckets(pre.buckets, pre.resolution)
            sizes = [nearest_bucket(p.width, p.height, buckets) for p in pairs]
        with tqdm(desc="encode", unit="image", file=sys.stderr, disable=not bars or None) as bar:
            settings = CacheSettings(
                pre=pre,
                seed=seed,
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
        if (args.job is None) == (args.uri is None):
            raise SpecError("dataset cache", ["give a dataset URI or --job JOB.yaml, not both"])
        if args.job is not None and args.cache_root:
            raise SpecError(
                "dataset cache",
                ["--cache-root is for one URI: a job's caches are beside each dataset"],
            )
        if args.job is None and not args.model:
            raise SpecError("dataset cache", ["--model is needed with a dataset URI"])
        outcomes = build_job_caches(args) if args.job else [build_dataset_cache(args)]
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
        if args.job:
            print(json.dumps({"datasets": [o.to_wire() for o in outcomes]}, indent=1))
        else:
            print(json.dumps(outcomes[0].to_wire(), indent=1))
        return 0
    for number, outcome in enumerate(outcomes):
        if number:
            print()
        print(f"cache   {outcome.uri}")
        print(f"key     {outcome.key}")
        result = (
            "hit (reused, nothing encoded)" if outcome.hit else f"encoded {outcome.encoded} new"
        )
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
