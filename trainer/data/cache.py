"""Latent and text-embedding cache, per sample: encode each image and caption once, reuse them in
later runs and other jobs, and encode only what is new.

Layout on the store (``root`` is e.g. ``s3://bucket/dataset/.difftrain-cache``)::

    root/shards/<build>-r<rank>-<n>.safetensors  tensors by content address (:mod:`cache_keys`):
                                                 "latent/<a>", "flipped/<a>", "sizes/<a>",
                                                 "text/<t>" (SDXL: and "pooled/<t>")
    root/index/<generation>.json                 written last: every shard (size, sha256) and
                                                 which shard holds each address
    root/_parts/<build>/rank-00000.json          while the processes of a job build together:
                                                 each one's shards, merged into the next index
    root/facts/<generation>.json                 cleaning facts per object version
                                                 (:mod:`difftrain.data.facts`)

A run reads the newest index (one listing, one read), finds the addresses of its samples there,
copies the shards that hold them, and encodes only the samples and captions it did not find: their
shards go up first, then a new index (the previous one's entries and the new ones) last, so an
index never names a shard that is not complete on the store. A shard that does not match its
sha256 is not trusted: its samples are encoded again. Several processes build together
(:meth:`LatentCache.build_share` on each, then :meth:`LatentCache.commit_shares` on the main one):
each encodes its share of the missing samples and uploads its shards, and the index still comes
last. Two jobs committing at once each write a complete index; the newest wins and the other's
new samples are encoded again by a later run, never read wrongly. Caches of the earlier format
(``root/<key>/_manifest.json``) are not read: they are simply not found, and can be deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difftrain.data.cache_encode import (
    encode_captions,
    encode_images,
    encode_latent_params,
    encode_text,
    sample_rng,
)
from difftrain.data.cache_keys import (
    CACHE_FORMAT,
    CacheError,
    CacheSpace,
    Wanted,
    cache_space,
    wanted_samples,
)
from difftrain.data.cache_plan import CHUNK_SOURCES, SHARD_SIZE
from difftrain.data.cache_samples import (
    FLIPPED,
    LATENT,
    POOLED,
    SIZES,
    TEXT,
    CachedSample,
    Shard,
    ShardFile,
    ShardInMemory,
    shard_names,
    tensor_name,
    write_shard,
)
from difftrain.data.facts import generation_name, newest_generation, prune_generations
from difftrain.data.image_bytes import iter_image_bytes
from difftrain.storage import StorageError, Store, join, scratch_dir

if TYPE_CHECKING:
    from difftrain.data.pairs import CleanPair
    from difftrain.data.transforms import ImageTransform
    from difftrain.models.components import Components

logger = logging.getLogger(__name__)

CACHE_FOLDER = (
    ".difftrain-cache"  # the default root: beside the dataset, "<dataset.uri>/.difftrain-cache"
)
INDEX_FOLDER = "index"
SHARDS_FOLDER = "shards"
PARTS_FOLDER = "_parts"

Size = tuple[int, int]  # (width, height)
# Makes the Boomerang variants of source pairs (with their bytes), copies in order per source.
VariantMaker = Callable[[list["CleanPair"], list[Size] | None], list["CleanPair"]]

__all__ = [
    "CACHE_FOLDER",
    "CacheError",
    "CacheIndex",
    "CacheSpace",
    "CachedSample",
    "LatentCache",
    "Lookup",
    "Wanted",
    "cache_space",
    "encode_latent_params",
    "encode_text",
    "sample_rng",
    "wanted_samples",
]


@dataclass
class CacheIndex:
    """One committed generation of the index: the shards and which addresses each holds."""

    name: str = ""  # the generation's file name; "" when the cache has none yet
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> size, sha256, rank
    latents: dict[str, str] = field(default_factory=dict)  # latent address -> shard
    texts: dict[str, str] = field(default_factory=dict)  # text address -> shard

    def merged(self, part: dict[str, Any]) -> CacheIndex:
        return CacheIndex(
            self.name,
            {**self.shards, **part["shards"]},
            {**self.latents, **part["latents"]},
            {**self.texts, **part["texts"]},
        )

    def to_doc(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "shards": self.shards,
            "latents": self.latents,
            "texts": self.texts,
        }


@dataclass
class Lookup:
    """What a run found of its samples: each one (None where something is missing), and what
    has to be encoded: the samples without latents and the captions without text embeddings."""

    samples: list[CachedSample | None]
    latents: list[int]  # indices of wanted samples whose latents are missing
    texts: list[tuple[str, str]]  # (address, caption) of missing text embeddings, each once

    @property
    def complete(self) -> bool:
        return not self.latents and not self.texts


class LatentCache:
    """The per-sample latent/text-embedding cache under ``root`` on a store."""

    def __init__(self, store: Store, root: str) -> None:
        self.store = store
        self.root = root

    # --- reading --------------------------------------------------------------------------------

    def index(self, name: str | None = None) -> CacheIndex:
        """The newest committed index (or the one named ``name``); empty when there is none."""
        folder = join(self.root, INDEX_FOLDER)
        uri = join(folder, name) if name else newest_generation(self.store, folder)
        if uri is None:
            return CacheIndex()
        doc = json.loads(self.store.get_bytes(uri))
        if doc.get("format") != CACHE_FORMAT:
            logger.warning("ignoring a cache index of another format", extra={"uri": uri})
            return CacheIndex()
        return CacheIndex(uri.rsplit("/", 1)[-1], doc["shards"], doc["latents"], doc["texts"])

    def lookup(
        self,
        wanted: Sequence[Wanted],
        index: CacheIndex | None = None,
        *,
        flips: bool,
        local_dir: Path | None = None,
        added: bool = False,
    ) -> Lookup:
        """The wanted samples found in ``index`` (the newest when not given).

        With ``local_dir`` the shards they need are copied there (once: a verified copy is
        reused) and the samples read their tensors from those files on each access, so the cache
        does not have to fit in memory; without it the shards are loaded into memory. A shard
        that is missing or does not match its sha256 counts as absent. ``added``: a sample also
        needs its pooled text embedding and time ids (SDXL; :attr:`CacheSpace.added`).
        """
        index = self.index() if index is None else index
        needed = {index.latents[w.latent] for w in wanted if w.latent in index.latents}
        needed |= {index.texts[w.text] for w in wanted if w.text and w.text in index.texts}
        opened = {name: self._open(name, index.shards.get(name), local_dir) for name in needed}
        samples: list[CachedSample | None] = []
        missing_latents: list[int] = []
        missing_texts: dict[str, str] = {}
        for i, w in enumerate(wanted):
            latent = _ref(opened, index.latents, w.latent, LATENT)
            flipped = _ref(opened, index.latents, w.latent, FLIPPED) if flips else None
            text = _ref(opened, index.texts, w.text, TEXT) if w.text else None
            pooled = _ref(opened, index.texts, w.text, POOLED) if w.text and added else None
            sizes = _ref(opened, index.latents, w.latent, SIZES) if added else None
            has_latent = (
                latent is not None
                and (flipped is not None or not flips)
                and (sizes is not None or not added)
            )
            has_text = text is not None and (pooled is not None or not added)
            if not has_latent:
                missing_latents.append(i)
            if w.text and not has_text:
                missing_texts.setdefault(w.text, w.caption)
            ok = has_latent and (has_text or not w.text)
            samples.append(
                CachedSample(w.key, w.caption, latent, flipped, text, pooled, sizes) if ok else None
            )
        return Lookup(samples, missing_latents, list(missing_texts.items()))

    def _open(
        self, name: str, entry: dict[str, Any] | None, local_dir: Path | None
    ) -> Shard | None:
        if entry is None:
            return None
        if local_dir is None:
            data = self._verified(name, entry)
            return ShardInMemory(data) if data is not None else None
        path = self._local_copy(name, entry, local_dir)
        return ShardFile(path, shard_names(path)) if path is not None else None

    def _verified(self, name: str, entry: dict[str, Any]) -> bytes | None:
        """One shard's bytes from the store, or None when absent or not matching the index."""
        try:
            data = self.store.read_range(self._shard_uri(name), 0, int(entry["size"]))
        except StorageError as exc:
            logger.warning(
                "cache shard unreadable; its samples are encoded again",
                extra={"shard": name, "err": str(exc)},
            )
            return None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            logger.warning(
                "cache shard does not match its index; its samples are encoded again",
                extra={"shard": name},
            )
            return None
        return data

    def _local_copy(self, name: str, entry: dict[str, Any], folder: Path) -> Path | None:
        """A verified local copy of one shard (None if the store's copy is damaged).

        A ``.sha256`` file beside the copy, written after it, says it was verified; processes
        that copy the same shard at once each write a whole file and rename it into place.
        """
        path = folder / name
        stamp = path.with_name(path.name + ".sha256")
        if path.exists() and stamp.exists() and stamp.read_text() == entry["sha256"]:
            return path
        data = self._verified(name, entry)
        if data is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        unique = f"{os.getpid()}-{threading.get_ident()}"
        for target, content in ((path, data), (stamp, entry["sha256"].encode())):
            partial = target.with_name(f".{target.name}.{unique}.partial")
            partial.write_bytes(content)
            os.replace(partial, target)
        return path

    def _shard_uri(self, name: str) -> str:
        return join(self.root, SHARDS_FOLDER, name)

    # --- writing --------------------------------------------------------------------------------

    def build_share(
        self,
        build: str,
        pairs: Sequence[CleanPair],
        wanted: Sequence[Wanted],
        found: Lookup,
        components: Components,
        transform: ImageTransform,
        *,
        rank: int = 0,
        world: int = 1,
        read: Store | None = None,
        variants: VariantMaker | None = None,
        sizes: Sequence[Size] | None = None,
        batch_size: int = 16,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float16,
        progress: Callable[[int], object] | None = None,
        workers: int = 4,
    ) -> int:
        """Encode this process's share of what ``found`` misses and upload its shards, without
        an index: a record of them follows, which :meth:`commit_shares` reads.

        Process ``rank`` of ``world`` takes a contiguous run of the sources with missing latents
        (each with its missing variants) and of the missing captions. Images are read from
        ``read`` (the dataset's store) a chunk of sources at a time and let go once encoded;
        ``variants`` makes Boomerang variants; ``sizes`` are the pairs' bucket sizes. Returns
        the number of samples whose latents were encoded.
        """
        from difftrain.data.cache_plan import source_share

        if sizes is not None and len(sizes) != len(pairs):
            raise CacheError(
                f"sizes has {len(sizes)} entries for {len(pairs)} pairs: give one each"
            )
        by_source: dict[int, list[Wanted]] = {}
        for i in found.latents:
            by_source.setdefault(wanted[i].source, []).append(wanted[i])
        sources = sorted(by_source)
        mine = [sources[k] for k in source_share(len(sources), rank, world)]
        texts = [found.texts[k] for k in source_share(len(found.texts), rank, world)]
        writer = _ShardWriter(self, build, rank)
        encoded = 0
        try:
            for start in range(0, len(mine), CHUNK_SOURCES):
                chunk = mine[start : start + CHUNK_SOURCES]
                encoded += self._encode_chunk(
                    chunk, by_source, pairs, writer, components, transform,
                    read=read, variants=variants, sizes=sizes, batch_size=batch_size,
                    seed=seed, device=device, dtype=dtype, progress=progress, workers=workers,
                )  # fmt: skip
            if texts:
                hidden = encode_captions(
                    [c for _, c in texts], components, batch_size=batch_size, device=device,
                    dtype=dtype,
                )  # fmt: skip
                for (address, _), encoded_text in zip(texts, hidden, strict=True):
                    extras = (
                        {POOLED: encoded_text.pooled} if encoded_text.pooled is not None else {}
                    )
                    writer.add(TEXT, address, encoded_text.hidden, extras=extras)
            writer.finish()
        finally:
            writer.close()
        record = {"build": build, "rank": rank, "samples": encoded, "texts": len(texts),
                  **writer.part()}  # fmt: skip
        self.store.put_bytes(json.dumps(record).encode(), self._part_uri(build, rank))
        logger.info(
            "latent cache share uploaded rank=%d samples=%d texts=%d shards=%d",
            rank, encoded, len(texts), len(writer.shards),
            extra={"root": self.root},
        )  # fmt: skip
        return encoded

    def _encode_chunk(
        self,
        chunk: list[int],
        by_source: dict[int, list[Wanted]],
        pairs: Sequence[CleanPair],
        writer: _ShardWriter,
        components: Components,
        transform: ImageTransform,
        *,
        read: Store | None,
        variants: VariantMaker | None,
        sizes: Sequence[Size] | None,
        **kw: Any,
    ) -> int:
        """Read one chunk of sources, make their variants, encode what is missing; the images
        are let go when this returns."""
        if read is None and any(not pairs[s].data for s in chunk):
            raise CacheError("the pairs hold no image bytes and no store to read them was given")
        held = (
            list(iter_image_bytes((pairs[s] for s in chunk), read))
            if read
            else [pairs[s] for s in chunk]
        )
        with_bytes = dict(zip(chunk, held, strict=True))
        made: dict[tuple[int, int], CleanPair] = {}
        need_variants = [s for s in chunk if any(w.copy is not None for w in by_source[s])]
        if need_variants:
            if variants is None:
                raise CacheError(
                    "Boomerang variants are missing from the cache, but none can be made"
                )
            sources = [with_bytes[s] for s in need_variants]
            source_sizes = [sizes[s] for s in need_variants] if sizes is not None else None
            copies = 1 + max(w.copy or 0 for s in need_variants for w in by_source[s])
            out = variants(sources, source_sizes)
            per = len(out) // len(sources)
            if per < copies:
                raise CacheError(f"{len(out)} Boomerang variants made for {len(sources)} images")
            for n, s in enumerate(need_variants):
                for c in range(per):
                    made[s, c] = out[n * per + c]
        todo = [w for s in chunk for w in by_source[s]]
        images = [with_bytes[w.source] if w.copy is None else made[w.source, w.copy] for w in todo]
        todo_sizes = [sizes[w.source] for w in todo] if sizes is not None else None
        encoded = encode_images(images, components, transform, sizes=todo_sizes, **kw)
        for w, image in zip(todo, encoded, strict=True):
            writer.add(LATENT, w.latent, image.latent, image.flipped, extras={SIZES: image.sizes})
        return len(todo)

    def commit_shares(self, build: str, *, world: int) -> CacheIndex:
        """Write the next index: the newest one's entries and those of the ``world`` processes
        that built with :meth:`build_share` under ``build``.

        Called by one process once every process's share is uploaded (after a barrier). A share
        that is missing is an error, and no index is written.
        """
        parts = []
        for rank in range(world):
            uri = self._part_uri(build, rank)
            if not self.store.exists(uri):
                raise CacheError(f"rank {rank} uploaded no share of latent cache build {build}")
            record = json.loads(self.store.get_bytes(uri))
            if record.get("build") != build:
                raise CacheError(f"{uri} belongs to build {record.get('build')}, not {build}")
            parts.append(record)
        index = self.index()
        for part in parts:
            index = index.merged(part)
        name = generation_name()
        folder = join(self.root, INDEX_FOLDER)
        self.store.put_bytes(json.dumps(index.to_doc()).encode(), join(folder, name))
        prune_generations(self.store, folder)
        for rank in range(world):
            self.store.delete(self._part_uri(build, rank))
        logger.info(
            "latent cache committed",
            extra={
                "root": self.root,
                "index": name,
                "samples": sum(int(p["samples"]) for p in parts),
                "processes": world,
            },
        )
        index.name = name
        return index

    def _part_uri(self, build: str, rank: int) -> str:
        return join(self.root, PARTS_FOLDER, build, f"rank-{rank:05d}.json")

    # --- one process ----------------------------------------------------------------------------

    def get_or_build(
        self,
        pairs: Sequence[CleanPair],
        components: Components,
        transform: ImageTransform,
        *,
        space: CacheSpace,
        texts: bool = True,
        local_dir: Path | None = None,
        **kw: Any,
    ) -> tuple[list[CachedSample], int]:
        """(samples, number encoded): the pairs' samples, encoding only those not found.

        ``kw`` are :meth:`build_share`'s options (``read``, ``variants``, ``sizes`` ...).
        """
        wanted = wanted_samples(pairs, space, texts=texts)
        found = self.lookup(wanted, flips=space.flips, local_dir=local_dir, added=space.added)
        if found.complete:
            logger.info("latent cache hit", extra={"root": self.root, "samples": len(wanted)})
            return [s for s in found.samples if s is not None], 0
        build = new_build_id()
        encoded = self.build_share(build, pairs, wanted, found, components, transform, **kw)
        index = self.commit_shares(build, world=1)
        again = self.lookup(
            wanted, index, flips=space.flips, local_dir=local_dir, added=space.added
        )
        if not again.complete:
            raise CacheError(
                f"latent cache {self.root} was committed but does not read back complete; "
                "check the store (another job may be deleting it)"
            )
        return [s for s in again.samples if s is not None], encoded


