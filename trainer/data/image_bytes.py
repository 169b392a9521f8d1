"""The image bytes of kept pairs, read again from the dataset by name.

With several processes, one cleans the dataset and sends the others the kept pairs without their
bytes (:func:`difftrain.train.shared_cache.clean_on_main`). A process that then encodes its share of
the latent cache reads just its pairs' images here: a pair's ``name`` is where cleaning read it (an
object URI or a local path, or ``<shard URI>#<member>`` inside a WebDataset shard), and its
``sha256`` says that the bytes are still the ones cleaning kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from difftrain.data.pairs import CleanPair, DatasetError
from difftrain.data.parallel import ordered_map
from difftrain.data.webdataset import SHARD_EXTENSIONS, tar_pairs
from difftrain.storage import Store


def with_image_bytes(
    pairs: Sequence[CleanPair], store: Store, *, workers: int = 8
) -> list[CleanPair]:
    """``pairs`` with their image bytes (read where a pair has none), verified by sha256."""
    missing = [p for p in pairs if not p.data]
    in_shards: dict[str, set[str]] = {}
    for pair in missing:
        shard, member = _shard_member(pair.name)
        if member is not None:
            in_shards.setdefault(shard, set()).add(pair.name)
    found: dict[str, bytes] = {}
    for shard, names in in_shards.items():
        found.update(_from_shard(store, shard, names))
    files = [p.name for p in missing if _shard_member(p.name)[1] is None]
    read = ordered_map(store.get_bytes, files, workers=workers, name="difftrain-reread")
    found.update(zip(files, read, strict=True))
    out = []
    for pair in pairs:
        if not pair.data:
            data = found.get(pair.name)
            if data is None:
                raise DatasetError(f"{pair.name} is no longer in its shard; restart the job")
            if hashlib.sha256(data).hexdigest() != pair.sha256:
                raise DatasetError(
                    f"{pair.name} changed after the dataset was cleaned (its sha256 is not the "
                    "cleaned image's); leave the dataset unchanged while a job reads it"
                )
            pair = dataclasses.replace(pair, data=data)
        out.append(pair)
    return out


def _shard_member(name: str) -> tuple[str, str | None]:
    """('<shard URI>', '<member>') for a WebDataset sample's name, (name, None) for a file."""
    at = name.find("#")
    while at != -1:
        if name[:at].lower().endswith(SHARD_EXTENSIONS):
            return name[:at], name[at + 1 :]
        at = name.find("#", at + 1)
    return name, None


def _from_shard(store: Store, shard: str, names: set[str]) -> dict[str, bytes]:
    """The images named ``names`` in one shard, streamed until the last one is found."""
    found: dict[str, bytes] = {}
    with store.open_stream(shard) as stream:
        # the key prefix and caption column do not change a sample's name or image bytes
        for raw in tar_pairs(stream, shard, "", "txt"):
            if raw.name in names:
                found[raw.name] = raw.data
                if len(found) == len(names):
                    break
    return found
