"""Dataset sources: image–caption pairs read from a bucket prefix or a local folder.

Layouts (``dataset.format``):

- ``folder``: images with a same-stem ``.txt`` caption beside them (``a/cat.jpg`` + ``a/cat.txt``);
- ``jsonl``: ``metadata.jsonl`` (Hugging Face *imagefolder*): one JSON object per line with
  ``file_name`` (relative to the metadata file's folder) and the caption in ``captionColumn``;
- ``webdataset``: ``.tar`` shards whose members are grouped by key (``000123.jpg`` +
  ``000123.txt``, ``.caption`` or ``.json``); shards are streamed, never downloaded whole;
- ``classes``: one sub-folder per class (Stanford Dogs, CUB-200 ...), no caption files; the caption
  is ``captionTemplate`` with ``{class}`` replaced by the folder's name (a leading WordNet id
  ``n02085620-`` or index ``001.`` removed, underscores as spaces);
- ``auto``: detected from the files found.

Images are JPEG, PNG, WebP, GIF, BMP, TIFF (and AVIF where Pillow has it; see
:data:`difftrain.data.images.EXTENSIONS`). Every other file is still yielded, unread, as a pair
with ``skipped`` set, so cleaning counts it: a caption file no image uses (``orphan_caption``), a
file of any other kind (``unsupported_format``), and with ``jsonl`` a row naming a file that is
not there (``missing_image``) or an image no row names (``not_in_metadata``); ``metadata.jsonl``
itself is the layout's index, not counted. Files and folders whose names start with a dot are
never part of a dataset (caches, partial uploads, macOS metadata). Pairs come out in a
deterministic order (sorted keys; shards in name order, members in archive order) whatever order
the parallel reads finish in.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from difftrain.api import DatasetSpec
from difftrain.data.images import EXTENSIONS as IMAGE_EXTENSIONS
from difftrain.data.pairs import CleanPair, DatasetError, RawPair, caption_text, caption_value
from difftrain.data.parallel import ordered_map
from difftrain.data.webdataset import SHARD_EXTENSIONS, prefetch, shard_key, shard_pairs
from difftrain.storage import Store, is_s3, split_s3

if TYPE_CHECKING:
    from difftrain.data.facts import CleaningFacts

logger = logging.getLogger(__name__)

CAPTION_EXTENSIONS = (".txt",)
METADATA_NAME = "metadata.jsonl"
FORMATS = ("folder", "jsonl", "webdataset", "classes")


@dataclass(frozen=True)
class _Listing:
    root: str  # dataset.uri without a trailing slash (the parent when it names one object)
    files: list[str]  # paths relative to root, sorted, hidden ones left out
    # path relative to root -> (size, version), from the same listing
    versions: dict[str, tuple[int, str]] = field(default_factory=dict)

    def uri(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def version_key(self, rel: str) -> str:
        """The object's version key (difftrain.data.facts), "" when the listing had none."""
        from difftrain.data.facts import version_key

        found = self.versions.get(rel)
        return version_key(self.uri(rel), *found) if found else ""


@dataclass(frozen=True)
class _Job:
    key: str
    image: str | None  # relative path; None when the image is missing
    caption: str | None = None
    caption_file: str | None = None
    skipped: str | None = None  # counted, not read: the reason (``image`` is the file counted)


def _where(spec: DatasetSpec, store: Store) -> str:
    config = getattr(store, "config", None)
    endpoint = getattr(config, "endpoint", None)
    return f"dataset.uri {spec.uri}" + (f" (at {endpoint})" if endpoint else "")


def _list(spec: DatasetSpec, store: Store) -> _Listing:
    # Local paths normalised as the local store lists them ('./data/' -> 'data').
    uri = spec.uri.rstrip("/") if is_s3(spec.uri) else str(Path(spec.uri))
    if is_s3(uri):
        _, key = split_s3(uri)
        infos = list(store.list_info(f"{uri}/" if key else uri))
        if not infos and key and store.exists(uri):  # the URI names one shard or metadata file
            return _one_object(store, uri.rsplit("/", 1)[0], uri.rsplit("/", 1)[1])
    else:
        path = Path(uri)
        if path.is_file():
            return _one_object(store, str(path.parent), path.name)
        if not path.is_dir():
            raise DatasetError(f"dataset.uri {spec.uri} does not exist: give an existing folder")
        infos = list(store.list_info(uri))
    prefix = f"{uri}/"
    versions = {
        rel: (info.size, info.version)
        for info in infos
        if (rel := info.uri[len(prefix) :] if info.uri.startswith(prefix) else info.uri)
        and not any(part.startswith(".") for part in rel.split("/"))
    }
    files = sorted(versions)
    if not files:
        raise DatasetError(
            f"{_where(spec, store)} is empty: no files under this prefix; check the bucket and "
            "prefix (or upload the dataset there)"
        )
    return _Listing(uri, files, versions)


