"""Objects from the store copied into a local folder once per node, safely under concurrency.

The ranks of a job on one machine (and a restarted process in the same pod) share the work
folder, so a download is done once: a later call finds the copy and compares only the store's
metadata (size and ETag) with what the completion marker recorded. The marker is written last, so
a partial copy is never taken as complete. A lock file serialises processes on one folder, and
each download goes to a file only its process writes (``.name.part-<pid>-<random>``) that is
renamed into place, so a reader sees a whole file or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from difftrain.storage import StorageError, Store

logger = logging.getLogger(__name__)

LOCK_NAME = ".difftrain-fetch.lock"
MARKER_NAME = ".difftrain-fetch.json"
_PART = ".part-"
_BLOCK = 8 << 20


@dataclass(frozen=True)
class ObjectVersion:
    """What identifies one object's content without reading it: its uri, size and ETag."""

    uri: str
    size: int
    etag: str


def object_version(store: Store, uri: str) -> ObjectVersion:
    """The size and ETag the store reports for ``uri`` (one HEAD request)."""
    size, etag = store.stat(uri)
    return ObjectVersion(uri=uri, size=size, etag=etag)


def fetch_objects(
    store: Store,
    objects: Mapping[str, str],
    dest: Path,
    *,
    before_download: Callable[[], None] | None = None,
) -> int:
    """Make ``dest/<name>`` a complete copy of each ``objects`` uri; return how many moved.

    Files whose recorded size and ETag still match the store are kept; only new or changed
    objects are downloaded. ``before_download`` runs (under the lock) only when something must be
    downloaded, to refuse a model before its weights move; what it raises propagates.
    """
    for name in objects:
        _check_name(name, dest)
    current = {name: object_version(store, uri) for name, uri in sorted(objects.items())}
    with _locked(dest):
        recorded = _read_marker(dest)
        if recorded == current and all(_intact(dest / n, v) for n, v in current.items()):
            logger.info("local copy reused", extra={"dest": str(dest), "files": len(current)})
            return 0
        if before_download is not None:
            before_download()
        # from here the folder is in flux: without the marker no process takes it as complete
        (dest / MARKER_NAME).unlink(missing_ok=True)
        _remove_partials(dest)
        for name in set(recorded) - set(current):
            (dest / name).unlink(missing_ok=True)  # a file of an earlier source, not wanted now
        stale = [n for n, v in current.items() if recorded.get(n) != v or not _intact(dest / n, v)]
        for name in stale:
            _download(store, current[name], dest / name)
        write_atomic(dest / MARKER_NAME, _marker_bytes(current))
    logger.info(
        "downloaded into the local copy",
        extra={"dest": str(dest), "downloaded": len(stale), "kept": len(current) - len(stale)},
    )
    return len(stale)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that a concurrent reader sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    try:
        with partial.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Hold the folder's lock file: one process at a time checks and fills ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    # the lock file is never removed: unlinking it would let two processes lock different inodes
    with (dest / LOCK_NAME).open("a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process's download", extra={"dest": str(dest)})
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_name(name: str, dest: Path) -> None:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts or name in {LOCK_NAME, MARKER_NAME}:
        raise StorageError(f"object name {name!r} cannot be written under {dest}")


def _partial_name(target: Path) -> Path:
    # pid and a random part: processes of different pods sharing a volume may have the same pid
    return target.with_name(f".{target.name}{_PART}{os.getpid()}-{secrets.token_hex(4)}")


def _intact(path: Path, version: ObjectVersion) -> bool:
    try:
        return path.stat().st_size == version.size
    except FileNotFoundError:
        return False


def _read_marker(dest: Path) -> dict[str, ObjectVersion]:
    try:
        raw = json.loads((dest / MARKER_NAME).read_bytes())
        return {name: ObjectVersion(**entry) for name, entry in raw["files"].items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as exc:
        # written atomically, so this is not our file's format: start over rather than trust it
        logger.warning("unreadable download marker ignored", extra={"dest": str(dest), "err": exc})
        return {}


def _marker_bytes(versions: Mapping[str, ObjectVersion]) -> bytes:
    files = {name: asdict(v) for name, v in versions.items()}
    return json.dumps({"files": files}, indent=1, sort_keys=True).encode()


def _remove_partials(dest: Path) -> None:
    """Drop parts left by a process that died mid-download (only the lock holder writes parts)."""
    for path in dest.rglob(f".*{_PART}*"):
        if path.is_file():
            path.unlink(missing_ok=True)


def _download(store: Store, version: ObjectVersion, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(target)
    try:
        with store.open_stream(version.uri) as src, partial.open("wb") as out:
            while block := src.read(_BLOCK):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        got = partial.stat().st_size
        if got != version.size:
            raise StorageError(
                f"{version.uri}: read {got} bytes where the store listed {version.size}; the "
                "object changed during the download: retry once uploads to it have finished"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
