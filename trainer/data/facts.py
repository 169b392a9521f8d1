"""Cleaning facts per object version: what cleaning learnt from an object, kept for later runs.

A run that finds an object it has seen before (same name, size and version: the store listing's
ETag, or a local file's modification time) takes the image's sha256, size and pHash, a caption
file's text, or a WebDataset shard's sample list from here instead of downloading the object, so
every check of :mod:`difftrain.data.cleaning` (duplicates and sizes included) still runs over the
whole dataset while only new or changed objects are read.

Kept beside the latent cache, ``<cache root>/facts/<generation>.json``: each generation is one
object holding every fact (written whole, so it is complete or absent), the newest is the one read
(one listing and one read), and the oldest beyond :data:`KEEP_GENERATIONS` are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any

from difftrain.data.pairs import ImageFacts, Span
from difftrain.storage import StorageError, Store, join

logger = logging.getLogger(__name__)

FACTS_FORMAT = "difftrain-clean-facts/1"
FACTS_FOLDER = "facts"
KEEP_GENERATIONS = 3


def version_key(name: str, size: int, version: str) -> str:
    """The key of one version of one object: it changes when the object is rewritten."""
    return hashlib.sha256(f"{name}\n{size}\n{version}".encode()).hexdigest()[:32]


def member_key(shard_version: str, member: str) -> str:
    """The version key of a member of a shard, given the shard's version key."""
    return hashlib.sha256(f"{shard_version}\n{member}".encode()).hexdigest()[:32]


def generation_name() -> str:
    """A name that sorts after every earlier generation's (nanoseconds, then a random tail)."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"


def newest_generation(store: Store, folder: str) -> str | None:
    """The URI of the newest generation in ``folder``, or None (one listing)."""
    found = [u for u in store.list(folder + "/") if u.endswith(".json")]
    return max(found, key=lambda u: u.rsplit("/", 1)[-1]) if found else None


def prune_generations(store: Store, folder: str, keep: int = KEEP_GENERATIONS) -> None:
    """Remove all but the newest ``keep`` generations (a reader reads only the newest)."""
    found = sorted(
        (u for u in store.list(folder + "/") if u.endswith(".json")),
        key=lambda u: u.rsplit("/", 1)[-1],
    )
    for uri in found[:-keep]:
        try:
            store.delete(uri)
        except StorageError as exc:  # another run removed it first, or no delete right
            logger.debug("old generation not removed", extra={"uri": uri, "err": str(exc)})


class CleaningFacts:
    """The facts of the objects of one dataset, by version key; safe to use from threads.

    ``need_phash``: whether this run compares perceptual hashes; an image whose facts have no
    pHash is then read again.
    """

    def __init__(self, *, need_phash: bool) -> None:
        self.need_phash = need_phash
        self.images: dict[str, ImageFacts] = {}
        self.captions: dict[str, str] = {}
        self.shards: dict[str, list[dict[str, Any]]] = {}
        self.added = 0  # facts learnt in this run (nothing to save when 0)
        self.reused = 0  # objects not read because their facts were known
        self._lock = threading.Lock()

    def image(self, version: str) -> ImageFacts | None:
        """The facts of this image version, when they are enough for this run's checks."""
        found = self.images.get(version) if version else None
        if found is None or (self.need_phash and found.phash is None and found.error is None):
            return None
        return found

    def add_image(self, version: str, facts: ImageFacts) -> None:
        if not version:
            return
        with self._lock:
            if self.images.get(version) != facts:
                self.images[version] = facts
                self.added += 1

    def caption(self, version: str) -> str | None:
        return self.captions.get(version) if version else None

    def add_caption(self, version: str, text: str) -> None:
        with self._lock:
            if self.captions.get(version) != text:
                self.captions[version] = text
                self.added += 1

    def shard(self, version: str) -> list[dict[str, Any]] | None:
        """A shard's samples (key, name, caption, version, span), when each one's image facts
        are known too; else None (the shard is read)."""
        samples = self.shards.get(version)
        if samples is None or any(self.image(s["version"]) is None for s in samples):
            return None
        return samples

    def add_shard(self, version: str, samples: list[dict[str, Any]]) -> None:
        with self._lock:
            self.shards[version] = samples
            self.added += 1

    def count_reused(self, n: int = 1) -> None:
        with self._lock:
            self.reused += n

    # --- on the store ---------------------------------------------------------------------------

    @classmethod
    def load(cls, store: Store, root: str, *, need_phash: bool) -> CleaningFacts:
        """The newest generation under ``root`` (none yet, or of another format: no facts)."""
        facts = cls(need_phash=need_phash)
        uri = newest_generation(store, join(root, FACTS_FOLDER))
        if uri is None:
            return facts
        try:
            doc = json.loads(store.get_bytes(uri))
        except (StorageError, ValueError) as exc:  # removed meanwhile, or unreadable: start over
            logger.warning("cleaning facts not read", extra={"uri": uri, "err": str(exc)})
            return facts
        if doc.get("format") != FACTS_FORMAT:
            return facts
        facts.images = {k: ImageFacts(**v) for k, v in doc.get("images", {}).items()}
        facts.captions = dict(doc.get("captions", {}))
        facts.shards = dict(doc.get("shards", {}))
        return facts

    def save(self, store: Store, root: str) -> str | None:
        """Write a new generation when this run learnt anything; returns its URI."""
        if not self.added:
            return None
        folder = join(root, FACTS_FOLDER)
        doc = {
            "format": FACTS_FORMAT,
            "images": {k: _compact(asdict(v)) for k, v in self.images.items()},
            "captions": self.captions,
            "shards": self.shards,
        }
        uri = join(folder, generation_name())
        store.put_bytes(json.dumps(doc, separators=(",", ":")).encode(), uri)
        prune_generations(store, folder)
        logger.info(
            "cleaning facts saved",
            extra={"uri": uri, "images": len(self.images), "added": self.added},
        )
        return uri


def shard_sample(
    key: str, name: str, caption: str | None, version: str, span: Span | None
) -> dict[str, Any]:
    """One sample of a shard as :meth:`CleaningFacts.add_shard` keeps it."""
    return {"key": key, "name": name, "caption": caption, "version": version, "span": span}


def _compact(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v is not None}
