"""Data preparation shared by the processes of a job, and by ``difftrain dataset cache``.

:func:`clean_dataset` lists and cleans a dataset, judging objects seen in an earlier run by the
cleaning facts kept beside the latent cache (:mod:`difftrain.data.facts`) instead of downloading
them. With several processes and the latent cache on, the main process cleans and sends the
others the kept pairs (:func:`clean_on_main`; pairs never hold image bytes). :func:`cached_dataset`
then finds each sample in the per-sample cache (:mod:`difftrain.data.cache`): the main process
looks up which are missing and tells the others; every process encodes its share of the missing
ones (their images read from the dataset a chunk at a time, their Boomerang variants made there),
on its own accelerator; once all have uploaded their shards the main process commits the next
index, and every process reads the samples back from verified local copies. A process that fails
tells the others, so none waits forever at a barrier; nothing half-built is ever indexed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from difftrain.api import DatasetReport
from difftrain.storage import StorageError, Store
from difftrain.train.methods import TrainingConfigError

if TYPE_CHECKING:
    from difftrain.api import DatasetSpec, PreprocessingSpec
    from difftrain.data.cache import CachedSample
    from difftrain.data.cleaning import CleaningResult
    from difftrain.data.pairs import CleanPair
    from difftrain.data.transforms import ImageTransform
    from difftrain.models.components import Components

logger = logging.getLogger(__name__)

T = TypeVar("T")
Size = tuple[int, int]


class SingleProcess:
    """The parts of an Accelerator that data preparation uses, for one process on ``device``
    (``difftrain dataset cache``)."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    is_local_main_process = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @contextlib.contextmanager
    def local_main_process_first(self) -> Iterator[None]:
        yield


def clean_dataset(
    spec: DatasetSpec,
    store: Store,
    *,
    facts_root: str | None = None,
    facts_store: Store | None = None,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
    progress: Callable[[int], object] | None = None,
    workers: int = 2,
) -> CleaningResult:
    """List and clean ``spec``'s dataset; with ``facts_root`` (the latent cache's root) an object
    whose version was seen before is judged by its kept facts, not downloaded, and what is
    learnt from the others is kept there for the next run."""
    from difftrain.data.cleaning import load_dataset
    from difftrain.data.facts import CleaningFacts

    facts = None
    where = facts_store or store
    if facts_root is not None:
        need_phash = spec.cleaning.near_duplicate_distance > 0
        facts = CleaningFacts.load(where, facts_root, need_phash=need_phash)
    result = load_dataset(
        spec,
        store,
        count_tokens=count_tokens,
        max_tokens=max_tokens,
        progress=progress,
        workers=workers,
        facts=facts,
    )
    if facts is not None and facts_root is not None:
        logger.info(
            "dataset: %d objects judged by their kept facts (not read), %d facts learnt",
            facts.reused,
            facts.added,
        )
        try:
            facts.save(where, facts_root)
        except StorageError as exc:  # the next run reads those objects again; this one goes on
            logger.warning("cleaning facts not saved: %s", exc)
    return result


@dataclass(frozen=True)
class CacheSettings:
    """How a run's samples are cached: what changes the tensors, and how they are encoded."""

    pre: PreprocessingSpec
    seed: int
    root: str  # the cache's root (<dataset.uri>/.difftrain-cache unless told otherwise)
    dtype: torch.dtype  # the cached tensors'
    generation_dtype: torch.dtype  # the networks' while they make Boomerang variants
    batch_size: int = 16
    texts: bool = True  # cache text embeddings too
    extra: dict[str, str] | None = None
    progress: Callable[[int], object] | None = None  # called with the samples each batch encoded


@dataclass
class CachedDataset:
    """The run's cached samples (every process's, in sample order) and how they were found."""

    samples: list[CachedSample]
    key: str  # the index generation they were read from
    hit: bool  # nothing had to be encoded, by any process
    encoded: int  # samples this process encoded (0 on a hit)
    size_bytes: int = 0  # of the shards the samples are read from