def _one_object(store: Store, root: str, name: str) -> _Listing:
    size, version = store.stat(f"{root}/{name}")
    return _Listing(root, [name], {name: (size, version)})


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_EXTENSIONS)


def _is_shard(rel: str) -> bool:
    return rel.lower().endswith(SHARD_EXTENSIONS)


def _detect(spec: DatasetSpec, listing: _Listing, where: str) -> str:
    if spec.format != "auto":
        return spec.format
    images = [f for f in listing.files if _is_image(f)]
    if any(_is_shard(f) for f in listing.files) and not images:
        return "webdataset"
    if any(f.rsplit("/", 1)[-1] == METADATA_NAME for f in listing.files):
        return "jsonl"
    if spec.caption_template and images and all("/" in f for f in images):
        return "classes"
    if images:
        return "folder"
    sample = ", ".join(listing.files[:3])
    raise DatasetError(
        f"{where} holds no images ({', '.join(IMAGE_EXTENSIONS)}), .tar shards or "
        f"{METADATA_NAME} (found e.g. {sample}); fix the prefix or set dataset.format"
    )


def detect_format(spec: DatasetSpec, store: Store) -> str:
    """The dataset's layout: 'folder', 'jsonl', 'webdataset' or 'classes' (``spec.format`` unless
    it is 'auto')."""
    return _detect(spec, _list(spec, store), _where(spec, store))


def iter_pairs(
    spec: DatasetSpec, store: Store, *, workers: int = 8, facts: CleaningFacts | None = None
) -> Iterator[RawPair]:
    """Every image–caption pair of the dataset, in a deterministic order.

    Objects are read by ``workers`` threads (the store's latency, not its bandwidth, is what
    limits many small reads). With ``facts``, an object whose version they know is not read: its
    pair comes with the facts and no bytes. Raises DatasetError (layout) or StorageError (store)
    before the first pair when the prefix is empty, the bucket missing or the credentials refused.
    """
    where = _where(spec, store)
    listing = _list(spec, store)
    fmt = _detect(spec, listing, where)
    logger.info("reading dataset", extra={"uri": spec.uri, "format": fmt})
    if fmt == "webdataset":
        if not any(_is_shard(f) for f in listing.files):
            raise DatasetError(f"{where} has no .tar shards: set dataset.format or fix the prefix")
        entries = _webdataset_entries(store, listing, spec.caption_column, facts)
        return prefetch(entries, depth=max(16, workers * 4))
    if fmt == "jsonl":
        jobs = _jsonl_jobs(spec, store, listing, where)
    elif fmt == "classes":
        jobs = _class_jobs(spec, listing, where)
    else:
        jobs = _folder_jobs(listing, where)
    return ordered_map(lambda job: _read_job(store, listing, job, facts), jobs, workers=workers)


def _webdataset_entries(
    store: Store, listing: _Listing, column: str, facts: CleaningFacts | None
) -> Iterator[RawPair]:
    """The shards' samples and, in name order among them, every other file, counted unread."""
    for rel in listing.files:
        if _is_shard(rel):
            shard = (listing.uri(rel), shard_key(rel), listing.version_key(rel))
            yield from shard_pairs(store, [shard], column, facts)
        else:
            yield RawPair(rel, listing.uri(rel), b"", None, skipped=_leftover_reason(rel))


def _read_job(
    store: Store, listing: _Listing, job: _Job, facts: CleaningFacts | None = None
) -> RawPair:
    if job.skipped is not None or job.image is None:
        name = listing.uri(job.image if job.image is not None else job.key)
        return RawPair(job.key, name, b"", job.caption, skipped=job.skipped or "missing_image")
    caption = job.caption
    if job.caption_file is not None:
        caption = _caption_file(store, listing, job.caption_file, facts)
    uri = listing.uri(job.image)
    version = listing.version_key(job.image)
    known = facts.image(version) if facts is not None else None
    if known is not None:  # seen before, unchanged: judged by its facts, not read
        assert facts is not None
        facts.count_reused()
        return RawPair(job.key, uri, b"", caption, version=version, facts=known)
    return RawPair(job.key, uri, store.get_bytes(uri), caption, version=version)


def _caption_file(store: Store, listing: _Listing, rel: str, facts: CleaningFacts | None) -> str:
    version = listing.version_key(rel)
    known = facts.caption(version) if facts is not None else None
    if known is not None:
        return known
    text = caption_text(store.get_bytes(listing.uri(rel)))
    if facts is not None and version:
        facts.add_caption(version, text)
    return text


