"""A store that counts its reads: the real store's read path, with a count per object."""

from __future__ import annotations

from collections import Counter
from typing import IO, Any

from difftrain.data.cache import CACHE_FOLDER


class CountsReads:
    """Mixed into a real store class (``class S(CountsReads, S3Store)``): counts every read of
    each object, whole, ranged or streamed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: Counter[str] = Counter()

    def get_bytes(self, uri: str) -> bytes:
        self.reads[uri] += 1
        return super().get_bytes(uri)  # type: ignore[misc, no-any-return]

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        self.reads[uri] += 1
        return super().read_range(uri, offset, length)  # type: ignore[misc, no-any-return]

    def open_stream(self, uri: str, offset: int = 0) -> IO[bytes]:
        self.reads[uri] += 1
        return super().open_stream(uri, offset)  # type: ignore[misc, no-any-return]

    def dataset_reads(self) -> dict[str, int]:
        """Reads of the dataset's own objects (not of the cache beside it)."""
        return {u: n for u, n in self.reads.items() if f"/{CACHE_FOLDER}/" not in u}