def new_build_id() -> str:
    return uuid.uuid4().hex[:12]


def _ref(
    opened: dict[str, Shard | None], where: dict[str, str], address: str | None, kind: str
) -> tuple[Shard, str] | None:
    if address is None or address not in where:
        return None
    shard = opened.get(where[address])
    name = tensor_name(kind, address)
    return (shard, name) if shard is not None and name in shard.names else None


class _ShardWriter:
    """Collects one process's new tensors into shards of :data:`SHARD_SIZE` samples, each
    uploaded as soon as it is full (so a build holds one shard's tensors at a time)."""

    def __init__(self, cache: LatentCache, build: str, rank: int) -> None:
        self.cache = cache
        self.build = build
        self.rank = rank
        self.work = scratch_dir("difftrain-cache-")
        self.tensors: dict[str, torch.Tensor] = {}
        self.pending: list[tuple[str, str]] = []  # (kind, address) in the open shard
        self.shards: dict[str, dict[str, Any]] = {}
        self.latents: dict[str, str] = {}
        self.texts: dict[str, str] = {}

    def add(
        self,
        kind: str,
        address: str,
        tensor: torch.Tensor,
        flipped: torch.Tensor | None = None,
        *,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """One latent (with its mirror's) or text, and what is kept beside it (``extras`` by
        kind: the time ids of a latent, the pooled embedding of a text)."""
        self.tensors[tensor_name(kind, address)] = tensor
        if flipped is not None:
            self.tensors[tensor_name(FLIPPED, address)] = flipped
        for extra, value in (extras or {}).items():
            self.tensors[tensor_name(extra, address)] = value
        self.pending.append((kind, address))
        if len(self.pending) >= SHARD_SIZE:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.build}-r{self.rank:05d}-{len(self.shards):05d}.safetensors"
        path = self.work / name
        write_shard(self.tensors, path, rank=self.rank)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.cache.store.put_file(path, self.cache._shard_uri(name))
        self.shards[name] = {"size": path.stat().st_size, "sha256": digest, "rank": self.rank}
        for kind, address in self.pending:
            (self.latents if kind == LATENT else self.texts)[address] = name
        path.unlink()
        self.tensors, self.pending = {}, []

    def finish(self) -> None:
        self.flush()

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def part(self) -> dict[str, Any]:
        return {"shards": self.shards, "latents": self.latents, "texts": self.texts}
