"""Latent and text-embedding cache: encode a dataset once, reuse it in later runs and other jobs.

Layout on the store (``root`` is e.g. ``s3://bucket/dataset/.difftrain-cache``)::

    root/<key>/shard-00000.safetensors  samples 0..255: tensors "<i>.latent", "<i>.text" and,
    root/<key>/shard-00001.safetensors  when flips are cached, "<i>.latent_flipped"; the shard's
    ...                                 metadata holds the samples' keys and captions as JSON
    root/<key>/_manifest.json           written last (difftrain.storage.commit): the shards with
                                        sizes and sha256s, the sample count and the format
    root/<key>/_parts/rank-00000.json   when the processes of a job build it together, each one's
                                        shards, from which the main process writes the manifest

Several processes build one cache together (:meth:`LatentCache.build_share`, then
:meth:`LatentCache.commit_shares` on the main process once all are done): each encodes its share of
the samples (:mod:`difftrain.data.cache_plan`) and uploads its shards, and the manifest still comes
last, so a cache is complete or absent. The layout is the single-process one (shards in sample
order), so it reads the same whoever built it.

The key (:func:`cache_key`) covers everything that changes the tensors, so a cache is never
updated in place: a changed dataset, setting or model gives a new key and a new folder. A folder
without a manifest (a build that crashed) or whose shards do not match the manifest is ignored and
rebuilt.

What is cached: the VAE's latent distribution parameters (mean and log-variance, unscaled) rather
than one sample, so training still draws a fresh latent per step as the uncached loop does; and the
text encoder's last hidden state. Random crops and rotations are frozen at cache time (one draw
per image, seeded); horizontal flips are not: when ``flip_probability > 0`` the flipped image is
encoded too, and the training loop picks one of the two per step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from difftrain.data.cache_plan import SHARD_SIZE, PlannedShard
from difftrain.data.parallel import ordered_map
from difftrain.storage import MANIFEST_NAME, Store, commit, join, read_manifest, scratch_dir

if TYPE_CHECKING:
    from difftrain.api import PreprocessingSpec
    from difftrain.data.pairs import CleanPair
    from difftrain.data.transforms import ImageTransform
    from difftrain.models.components import Components

logger = logging.getLogger(__name__)

CACHE_FORMAT = "difftrain-latent-cache/1"
CACHE_FOLDER = (
    ".difftrain-cache"  # the default root: beside the dataset, "<dataset.uri>/.difftrain-cache"
)
PARTS_FOLDER = "_parts"

Size = tuple[int, int]  # (width, height)


class ShardFile:
    """A cache shard on local disk whose tensors are read on demand (safetensors memory-maps it).

    The pages are the operating system's page cache, shared by every process on the machine,
    instead of a copy of the whole cache in each process's memory.
    """

    def __init__(self, path: Path, names: set[str]) -> None:
        self.path = path
        self.names = names
        self._lock = threading.Lock()  # one handle, shared by the loop and a prefetch thread
        self._handle: Any = None

    def get(self, name: str) -> torch.Tensor:
        with self._lock:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            tensor: torch.Tensor = self._handle.get_tensor(name)
            return tensor


class CachedSample:
    """One training example, encoded: its tensors in memory, or in a local shard file (read on
    each access, never kept)."""

    __slots__ = ("_flipped", "_index", "_latent", "_shard", "_text", "caption", "key")

    def __init__(
        self,
        key: str,
        caption: str,
        latent_params: torch.Tensor | None = None,
        latent_params_flipped: torch.Tensor | None = None,
        text_embeddings: torch.Tensor | None = None,
        *,
        shard: ShardFile | None = None,
        index: int = 0,
    ) -> None:
        if shard is None and (latent_params is None or text_embeddings is None):
            raise ValueError("a cached sample needs its tensors or a shard to read them from")
        self.key = key
        self.caption = caption
        self._latent = latent_params
        self._flipped = latent_params_flipped
        self._text = text_embeddings
        self._shard = shard
        self._index = index

    def _tensor(self, suffix: str, held: torch.Tensor | None) -> torch.Tensor | None:
        if self._shard is None:
            return held
        name = f"{self._index}.{suffix}"
        return self._shard.get(name) if name in self._shard.names else None

    @property
    def latent_params(self) -> torch.Tensor:
        """(2C, h, w): the VAE's mean and log-variance, unscaled."""
        tensor = self._tensor("latent", self._latent)
        assert tensor is not None
        return tensor

    @property
    def latent_params_flipped(self) -> torch.Tensor | None:
        """The mirrored image's, when flips are cached."""
        return self._tensor("latent_flipped", self._flipped)

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(tokens, D): the text encoder's last hidden state."""
        tensor = self._tensor("text", self._text)
        assert tensor is not None
        return tensor


