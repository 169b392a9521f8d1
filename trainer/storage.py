"""One object-store interface over the minio SDK (``s3://bucket/prefix``) and local paths.

Reads are ranged (``read_range``) or streamed (``open_stream``), so a multi-gigabyte checkpoint
never has to sit in memory. Writes of finished artefacts go through the atomic commit protocol: the
parts first, a manifest (names, sizes, sha256) last; readers trust only what a manifest lists.
Transient errors are retried with exponential backoff and jitter; a missing bucket, wrong
credentials or an unreachable endpoint fail fast with a message naming endpoint and bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
FILE_MANIFEST_SUFFIX = ".manifest.json"
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage failure the user can act on; the message names the location and the fix.

    ``permanent`` is true when retrying cannot help (missing bucket or object, refused
    credentials), false when the store may come back (unreachable, overloaded).
    """

    def __init__(self, message: str, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Credentials:
    """Access and secret key of an S3-compatible store."""

    access_key: str
    secret_key: str = field(repr=False)


@dataclass(frozen=True)
class StoreConfig:
    """How to reach the object store: the spec's ``storage`` block plus the Secret's keys."""

    endpoint: str
    credentials: Credentials | None = None
    secure: bool = True
    region: str | None = None
    ca_bundle: str | None = None  # path of a PEM file


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an object in an S3-compatible store."""
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket: write s3://bucket/prefix")
    return bucket, key


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its URI, size and version (as :meth:`Store.stat` gives them)."""

    uri: str
    size: int
    version: str


class Store(Protocol):
    """What the trainer and the merge engine need from a store."""

    def size(self, uri: str) -> int:
        """Size of one object in bytes."""
        ...

    def stat(self, uri: str) -> tuple[int, str]:
        """Size in bytes and a version that changes when the content is rewritten (the ETag in
        an object store; modification time locally), in one request."""
        ...

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``."""
        ...

    def open_stream(self, uri: str, offset: int = 0) -> IO[bytes]:
        """A forward-only stream from ``offset`` to the end."""
        ...

    def get_bytes(self, uri: str) -> bytes:
        """A whole (small) object in one request."""
        ...

    def put_file(self, path: Path, uri: str) -> None:
        """Upload (or copy) a local file to ``uri``."""
        ...

    def put_bytes(self, data: bytes, uri: str) -> None:
        """Write a small object."""
        ...

    def list(self, uri_prefix: str) -> Iterator[str]:
        """URIs of the objects under a prefix (recursively), sorted."""
        ...

    def list_info(self, uri_prefix: str) -> Iterator[ObjectInfo]:
        """The objects under a prefix with their sizes and versions, sorted by URI: what
        :meth:`list` finds, from the same one listing (no request per object)."""
        ...

    def exists(self, uri: str) -> bool:
        """Whether an object exists."""
        ...

    def delete(self, uri: str) -> None:
        """Remove an object (no error when it is missing)."""
        ...


class LocalStore:
    """Plain paths on the local filesystem, with the same interface as the object store."""

    def size(self, uri: str) -> int:
        return self.stat(uri)[0]

    def stat(self, uri: str) -> tuple[int, str]:
        try:
            st = Path(uri).stat()
        except FileNotFoundError:
            raise StorageError(f"{uri}: no such file") from None
        return st.st_size, f"{st.st_mtime_ns}-{st.st_size}"

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        with open(uri, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise StorageError(f"{uri}: truncated (wanted {length} bytes at {offset})")
        return data

    def open_stream(self, uri: str, offset: int = 0) -> IO[bytes]:
        fh = open(uri, "rb")  # noqa: SIM115 - handed to the caller, who closes it
        fh.seek(offset)
        return fh

    def get_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{uri}: no such file") from None

    def put_file(self, path: Path, uri: str) -> None:
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.resolve() == path.resolve():
            return
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def put_bytes(self, data: bytes, uri: str) -> None:
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def list(self, uri_prefix: str) -> Iterator[str]:
        root = Path(uri_prefix)
        if root.is_file():
            yield str(root)
            return
        if root.is_dir():
            yield from sorted(str(p) for p in root.rglob("*") if p.is_file())

    def list_info(self, uri_prefix: str) -> Iterator[ObjectInfo]:
        for uri in self.list(uri_prefix):
            try:
                st = Path(uri).stat()
            except FileNotFoundError:  # removed since it was listed
                continue
            yield ObjectInfo(uri, st.st_size, f"{st.st_mtime_ns}-{st.st_size}")

    def exists(self, uri: str) -> bool:
        return Path(uri).is_file()

    def delete(self, uri: str) -> None:
        path = Path(uri)
        path.unlink(missing_ok=True)
        # like an object store, a folder whose last object is gone is gone too
        with contextlib.suppress(OSError):
            path.parent.rmdir()


def _is_transient(exc: BaseException) -> bool:
    from minio.error import S3Error
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, S3Error):
        return exc.code in {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}
    return isinstance(exc, Urllib3Error | ConnectionError | TimeoutError)


# how long a store may be away before an operation gives up: a restarted MinIO or a failed-over
# load balancer is back within this, and a checkpoint's upload waits for it rather than failing
RETRY_BUDGET_S = 90.0


def retry(
    call: Callable[[], T],
    what: str,
    budget_s: float = RETRY_BUDGET_S,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
) -> T:
    """Run ``call``; retry transient failures with exponential backoff and full jitter.

    Retries go on while ``budget_s`` seconds have not passed since the first attempt.
    """
    deadline = time.monotonic() + budget_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:
            if not _is_transient(exc) or time.monotonic() >= deadline:
                raise
            delay = random.uniform(base_delay, min(max_delay, base_delay * 2**attempt))
            delay = min(delay, max(0.0, deadline - time.monotonic()))
            logger.warning(
                "transient storage error; retrying",
                extra={"what": what, "err": exc, "attempt": attempt},
            )
            time.sleep(delay)


class S3Store:
    """An S3-compatible object store reached through the minio SDK."""

    def __init__(self, config: StoreConfig) -> None:
        import urllib3
        from minio import Minio

        self.config = config
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=120),
            retries=urllib3.Retry(total=0),
            ca_certs=config.ca_bundle,
            maxsize=8,
        )
        creds = config.credentials
        self.client = Minio(
            config.endpoint,
            access_key=creds.access_key if creds else None,
            secret_key=creds.secret_key if creds else None,
            secure=config.secure,
            region=config.region,
            http_client=http,
        )
        self._checked: set[str] = set()

    def _explain(self, exc: BaseException, bucket: str) -> StorageError:
        from minio.error import S3Error

        where = f"bucket {bucket!r} at {self.config.endpoint}"
        if isinstance(exc, S3Error):
            if exc.code == "NoSuchBucket":
                return StorageError(f"{where} does not exist: create it or fix the URI")
            if exc.code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}:
                return StorageError(
                    f"{where}: access refused ({exc.code}): check the access and secret key "
                    "in the Secret named by storage.secretRef"
                )
            if exc.code == "NoSuchKey":
                return StorageError(f"{where}: no object {exc.object_name!r}")
            return StorageError(f"{where}: {exc.code}: {exc.message}", permanent=False)
        return StorageError(
            f"cannot reach the object store at {self.config.endpoint} ({type(exc).__name__}: "
            f"{exc}); check storage.endpoint and storage.secure",
            permanent=False,
        )

    def _call(self, bucket: str, what: str, call: Callable[[], T]) -> T:
        try:
            return retry(call, what)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a StorageError
            raise self._explain(exc, bucket) from None

    def size(self, uri: str) -> int:
        return self.stat(uri)[0]

    def stat(self, uri: str) -> tuple[int, str]:
        bucket, key = split_s3(uri)
        stat = self._call(bucket, "stat", lambda: self.client.stat_object(bucket, key))
        return int(stat.size or 0), (stat.etag or "").strip('"')

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        bucket, key = split_s3(uri)

        def get() -> bytes:
            resp = self.client.get_object(bucket, key, offset=offset, length=length)
            try:
                return bytes(resp.read())
            finally:
                resp.close()
                resp.release_conn()

        data = self._call(bucket, "get", get)
        if len(data) != length:
            raise StorageError(f"{uri}: truncated (wanted {length} bytes at {offset})")
        return data

    def open_stream(self, uri: str, offset: int = 0) -> IO[bytes]:
        bucket, key = split_s3(uri)
        resp = self._call(bucket, "get", lambda: self.client.get_object(bucket, key, offset))
        return io.BufferedReader(_ResponseStream(resp), buffer_size=1 << 20)

    def get_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)

        def get() -> bytes:  # one GET, no stat: dataset images are many and small
            resp = self.client.get_object(bucket, key)
            try:
                return bytes(resp.read())
            finally:
                resp.close()
                resp.release_conn()

        return self._call(bucket, "get", get)

    def put_file(self, path: Path, uri: str) -> None:
        bucket, key = split_s3(uri)
        self._call(
            bucket,
            "put",
            lambda: self.client.fput_object(bucket, key, str(path), part_size=16 << 20),
        )

    def put_bytes(self, data: bytes, uri: str) -> None:
        bucket, key = split_s3(uri)
        self._call(
            bucket,
            "put",
            lambda: self.client.put_object(bucket, key, io.BytesIO(data), len(data)),
        )

    def list(self, uri_prefix: str) -> Iterator[str]:
        bucket, prefix = split_s3(uri_prefix)
        objects = self._call(
            bucket,
            "list",
            lambda: list(self.client.list_objects(bucket, prefix=prefix, recursive=True)),
        )
        for name in sorted(o.object_name for o in objects if o.object_name):
            yield f"s3://{bucket}/{name}"

    def list_info(self, uri_prefix: str) -> Iterator[ObjectInfo]:
        bucket, prefix = split_s3(uri_prefix)
        objects = self._call(
            bucket,
            "list",
            lambda: list(self.client.list_objects(bucket, prefix=prefix, recursive=True)),
        )
        found = (
            ObjectInfo(
                f"s3://{bucket}/{o.object_name}", int(o.size or 0), (o.etag or "").strip('"')
            )
            for o in objects
            if o.object_name
        )
        yield from sorted(found, key=lambda o: o.uri)

    def exists(self, uri: str) -> bool:
        from minio.error import S3Error

        bucket, key = split_s3(uri)
        try:
            retry(lambda: self.client.stat_object(bucket, key), "stat")
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject"}:
                return False
            raise self._explain(exc, bucket) from None
        except Exception as exc:  # noqa: BLE001 - every failure becomes a StorageError
            raise self._explain(exc, bucket) from None
        return True

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        self._call(bucket, "delete", lambda: self.client.remove_object(bucket, key))


class _ResponseStream(io.RawIOBase):
    """A urllib3 response as a readable, closable file object."""

    def __init__(self, resp: Any) -> None:
        self._resp = resp

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._resp.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._resp.close()
            self._resp.release_conn()
        super().close()


def open_store(uri: str, config: StoreConfig | None) -> Store:
    """The store that holds ``uri``: S3 for ``s3://`` URIs (needs ``config``), else local."""
    if is_s3(uri):
        if config is None:
            raise StorageError(f"{uri} is in an object store, but no storage.endpoint is set")
        return S3Store(config)
    return LocalStore()


# --------------------------------------------------------------------------------------------
# Atomic commit protocol
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with '/'."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class ManifestEntry:
    """One committed file: its name relative to the commit's prefix, size and sha256."""

    name: str
    size: int
    sha256: str


def commit(
    store: Store,
    prefix: str,
    files: dict[str, Path],
    metadata: dict[str, Any] | None = None,
    known_sha256: dict[str, str] | None = None,
) -> list[ManifestEntry]:
    """Upload ``files`` (name -> local path) under ``prefix``, then the manifest, last.

    A reader that finds no manifest treats the prefix as incomplete, so an interrupted commit is
    never mistaken for a finished one.
    """
    known = known_sha256 or {}
    entries = []
    for name, path in sorted(files.items()):
        digest = known.get(name) or sha256_file(path)
        store.put_file(path, join(prefix, name))
        entries.append(ManifestEntry(name=name, size=path.stat().st_size, sha256=digest))
    manifest = {
        "files": [e.__dict__ for e in entries],
        "metadata": metadata or {},
        "committed": time.time(),
    }
    store.put_bytes(json.dumps(manifest, indent=1).encode(), join(prefix, MANIFEST_NAME))
    return entries


def commit_file(
    store: Store, uri: str, path: Path, sha256: str, metadata: dict[str, Any] | None = None
) -> ManifestEntry:
    """Upload one file to ``uri``, then its manifest ``uri + '.manifest.json'``, last."""
    store.put_file(path, uri)
    entry = ManifestEntry(name=uri.rsplit("/", 1)[-1], size=path.stat().st_size, sha256=sha256)
    manifest = {"files": [entry.__dict__], "metadata": metadata or {}, "committed": time.time()}
    store.put_bytes(json.dumps(manifest, indent=1).encode(), uri + FILE_MANIFEST_SUFFIX)
    return entry


def read_manifest(store: Store, prefix: str) -> dict[str, Any] | None:
    """The manifest of a committed prefix, or None if the commit never finished."""
    uri = join(prefix, MANIFEST_NAME)
    if not store.exists(uri):
        return None
    manifest: dict[str, Any] = json.loads(store.read_range(uri, 0, store.size(uri)))
    return manifest


def scratch_dir(prefix: str = "difftrain-") -> Path:
    """A private temporary folder for files on their way to the store."""
    return Path(tempfile.mkdtemp(prefix=prefix))
