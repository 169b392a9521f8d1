"""WebDataset shards: ``.tar`` archives streamed member by member, never downloaded whole.

A sample is the run of consecutive members sharing a key (``dir/000123.jpg``, ``dir/000123.txt``:
key ``dir/000123``, the part of the name before the first dot), as WebDataset writes them. The
caption comes from ``.txt``, ``.caption`` or ``.json`` (its caption column, ``caption`` or
``text``), in that order of preference. A sample without an image member is still yielded, unread,
with ``skipped`` set: ``orphan_caption`` when it holds only captions, else ``unsupported_format``.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import tarfile
import threading
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

from difftrain.data.images import EXTENSIONS
from difftrain.data.pairs import DatasetError, RawPair, Span, caption_text, caption_value
from difftrain.storage import Store

if TYPE_CHECKING:
    from difftrain.data.facts import CleaningFacts

SHARD_EXTENSIONS = (".tar.gz", ".tgz", ".tar")  # longest first: the suffix is cut off the key
CAPTION_EXTENSIONS = ("txt", "caption", "json")  # in order of preference
IMAGE_EXTENSIONS = tuple(e.removeprefix(".") for e in EXTENSIONS)


def shard_key(rel: str) -> str:
    """'train/shard-000.tar' -> 'train/shard-000', the prefix of its samples' keys."""
    return next((rel[: -len(e)] for e in SHARD_EXTENSIONS if rel.lower().endswith(e)), rel)


def split_member(name: str) -> tuple[str, str]:
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'), the WebDataset convention."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def shard_pairs(
    store: Store,
    shards: Sequence[tuple[str, str, str]],
    column: str,
    facts: CleaningFacts | None = None,
) -> Iterator[RawPair]:
    """The samples of each ``(uri, key prefix, version key)`` shard in turn, as they stream in.

    With ``facts``, a shard whose version they know is not read: its samples come from them,
    without bytes; the samples of a shard that is read are added to them.
    """
    from difftrain.data.facts import member_key

    for uri, prefix, version in shards:
        known = facts.shard(version) if facts is not None and version else None
        if known is not None:
            assert facts is not None
            facts.count_reused(len(known))
            yield from (_known_sample(row, facts) for row in known)
            continue
        rows: list[dict[str, Any]] = []
        with store.open_stream(uri) as stream:
            for raw in tar_pairs(stream, uri, prefix, column):
                if version:
                    raw = dataclasses.replace(raw, version=member_key(version, raw.name))
                    rows.append(_sample_row(raw))
                yield raw
        if facts is not None and version:
            facts.add_shard(version, rows)


_NOT_KEPT = ("data", "facts")  # a shard's samples are kept without their bytes and image facts


def _sample_row(raw: RawPair) -> dict[str, Any]:
    kept = (f.name for f in dataclasses.fields(raw) if f.name not in _NOT_KEPT)
    return {name: getattr(raw, name) for name in kept}


def _known_sample(row: dict[str, Any], facts: CleaningFacts) -> RawPair:
    fields = {f.name for f in dataclasses.fields(RawPair)}
    values = {k: v for k, v in row.items() if k in fields}
    if values.get("span") is not None:
        values["span"] = tuple(values["span"])
    return RawPair(**{**values, "data": b"", "facts": facts.image(row["version"])})


def tar_pairs(stream: IO[bytes], uri: str, prefix: str, column: str) -> Iterator[RawPair]:
    """The samples of one tar stream, keyed ``<prefix>/<sample key>``."""
    key: str | None = None
    members: dict[str, bytes] = {}
    spans: dict[str, Span] = {}
    try:
        # 'r|*': a forward-only stream of blocks (plain or gzip); members are read as they arrive.
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            # in an uncompressed shard a member's bytes can be read again by range
            plain = getattr(tar.fileobj, "comptype", None) == "tar"
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name.removeprefix("./")
                if name.rsplit("/", 1)[-1].startswith("."):
                    continue
                sample, ext = split_member(name)
                if sample != key and key is not None and members:
                    yield _sample(prefix, uri, key, members, column, spans)
                    members, spans = {}, {}
                key = sample
                fh = tar.extractfile(info)
                members[ext] = fh.read() if fh is not None else b""
                if plain:
                    spans[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(
            f"{uri} is not a readable tar archive ({exc}); rewrite the shard"
        ) from None
    if members and key is not None:
        yield _sample(prefix, uri, key, members, column, spans)


def _sample(
    prefix: str,
    uri: str,
    key: str,
    members: dict[str, bytes],
    column: str,
    spans: dict[str, Span] | None = None,
) -> RawPair:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    caption: str | None = None
    for ext in CAPTION_EXTENSIONS:
        if ext not in members:
            continue
        if ext == "json":
            try:
                meta = json.loads(members[ext])
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = None
            if isinstance(meta, dict):
                caption = next(
                    (caption_value(meta[c]) for c in (column, "caption", "text") if c in meta),
                    None,
                )
        else:
            caption = caption_text(members[ext])
        if caption is not None:
            break
    name = f"{uri}#{key}.{image_ext or next(iter(members))}"
    if image_ext is None:  # counted, not read: a caption without an image, or something else
        only_captions = all(e in CAPTION_EXTENSIONS for e in members)
        reason = "orphan_caption" if only_captions else "unsupported_format"
        return RawPair(f"{prefix}/{key}", name, b"", caption, skipped=reason)
    span = (spans or {}).get(image_ext)
    return RawPair(f"{prefix}/{key}", name, members[image_ext], caption, span=span)


_END = object()


def prefetch(source: Iterator[RawPair], depth: int) -> Iterator[RawPair]:
    """Run ``source`` in a background thread, at most ``depth`` pairs ahead of the consumer, so
    the network read of a shard overlaps the decoding of what came before it."""
    buffer: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who re-raises it
            put(exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # the consumer stopped early: close the shard's stream in this thread

    thread = threading.Thread(target=produce, name="difftrain-shards", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, RawPair)
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
