"""Data preparation shared by the processes of a job: one cleans, all encode the latent cache.

With several processes and the latent cache on, the main process reads and cleans the dataset and
sends the others the kept pairs without their bytes (:func:`clean_on_main`). On a cache miss every
process then encodes its share of the samples (:mod:`difftrain.data.cache_plan`: its run of
source images and their Boomerang variants), reading just its share's images, on its own
accelerator; once all have uploaded their shards the main process commits the manifest, and every
process reads the whole cache back. A process that fails tells the others, so none waits forever
at a barrier; the cache stays absent (no manifest) and the next attempt builds it again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from difftrain.api import DatasetReport, DiffusionTrainingJobSpec
from difftrain.storage import Store, join
from difftrain.train.methods import TrainingConfigError

if TYPE_CHECKING:
    from difftrain.data.cache import CachedSample, LatentCache
    from difftrain.data.cache_plan import PlannedShard
    from difftrain.data.cleaning import CleaningResult
    from difftrain.data.pairs import CleanPair
    from difftrain.data.transforms import ImageTransform
    from difftrain.models.components import Components

logger = logging.getLogger(__name__)

T = TypeVar("T")
Size = tuple[int, int]


@dataclass
class CachedDataset:
    """The run's cached samples (every process's, in sample order) and how they were found."""

    samples: list[CachedSample]
    key: str
    hit: bool
    encoded: int  # samples this process encoded (0 on a hit)


def cached_dataset(
    acc: Any,
    spec: DiffusionTrainingJobSpec,
    pairs: list[CleanPair],
    sizes: list[Size],
    components: Components,
    transform: ImageTransform,
    data_store: Store,
    local_dir: Path,
) -> CachedDataset:
    """The committed cache of these pairs, built by all processes together when there is none.

    ``pairs`` may lack their image bytes (see :func:`clean_on_main`); a process reads those of
    its share. The samples read their tensors from verified copies under ``local_dir``.
    """
    from difftrain.data.cache import CACHE_FOLDER, CacheError, LatentCache, cache_key
    from difftrain.data.cache_plan import plan_shards

    pre, hp = spec.preprocessing, spec.hyperparameters
    cache = LatentCache(data_store, join(spec.dataset.uri, CACHE_FOLDER))
    key = cache_key(pairs, pre, components.identity, seed=hp.seed)
    # the first process on each machine copies the shards; the others find verified copies
    with acc.local_main_process_first():
        samples = cache.lookup(key, local_dir=local_dir)
    if _everyone(acc, samples is not None):
        assert samples is not None
        return CachedDataset(samples, key, hit=True, encoded=0)

    copies = pre.boomerang.copies if pre.boomerang.enabled else 0
    plan = plan_shards(len(pairs), copies, acc.num_processes)

    def encode() -> int:
        share = _ShareInputs(pairs, sizes, components, transform, data_store)
        return _encode_share(acc, spec, cache, key, plan, share)

    def commit() -> None:
        if acc.is_main_process:
            flips = pre.flip_probability > 0
            cache.commit_shares(key, plan, world=acc.num_processes, flips=flips)

    encoded = _all_succeed(acc, encode, "encoding its share of the latent cache")

    _all_succeed(acc, commit, "committing the latent cache")
    # read back through local copies, as a later run would: the built tensors are gone
    with acc.local_main_process_first():
        samples = cache.lookup(key, local_dir=local_dir)
    if samples is None:
        raise CacheError(
            f"latent cache {cache.prefix(key)} was committed but does not read back complete; "
            "check the store (another job may be deleting it)"
        )
    return CachedDataset(samples, key, hit=False, encoded=encoded)


@dataclass(frozen=True)
class _ShareInputs:
    pairs: list[CleanPair]
    sizes: list[Size]
    components: Components
    transform: ImageTransform
    data_store: Store


def _encode_share(
    acc: Any,
    spec: DiffusionTrainingJobSpec,
    cache: LatentCache,
    key: str,
    plan: list[PlannedShard],
    inputs: _ShareInputs,
) -> int:
    """This process's samples: its sources' images and their Boomerang variants, uploaded."""
    from difftrain.data.boomerang import boomerang_variants
    from difftrain.data.cache_plan import source_share
    from difftrain.data.image_bytes import with_image_bytes
    from difftrain.models.placement import frozen_dtype

    pre, hp = spec.preprocessing, spec.hyperparameters
    rank = acc.process_index
    copies = pre.boomerang.copies if pre.boomerang.enabled else 0
    share = source_share(len(inputs.pairs), rank, acc.num_processes)
    todo = with_image_bytes(inputs.pairs[share.start : share.stop], inputs.data_store)
    todo_sizes = inputs.sizes[share.start : share.stop]
    components, transform = inputs.components, inputs.transform
    if copies:
        todo += boomerang_variants(
            todo,
            components,
            transform,
            strength=pre.boomerang.strength,
            copies=copies,
            seed=hp.seed,
            device=acc.device,
            dtype=frozen_dtype(acc.device, hp.mixed_precision),
            sizes=todo_sizes,
        )
        todo_sizes = todo_sizes + [s for s in todo_sizes for _ in range(copies)]
    count = cache.build_share(
        key,
        todo,
        components,
        transform,
        plan=plan,
        rank=rank,
        sizes=todo_sizes if pre.buckets.enabled else None,
        seed=hp.seed,
        device=acc.device,
        dtype=torch.float32 if acc.device.type == "cpu" else torch.float16,
    )
    logger.info("latent cache: rank %d encoded %d samples of %d sources", rank, count, len(share))
    return int(count)


def _everyone(acc: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on every process (a collective: every process must call it)."""
    if acc.num_processes == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=acc.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _all_succeed(acc: Any, work: Callable[[], T], what: str) -> T:
    """``work()`` on every process, then a barrier that also tells every process whether all
    succeeded: a failure anywhere raises everywhere (the failing process raises its own error)."""
    from difftrain.data.cache import CacheError

    result: T | None = None
    error: Exception | None = None
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
        error = exc
    if not _everyone(acc, error is None):
        if error is not None:
            raise error
        raise CacheError(f"another process failed {what}; its log says why")
    return result  # type: ignore[return-value]


