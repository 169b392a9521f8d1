"""Local copies of a remote dataset's images, made as cleaning reads them.

Cleaning reads every image it has not judged before; without copies, the images a job then needs
(to encode the latent cache's missing samples, to make Boomerang variants and, without the cache,
every batch of every epoch) are downloaded again. :class:`ImageCopies` wraps the dataset's store:
an image read whole (:meth:`get_bytes`, as cleaning and the sources read them) is also written to
a folder of the work directory, named by the hash of its URI, and
:func:`difftrain.data.image_bytes.read_image` reads a kept pair from there when the copy's sha256
is the one cleaning judged (any other copy is ignored and the store read, so a stale or partial
copy is never used). Cleaning itself always reads the store, so a copy left by an earlier attempt
in the same folder never stands in for a changed object.

Copies stop (and the store is read as before) once they would pass ``limit`` bytes or leave less
than half of the folder's free space at the start: a dataset larger than the scratch volume still
trains. Processes on one machine share the folder: each reads the copies the others wrote (each
file is written under a temporary name and renamed into place).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from difftrain.data.images import EXTENSIONS
from difftrain.storage import ObjectInfo, Store

# The share of a pod's ephemeral-storage limit (DIFFTRAIN_SCRATCH_LIMIT, from the downward API)
# copies may take: the rest is for the model, the latent cache's shards and checkpoints.
SCRATCH_SHARE = 0.25
SCRATCH_ENV = "DIFFTRAIN_SCRATCH_LIMIT"


def copies_limit(folder: Path, environ: dict[str, str] | None = None) -> int:
    """The bytes copies may take in ``folder``: half of its free space, and at most
    :data:`SCRATCH_SHARE` of the pod's ephemeral-storage limit where the pod says it."""
    folder.mkdir(parents=True, exist_ok=True)
    limit = shutil.disk_usage(folder).free // 2
    scratch = (os.environ if environ is None else environ).get(SCRATCH_ENV, "")
    if scratch.isdigit() and int(scratch) > 0:
        limit = min(limit, int(int(scratch) * SCRATCH_SHARE))
    return limit


class ImageCopies:
    """A :class:`~difftrain.storage.Store` that keeps local copies of the images it reads."""

    def __init__(self, store: Store, folder: Path, limit: int) -> None:
        self.store = store
        self.folder = folder
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, uri: str) -> Path:
        digest = hashlib.sha256(uri.encode()).hexdigest()
        return self.folder / digest[:2] / digest

    def copy_of(self, uri: str, sha256: str) -> bytes | None:
        """The copy of ``uri`` if there is one with that content, else None."""
        try:
            data = self.path(uri).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha256 else None

    def _keep(self, uri: str, data: bytes) -> None:
        with self._lock:
            if self._used + len(data) > self.limit:
                return
            self._used += len(data)
        path = self.path(uri)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            path.parent.mkdir(exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:  # a full or read-only disk: the store is read instead
            tmp.unlink(missing_ok=True)

    # The Store interface: whole images read are kept; everything else as the store does it.
    def get_bytes(self, uri: str) -> bytes:
        data = self.store.get_bytes(uri)
        if uri.lower().endswith(EXTENSIONS):
            self._keep(uri, data)
        return data

    def size(self, uri: str) -> int:
        return self.store.size(uri)

    def stat(self, uri: str) -> tuple[int, str]:
        return self.store.stat(uri)

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        return self.store.read_range(uri, offset, length)

    def open_stream(self, uri: str, offset: int = 0) -> IO[bytes]:
        return self.store.open_stream(uri, offset)

    def put_file(self, path: Path, uri: str) -> None:
        self.store.put_file(path, uri)

    def put_bytes(self, data: bytes, uri: str) -> None:
        self.store.put_bytes(data, uri)

    def list(self, uri_prefix: str) -> Iterator[str]:
        return self.store.list(uri_prefix)

    def list_info(self, uri_prefix: str) -> Iterator[ObjectInfo]:
        return self.store.list_info(uri_prefix)

    def exists(self, uri: str) -> bool:
        return self.store.exists(uri)

    def delete(self, uri: str) -> None:
        self.store.delete(uri)


def with_copies(store: Store, work_dir: Path) -> Store:
    """``store`` with local copies of its images under ``work_dir``; a local dataset is read
    where it is (a copy would only double its reads)."""
    from difftrain.storage import LocalStore

    if isinstance(store, LocalStore):
        return store
    folder = work_dir / "image-copies"
    return ImageCopies(store, folder, copies_limit(folder))
