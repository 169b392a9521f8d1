"""The image bytes of kept pairs, read again from the dataset by name when they are needed.

Cleaning keeps no image bytes (:class:`difftrain.data.pairs.CleanPair`): a pair's ``name`` is
where it was found (an object URI or a local path, or ``<shard URI>#<member>`` inside a
WebDataset shard, with the member's ``span`` in an uncompressed shard), and its ``sha256`` says
the bytes read now are still the ones cleaning judged. The latent cache reads the images of the
samples it encodes here, and the uncached training loop each batch's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Sequence

from difftrain.data.copies import ImageCopies
from difftrain.data.pairs import CleanPair, DatasetError
from difftrain.data.parallel import ordered_map
from difftrain.data.webdataset import SHARD_EXTENSIONS, tar_pairs
from difftrain.storage import Store


def read_image(store: Store, pair: CleanPair) -> bytes:
    """One pair's image bytes: its own, or read again from the dataset (and verified)."""
    if pair.data:
        return pair.data
    shard, member = _shard_member(pair.name)
    if member is None:
        if isinstance(store, ImageCopies):  # the copy cleaning's read left, if it is that image
            copy = store.copy_of(pair.name, pair.sha256)
            if copy is not None:
                return copy
            store = store.store  # and no copy of this read: cleaning's decides what is kept
        data = store.get_bytes(pair.name)
    elif pair.span is not None:  # one ranged read inside an uncompressed shard
        data = store.read_range(shard, *pair.span)
    else:  # a compressed shard: streamed up to the member
        found = _from_shard(store, shard, {pair.name})
        if pair.name not in found:
            raise DatasetError(f"{pair.name} is no longer in its shard; restart the job")
        data = found[pair.name]
    return _verified(pair, data)


def iter_image_bytes(
    pairs: Iterable[CleanPair], store: Store, *, workers: int = 8
) -> Iterator[CleanPair]:
    """``pairs`` with their bytes, read ``workers`` at a time and handed out in order: only a
    bounded window of images is held at once."""
    return ordered_map(
        lambda p: p if p.data else dataclasses.replace(p, data=read_image(store, p)),
        pairs,
        workers=workers,
        name="difftrain-reread",
    )


def with_image_bytes(
    pairs: Sequence[CleanPair], store: Store, *, workers: int = 8
) -> list[CleanPair]:
    """``pairs`` with their image bytes (read where a pair has none), verified by sha256.

    Members of compressed shards are read in one pass over each shard; everything else as
    :func:`read_image` reads it.
    """
    streamed: dict[str, set[str]] = {}
    for pair in pairs:
        shard, member = _shard_member(pair.name)
        if not pair.data and member is not None and pair.span is None:
            streamed.setdefault(shard, set()).add(pair.name)
    found: dict[str, bytes] = {}
    for shard, names in streamed.items():
        found.update(_from_shard(store, shard, names))
    out = []
    for pair in pairs:
        if not pair.data and pair.name in found:
            pair = dataclasses.replace(pair, data=_verified(pair, found[pair.name]))
        elif not pair.data and pair.name in streamed.get(_shard_member(pair.name)[0], ()):
            raise DatasetError(f"{pair.name} is no longer in its shard; restart the job")
        out.append(pair)
    return list(iter_image_bytes(out, store, workers=workers))


def _verified(pair: CleanPair, data: bytes) -> bytes:
    if hashlib.sha256(data).hexdigest() != pair.sha256:
        raise DatasetError(
            f"{pair.name} changed after the dataset was cleaned (its sha256 is not the "
            "cleaned image's); leave the dataset unchanged while a job reads it"
        )
    return data


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