def cache_key(
    pairs: Sequence[CleanPair],
    pre: PreprocessingSpec,
    model_identity: str,
    *,
    seed: int = 0,
    extra: dict[str, str] | None = None,
) -> str:
    """sha256 over the dataset manifest, the tensor-changing settings and the model identity.

    ``seed`` (the one ``build`` gets) counts where it changes the tensors: random crops,
    rotations and Boomerang variants; a cache made with another seed is another cache.
    """
    seeded = pre.crop == "random" or pre.max_rotation_degrees > 0 or pre.boomerang.enabled
    settings = {
        "resolution": pre.resolution,
        "crop": pre.crop,
        "max_rotation_degrees": pre.max_rotation_degrees,
        "buckets": pre.buckets.model_dump(mode="json") if pre.buckets.enabled else None,
        # Only whether flipped copies exist matters, not how often they are used.
        "flipped": pre.flip_probability > 0,
        "boomerang": pre.boomerang.model_dump(mode="json") if pre.boomerang.enabled else None,
    }
    if seeded:
        settings["seed"] = seed
    digest = hashlib.sha256()
    head = {
        "format": CACHE_FORMAT,
        "settings": settings,
        "model": model_identity,
        "extra": dict(sorted((extra or {}).items())),
    }
    digest.update(json.dumps(head, sort_keys=True).encode())
    # Streamed per pair, so a large dataset needs no giant JSON string.
    for pair in pairs:
        digest.update(json.dumps([pair.key, pair.sha256, pair.caption]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


class CacheError(RuntimeError):
    """A cache that cannot be built; the message names the sample and the fix."""


class LatentCache:
    """Committed latent/text-embedding caches under ``root`` on a store."""

    def __init__(self, store: Store, root: str) -> None:
        self.store = store
        self.root = root

    def prefix(self, key: str) -> str:
        """Where the cache with this key lives."""
        return join(self.root, key)

    def lookup(self, key: str, local_dir: Path | None = None) -> list[CachedSample] | None:
        """The cached samples, or None unless a complete, intact cache with this key exists.

        With ``local_dir`` the shards are copied there (once: an intact copy is reused) and the
        samples read their tensors from those files on each access, so the cache does not have
        to fit in memory; without it they are loaded into memory.
        """
        prefix = self.prefix(key)
        manifest = read_manifest(self.store, prefix)
        if manifest is None:
            return None
        meta = manifest.get("metadata", {})
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            logger.warning("ignoring cache of another format", extra={"prefix": prefix})
            return None
        samples: list[CachedSample] = []
        for entry in manifest["files"]:
            if local_dir is not None:
                path = self._local_copy(prefix, entry, local_dir / key)
                if path is None:
                    return None
                samples.extend(_open_shard(path))
                continue
            data = self._verified(prefix, entry)
            if data is None:
                return None
            samples.extend(_read_shard(data))
        if len(samples) != int(meta.get("samples", -1)):
            logger.warning(
                "cache sample count does not match its manifest", extra={"prefix": prefix}
            )
            return None
        return samples

    def build(
        self,
        key: str,
        pairs: Sequence[CleanPair],
        components: Components,
        transform: ImageTransform,
        *,
        sizes: Sequence[Size] | None = None,
        batch_size: int = 16,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float16,
        progress: Callable[[int], object] | None = None,
        workers: int = 4,
    ) -> list[CachedSample]:
        """Encode ``pairs`` and commit the cache under ``root/<key>/``.

        ``sizes`` gives each pair's (width, height) when training on aspect-ratio buckets.
        ``progress`` is called with the number of samples each finished batch added; ``workers``
        threads decode and transform images ahead of the encoders. The VAE and text encoder run
        on ``device`` in eval mode, and are left where and as they were; the tensors are kept in
        ``dtype``.
        """
        samples = self._encode(
            pairs,
            components,
            transform,
            sizes=sizes,
            batch_size=batch_size,
            seed=seed,
            device=device,
            dtype=dtype,
            progress=progress,
            workers=workers,
        )
        self._commit(key, samples, flips=transform.pre.flip_probability > 0)
        return samples

    def build_share(
        self,
        key: str,
        pairs: Sequence[CleanPair],
        components: Components,
        transform: ImageTransform,
        *,
        plan: Sequence[PlannedShard],
        rank: int,
        **kw: Any,
    ) -> int:
        """Encode this process's samples and upload their shards, without a manifest.

        ``pairs`` are the samples of ``plan``'s shards that ``rank`` encodes, in sample order;
        ``kw`` are :meth:`build`'s options. The shards go up first, then a record of them that
        :meth:`commit_shares` reads. Returns the number of samples encoded.
        """
        mine = [s for s in plan if s.rank == rank]
        if len(pairs) != sum(len(s) for s in mine):
            raise CacheError(
                f"rank {rank} was given {len(pairs)} samples for shards of "
                f"{sum(len(s) for s in mine)}: give exactly the samples of its shards"
            )
        samples = self._encode(pairs, components, transform, **kw)
        prefix = self.prefix(key)
        work = scratch_dir("difftrain-cache-")
        entries = []
        try:
            offset = 0
            for shard in mine:
                path = work / shard.name
                _write_shard(samples[offset : offset + len(shard)], shard.start, path, rank=rank)
                offset += len(shard)
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                self.store.put_file(path, join(prefix, shard.name))
                entries.append({"name": shard.name, "size": path.stat().st_size, "sha256": digest})
                path.unlink()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        record = {"key": key, "rank": rank, "samples": len(samples), "files": entries}
        self.store.put_bytes(json.dumps(record, indent=1).encode(), self._part_uri(key, rank))
        logger.info(
            "latent cache share uploaded rank=%d samples=%d shards=%d",
            rank,
            len(samples),
            len(entries),
            extra={"prefix": prefix},
        )
        return len(samples)

    def commit_shares(
        self, key: str, plan: Sequence[PlannedShard], *, world: int, flips: bool
    ) -> None:
        """Write the manifest of a cache that ``world`` processes built with :meth:`build_share`.

        Called by one process once every process's share is uploaded (after a barrier). A share
        that is missing or does not match the plan is an error, and no manifest is written.
        """
        uploaded: dict[str, dict[str, Any]] = {}
        for rank in range(world):
            uri = self._part_uri(key, rank)
            if not self.store.exists(uri):
                raise CacheError(f"rank {rank} uploaded no share of latent cache {key}")
            record = json.loads(self.store.get_bytes(uri))
            if record.get("key") != key:
                raise CacheError(f"{uri} belongs to cache {record.get('key')}, not {key}")
            uploaded.update({e["name"]: e for e in record["files"]})
        missing = [s.name for s in plan if s.name not in uploaded]
        if missing:
            raise CacheError(f"latent cache {key}: no process uploaded {', '.join(missing)}")
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "samples": plan[-1].stop if plan else 0,
            "flipped": flips,
            "shard_size": SHARD_SIZE,
            "processes": world,
        }
        manifest = {
            "files": [uploaded[s.name] for s in plan],
            "metadata": meta,
            "committed": time.time(),
        }
        prefix = self.prefix(key)
        self.store.put_bytes(json.dumps(manifest, indent=1).encode(), join(prefix, MANIFEST_NAME))
        logger.info(
            "latent cache committed",
            extra={"prefix": prefix, "samples": meta["samples"], "shards": len(plan)},
        )

    def _part_uri(self, key: str, rank: int) -> str:
        return join(self.prefix(key), PARTS_FOLDER, f"rank-{rank:05d}.json")

    def _encode(
        self,
        pairs: Sequence[CleanPair],
        components: Components,
        transform: ImageTransform,
        *,
        sizes: Sequence[Size] | None = None,
        batch_size: int = 16,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float16,
        progress: Callable[[int], object] | None = None,
        workers: int = 4,
    ) -> list[CachedSample]:
        from difftrain.models.placement import placed  # not at import: it loads diffusers

        if sizes is not None and len(sizes) != len(pairs):
            raise CacheError(
                f"sizes has {len(sizes)} entries for {len(pairs)} pairs: give one each"
            )
        if batch_size < 1:
            raise CacheError(f"batch_size is {batch_size}: it must be at least 1")
        flips = transform.pre.flip_probability > 0
        encoded: list[CachedSample | None] = [None] * len(pairs)
        device = torch.device(device)
        batches = list(_batches(pairs, sizes, batch_size))
        # Decoding and transforms (Pillow and torch release the GIL) run on threads ahead of the
        # encoders, in encoding order, so the accelerator does not wait for the CPU.
        views = ordered_map(
            lambda i: _views(pairs[i], transform, sizes[i] if sizes else None, seed, flips),
            (i for batch in batches for i in batch),
            workers=workers,
            window=2 * batch_size,
            name="difftrain-cache",
        )
        with placed([components.vae, components.text_encoder], device):
            for batch in batches:
                images = [next(views) for _ in batch]
                with torch.inference_mode():
                    latents, flipped, text = _encode_batch(
                        images, [pairs[i].caption for i in batch], components, device
                    )
                # Copies made outside inference mode: plain tensors, usable in autograd later.
                for j, i in enumerate(batch):
                    encoded[i] = CachedSample(
                        key=pairs[i].key,
                        latent_params=latents[j].to("cpu", dtype, copy=True).contiguous(),
                        latent_params_flipped=(
                            flipped[j].to("cpu", dtype, copy=True).contiguous()
                            if flipped is not None
                            else None
                        ),
                        text_embeddings=text[j].to("cpu", dtype, copy=True).contiguous(),
                        caption=pairs[i].caption,
                    )
                if progress is not None:
                    progress(len(batch))
        return [s for s in encoded if s is not None]

    def _verified(self, prefix: str, entry: dict[str, Any]) -> bytes | None:
        """One shard's bytes from the store, or None when they do not match the manifest."""
        data = self.store.read_range(join(prefix, entry["name"]), 0, int(entry["size"]))
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            logger.warning(
                "cache shard does not match its manifest; rebuilding",
                extra={"prefix": prefix, "shard": entry["name"]},
            )
            return None
        return data

    def _local_copy(self, prefix: str, entry: dict[str, Any], folder: Path) -> Path | None:
        """A verified local copy of one shard (None if the store's copy is damaged).

        A ``.sha256`` file beside the copy, written after it, says it was verified; processes
        that copy the same shard at once each write a whole file and rename it into place.
        """
        path: Path = folder / str(entry["name"])
        stamp = path.with_name(path.name + ".sha256")
        if path.exists() and stamp.exists() and stamp.read_text() == entry["sha256"]:
            return path
        data = self._verified(prefix, entry)
        if data is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        unique = f"{os.getpid()}-{threading.get_ident()}"
        for target, content in ((path, data), (stamp, entry["sha256"].encode())):
            partial = target.with_name(f".{target.name}.{unique}.partial")
            partial.write_bytes(content)
            os.replace(partial, target)
        return path

    def get_or_build(
        self,
        key: str,
        pairs: Sequence[CleanPair],
        components: Components,
        transform: ImageTransform,
        **kw: Any,
    ) -> tuple[list[CachedSample], bool]:
        """(samples, hit): the committed cache if there is one, else a freshly built one."""
        found = self.lookup(key)
        if found is not None:
            logger.info("latent cache hit", extra={"key": key, "samples": len(found)})
            return found, True
        logger.info("latent cache miss; encoding", extra={"key": key, "samples": len(pairs)})
        return self.build(key, pairs, components, transform, **kw), False

    def _commit(self, key: str, samples: list[CachedSample], *, flips: bool) -> None:
        work = scratch_dir("difftrain-cache-")
        try:
            files: dict[str, Path] = {}
            for n, start in enumerate(range(0, max(len(samples), 1), SHARD_SIZE)):
                name = f"shard-{n:05d}.safetensors"
                files[name] = work / name
                _write_shard(samples[start : start + SHARD_SIZE], start, files[name])
            meta = {
                "format": CACHE_FORMAT,
                "key": key,
                "samples": len(samples),
                "flipped": flips,
                "shard_size": SHARD_SIZE,
            }
            commit(self.store, self.prefix(key), files, metadata=meta)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        logger.info(
            "latent cache committed",
            extra={"prefix": self.prefix(key), "samples": len(samples), "shards": len(files)},
        )


def sample_rng(seed: int, key: str) -> random.Random:
    """The per-image random source of the frozen crop and rotation (independent of order)."""
    return random.Random(f"{seed}:{key}")


def _batches(
    pairs: Sequence[CleanPair], sizes: Sequence[Size] | None, batch_size: int
) -> Iterator[list[int]]:
    """Index batches in which every image has the same target size (one bucket per batch)."""
    groups: dict[Size | None, list[int]] = {}
    for i in range(len(pairs)):
        groups.setdefault(sizes[i] if sizes is not None else None, []).append(i)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            yield members[start : start + batch_size]


def _views(
    pair: CleanPair, transform: ImageTransform, size: Size | None, seed: int, flips: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image as a training tensor, and mirrored when flips are cached."""
    image = transform.decode(pair.data, pair.name, size=size)
    # Both views from identically seeded sources: the same crop and rotation, mirrored.
    plain = transform(image, size=size, rng=sample_rng(seed, pair.key), flip=False)
    mirrored = (
        transform(image, size=size, rng=sample_rng(seed, pair.key), flip=True) if flips else None
    )
    return plain, mirrored


def _encode_batch(
    views: list[tuple[torch.Tensor, torch.Tensor | None]],
    captions: list[str],
    components: Components,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(latent params, flipped latent params or None, text embeddings) of one batch."""
    latents = encode_latent_params(components.vae, torch.stack([v[0] for v in views]), device)
    mirrored = [v[1] for v in views if v[1] is not None]
    flipped = (
        encode_latent_params(components.vae, torch.stack(mirrored), device) if mirrored else None
    )
    return latents, flipped, encode_text(components, captions, device)


def encode_latent_params(vae: Any, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The VAE's latent distribution parameters (B, 2C, h, w) of images in [-1, 1]."""
    dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    params: torch.Tensor = dist.parameters
    return params


def encode_text(components: Components, captions: list[str], device: torch.device) -> torch.Tensor:
    """The text encoder's last hidden state (B, tokens, D), padded to the tokenizer's context."""
    tokenizer = components.tokenizer
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    hidden: torch.Tensor = components.text_encoder(ids.to(device))[0]
    return hidden


def _write_shard(samples: list[CachedSample], start: int, path: Path, *, rank: int = 0) -> None:
    tensors: dict[str, torch.Tensor] = {}
    index = []
    for offset, sample in enumerate(samples):
        i = start + offset
        tensors[f"{i}.latent"] = sample.latent_params
        if sample.latent_params_flipped is not None:
            tensors[f"{i}.latent_flipped"] = sample.latent_params_flipped
        tensors[f"{i}.text"] = sample.text_embeddings
        index.append({"i": i, "key": sample.key, "caption": sample.caption})
    # "rank": which process encoded the shard (informational; readers need only the samples)
    metadata = {"format": CACHE_FORMAT, "samples": json.dumps(index), "rank": str(rank)}
    save_file(tensors, str(path), metadata=metadata)


def _open_shard(path: Path) -> list[CachedSample]:
    """Samples that read their tensors from the shard file at ``path`` when used."""
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    metadata = header.pop("__metadata__", {})
    shard = ShardFile(path, set(header))
    return [
        CachedSample(key=row["key"], caption=row["caption"], shard=shard, index=row["i"])
        for row in json.loads(metadata["samples"])
    ]


def _read_shard(data: bytes) -> list[CachedSample]:
    tensors = load_safetensors(data)
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    return [
        CachedSample(
            key=row["key"],
            latent_params=tensors[f"{row['i']}.latent"],
            latent_params_flipped=tensors.get(f"{row['i']}.latent_flipped"),
            text_embeddings=tensors[f"{row['i']}.text"],
            caption=row["caption"],
        )
        for row in json.loads(metadata["samples"])
    ]