def cached_dataset(
    acc: Any,
    settings: CacheSettings,
    pairs: list[CleanPair],
    sizes: list[Size],
    components: Components,
    transform: ImageTransform,
    data_store: Store,
    local_dir: Path,
    cache_store: Store | None = None,
) -> CachedDataset:
    """The pairs' samples from the per-sample cache, the missing ones encoded by all processes.

    ``pairs`` hold no image bytes: each process reads those of its share of the missing samples
    from ``data_store``. The samples read their tensors from verified copies under ``local_dir``.
    """
    from difftrain.data.cache import CacheError, LatentCache, Lookup, new_build_id
    from difftrain.data.cache_keys import cache_space, wanted_samples

    pre = settings.pre
    from difftrain.models.families import family

    space = cache_space(
        pre,
        components.identity,
        seed=settings.seed,
        extra=settings.extra,
        added=family(components.family).size_conditioning,
    )
    wanted = wanted_samples(pairs, space, texts=settings.texts)
    cache = LatentCache(cache_store or data_store, settings.root)

    def look_up() -> dict[str, Any]:
        index = cache.index()
        found = cache.lookup(
            wanted, index, flips=space.flips, local_dir=local_dir, added=space.added
        )
        return {
            "index": index.name,
            "build": new_build_id(),
            "latents": found.latents,
            "texts": found.texts,
        }

    # the main process looks up (and copies what it finds); the others follow its answer
    decided = _main_decides(acc, look_up, "looking up the latent cache")
    found = Lookup([], decided["latents"], [(a, c) for a, c in decided["texts"]])
    encoded = 0
    name = decided["index"]
    if not found.complete:
        logger.info(
            "latent cache: %d of %d samples and %d captions to encode",
            len(found.latents),
            len(wanted),
            len(found.texts),
        )

        def encode() -> int:
            return _encode_share(acc, settings, cache, decided["build"], pairs, sizes, wanted,
                                 found, components, transform, data_store)  # fmt: skip

        encoded = _all_succeed(acc, encode, "encoding its share of the latent cache")

        def commit() -> dict[str, Any]:
            index = cache.commit_shares(decided["build"], world=acc.num_processes)
            return {"index": index.name}

        name = _main_decides(acc, commit, "committing the latent cache")["index"]
    # read back through local copies, as a later run would: the built tensors are gone
    with acc.local_main_process_first():
        index = cache.index(name or None)
        again = cache.lookup(
            wanted, index, flips=space.flips, local_dir=local_dir, added=space.added
        )
    if not again.complete:
        raise CacheError(
            f"latent cache {settings.root} was committed but does not read back complete; "
            "check the store (another job may be deleting it)"
        )
    samples = [s for s in again.samples if s is not None]
    used = {index.latents[w.latent] for w in wanted}
    used |= {index.texts[w.text] for w in wanted if w.text}
    size = sum(int(index.shards[n]["size"]) for n in used)
    return CachedDataset(samples, index.name, found.complete, encoded, size)


def _encode_share(
    acc: Any,
    settings: CacheSettings,
    cache: Any,
    build: str,
    pairs: list[CleanPair],
    sizes: list[Size],
    wanted: list[Any],
    found: Any,
    components: Components,
    transform: ImageTransform,
    data_store: Store,
) -> int:
    """This process's share of the missing samples: images, Boomerang variants, captions."""
    from difftrain.data.boomerang import boomerang_variants

    pre = settings.pre
    rank = acc.process_index
    by_key = {p.key: s for p, s in zip(pairs, sizes, strict=True)}

    def variants(sources: list[CleanPair], _sizes: list[Size] | None) -> list[CleanPair]:
        return boomerang_variants(
            sources,
            components,
            transform,
            strength=pre.boomerang.strength,
            copies=pre.boomerang.copies,
            seed=settings.seed,
            device=acc.device,
            dtype=settings.generation_dtype,
            sizes=[by_key[p.key] for p in sources],
        )

    count = cache.build_share(
        build,
        pairs,
        wanted,
        found,
        components,
        transform,
        rank=rank,
        world=acc.num_processes,
        read=data_store,
        variants=variants if pre.boomerang.enabled else None,
        sizes=sizes if pre.buckets.enabled else None,
        batch_size=settings.batch_size,
        seed=settings.seed,
        device=acc.device,
        dtype=settings.dtype,
        progress=settings.progress,
    )
    logger.info("latent cache: rank %d encoded %d samples", rank, count)
    return int(count)


def _broadcast_bytes(acc: Any, payload: bytes) -> bytes:
    """The main process's ``payload`` on every process (its length first, then the bytes)."""
    import torch.distributed as dist

    size = torch.tensor([len(payload)], dtype=torch.int64, device=acc.device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=acc.device)
    if acc.is_main_process:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().numpy().tobytes())


def _main_decides(acc: Any, decide: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
    """``decide()`` on the main process, its JSON answer handed to every process (no pickle).
    An error there raises on every process (there with its own error)."""
    if acc.num_processes == 1:
        return decide()

    payload = b""
    error: Exception | None = None
    if acc.is_main_process:
        try:
            payload = json.dumps(decide()).encode()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
            error = exc
            payload = json.dumps({"__error__": f"{type(exc).__name__}: {exc}"}).encode()
    received = _broadcast_bytes(acc, payload)
    if error is not None:
        raise error
    doc: dict[str, Any] = json.loads(received)
    if "__error__" in doc:
        from difftrain.data.cache import CacheError

        raise CacheError(f"the main process failed {what}: {doc['__error__']}")
    return doc


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
                    [p.key, p.name, list(p.captions), p.width, p.height, p.sha256, p.span]
                    for p in result.pairs
                ],
            }
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
            error = exc
            doc = {"error": f"{type(exc).__name__}: {exc}"}
        payload = json.dumps(doc).encode()
    received = _broadcast_bytes(acc, payload)
    if error is not None:
        raise error
    if result is not None:
        return result
    doc = json.loads(received)
    if "error" in doc:
        raise TrainingConfigError(f"the main process could not read the dataset: {doc['error']}")
    pairs = [
        CleanPair(
            key=k,
            name=n,
            caption=c[0],
            width=w,
            height=h,
            sha256=sha,
            span=tuple(span) if span else None,
            other_captions=tuple(c[1:]),
        )
        for k, n, c, w, h, sha, span in doc["pairs"]
    ]
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