def _stem(rel: str) -> str:
    head, _, base = rel.rpartition("/")
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return f"{head}/{stem}" if head else stem


def _image_keys(images: list[str]) -> dict[str, str]:
    """Image path -> key: the path without extension, unless two images share it (cat.jpg and
    cat.png), then the path itself so keys stay unique."""
    stems = Counter(_stem(f) for f in images)
    return {f: _stem(f) if stems[_stem(f)] == 1 else f for f in images}


def _is_caption(rel: str) -> bool:
    return rel.lower().endswith(CAPTION_EXTENSIONS)


def _leftover_reason(rel: str) -> str:
    return "orphan_caption" if _is_caption(rel) else "unsupported_format"


def _leftovers(listing: _Listing, used: set[str]) -> list[_Job]:
    """A job for each file no pair reads, counted under its reason, keyed by its path."""
    return [_Job(f, f, skipped=_leftover_reason(f)) for f in listing.files if f not in used]


def _folder_jobs(listing: _Listing, where: str) -> list[_Job]:
    images = [f for f in listing.files if _is_image(f)]
    if not images:
        raise DatasetError(f"{where} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    captions = {_stem(f): f for f in listing.files if _is_caption(f)}
    keys = _image_keys(images)
    jobs = [_Job(keys[f], f, caption_file=captions.get(_stem(f))) for f in images]
    used = set(images) | {j.caption_file for j in jobs if j.caption_file is not None}
    return sorted(jobs + _leftovers(listing, used), key=lambda j: j.key)


_CLASS_PREFIX = re.compile(r"^(n\d{8}-|\d+[._-])")


def class_name(folder: str) -> str:
    """Folder name -> class name: 'n02085620-Chihuahua' -> 'Chihuahua',
    '001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    name = _CLASS_PREFIX.sub("", folder).replace("_", " ").strip()
    return name or folder


def _class_jobs(spec: DatasetSpec, listing: _Listing, where: str) -> list[_Job]:
    template = spec.caption_template
    if not template or "{class}" not in template:
        raise DatasetError(
            f"{where}: class folders need dataset.captionTemplate with {{class}} in it, "
            "e.g. 'a photo of a {class}'"
        )
    images = [f for f in listing.files if _is_image(f)]
    if not images:
        raise DatasetError(f"{where} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    keys = _image_keys(images)
    jobs = []
    for f in images:
        folder = f.split("/", 1)[0] if "/" in f else None
        # An image outside any class folder has no caption: dropped and reported, not guessed.
        caption = template.replace("{class}", class_name(folder)) if folder else None
        jobs.append(_Job(keys[f], f, caption=caption))
    return sorted(jobs + _leftovers(listing, set(images)), key=lambda j: j.key)


def _jsonl_jobs(spec: DatasetSpec, store: Store, listing: _Listing, where: str) -> list[_Job]:
    metas = [f for f in listing.files if f.rsplit("/", 1)[-1] == METADATA_NAME]
    if not metas:
        raise DatasetError(f"{where} has no {METADATA_NAME}: set dataset.format or add one")
    present = set(listing.files)
    column = spec.caption_column
    jobs: dict[str, _Job] = {}
    columns: set[str] = set()
    found_column = False
    for meta in metas:
        folder = meta.rpartition("/")[0]
        text = caption_text(store.get_bytes(listing.uri(meta)))
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{listing.uri(meta)} line {lineno}: not valid JSON ({exc.msg}); fix the line"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise DatasetError(
                    f"{listing.uri(meta)} line {lineno}: expected an object with a file_name string"
                )
            columns.update(row)
            found_column = found_column or column in row
            rel = f"{folder}/{row['file_name']}" if folder else row["file_name"]
            rel = rel.removeprefix("./")
            key = _stem(rel)
            caption = caption_value(row.get(column))
            missing = None if rel in present else "missing_image"
            jobs[key] = _Job(key, rel, caption=caption, skipped=missing)
    if jobs and not found_column:
        raise DatasetError(
            f"{where}: no row of {METADATA_NAME} has the caption column {column!r} (columns: "
            f"{', '.join(sorted(columns))}); set dataset.captionColumn"
        )
    named = {j.image for j in jobs.values() if j.image is not None}
    unnamed = [
        _Job(f, f, skipped="not_in_metadata")
        for f in listing.files
        if _is_image(f) and f not in named
    ]
    used = named | set(metas) | {j.image for j in unnamed if j.image is not None}
    return sorted([*jobs.values(), *unnamed, *_leftovers(listing, used)], key=lambda j: j.key)


__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "CleanPair",
    "DatasetError",
    "RawPair",
    "class_name",
    "detect_format",
    "iter_pairs",
]