def clean_on_main(acc: Any, clean: Callable[[], CleaningResult]) -> CleaningResult:
    """Clean on the main process only; the others get the result without the image bytes.

    Sent as JSON over the process group (no pickle). An error on the main process reaches the
    others as a TrainingConfigError with its message, so no process waits forever.
    """
    import torch.distributed as dist

    from difftrain.data.cleaning import CleaningResult
    from difftrain.data.pairs import CleanPair

    payload = b""
    result: CleaningResult | None = None
    error: Exception | None = None
    if acc.is_main_process:
        try:
            result = clean()
            doc: dict[str, Any] = {
                "report": result.report.to_wire(),
                "examples": result.examples,
                "tokensCounted": result.tokens_counted,
                "pairs": [
                    [p.key, p.name, p.caption, p.width, p.height, p.sha256] for p in result.pairs
                ],
            }
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
            error = exc
            doc = {"error": f"{type(exc).__name__}: {exc}"}
        payload = json.dumps(doc).encode()
    size = torch.tensor([len(payload)], dtype=torch.int64, device=acc.device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=acc.device)
    if acc.is_main_process:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    if error is not None:
        raise error
    if result is not None:
        return result
    doc = json.loads(buffer.cpu().numpy().tobytes())
    if "error" in doc:
        raise TrainingConfigError(f"the main process could not read the dataset: {doc['error']}")
    pairs = [CleanPair(k, n, b"", c, w, h, sha) for k, n, c, w, h, sha in doc["pairs"]]
    logger.info(
        "dataset: %d kept pairs from the main process's cleaning (rank %d read no image)",
        len(pairs),
        acc.process_index,
    )
    return CleaningResult(
        pairs=pairs,
        report=DatasetReport.model_validate(doc["report"]),
        examples=doc["examples"],
        tokens_counted=doc["tokensCounted"],
    )
