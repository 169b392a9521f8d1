"""Streaming safetensors: read one tensor at a time, write one tensor at a time.

No memory map: a mapped 2 GB file counts fully in the process's resident set once touched, which
defeats bounded-memory merging. Inputs are read with ranged reads (local ``pread`` or HTTP range
requests) through :mod:`difftrain.storage`; while tensors are read in file order, a forward stream
feeds the input's sha256 at the same time, so hashing costs no second pass over the input.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from difftrain.storage import Store

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER = 100 << 20
MAX_PENDING_HASH = 128 << 20


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """The parsed header of a safetensors file."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(store: Store, uri: str) -> Header:
    """Parse a safetensors header with two small ranged reads."""
    size = store.size(uri)
    if size < 8:
        raise SafetensorsError(f"{uri}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", store.read_range(uri, 0, 8))
    if n > MAX_HEADER or 8 + n > size:
        raise SafetensorsError(f"{uri}: not a safetensors file (header length {n} is invalid)")
    try:
        raw = json.loads(store.read_range(uri, 8, n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(
            f"{uri}: not a safetensors file (header is not JSON: {exc})"
        ) from None
    if not isinstance(raw, dict):
        raise SafetensorsError(f"{uri}: not a safetensors file (header is not a JSON object)")
    metadata = raw.pop("__metadata__", None) or {}
    start = 8 + n
    tensors = {}
    for name, info in raw.items():
        try:
            begin, end = info["data_offsets"]
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{uri}: tensor {name!r} has a malformed entry") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"{uri}: tensor {name!r} has unsupported dtype {dtype}")
        if not 0 <= begin <= end or start + end > size:
            raise SafetensorsError(f"{uri}: tensor {name!r} lies outside the file (truncated?)")
        tensors[name] = TensorInfo(name, dtype, shape, start + begin, start + end)
    return Header(tensors=tensors, metadata=dict(metadata), data_start=start, file_size=size)


def to_tensor(info: TensorInfo, data: bytearray) -> torch.Tensor:
    """Bytes of one tensor as a tensor, sharing the (caller-owned, writable) buffer."""
    dtype = DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    flat = torch.frombuffer(data, dtype=dtype)
    return flat.reshape(info.shape)


class TensorReader:
    """Reads the tensors of one safetensors file, hashing the whole file along the way.

    Tensors requested in file order are served from one forward stream, and every byte that passes
    feeds the sha256; a tensor requested out of order is fetched with a ranged read instead.
    ``finish()`` drains what is left and returns the file's sha256.
    """

    def __init__(
        self, store: Store, uri: str, header: Header | None = None, sha256: str | None = None
    ) -> None:
        self.store = store
        self.uri = uri
        self.header = header or read_header(store, uri)
        self._known = sha256  # from the input's manifest: no need to hash again
        self._digest = hashlib.sha256()
        # hashing runs on its own thread (hashlib releases the GIL), in stream order
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._pending: list[tuple[Future[None], int]] = []
        self._pending_bytes = 0
        self._stream: IO[bytes] | None = None
        self._pos = 0  # bytes of the file read from the stream so far

    def _hash(self, block: memoryview) -> None:
        if self._known is None:
            self._pending.append((self._hasher.submit(self._digest.update, block), len(block)))
            self._pending_bytes += len(block)
            while self._pending_bytes > MAX_PENDING_HASH:  # bound the buffers kept for hashing
                done, size = self._pending.pop(0)
                done.result()
                self._pending_bytes -= size

    def _advance(self, upto: int, keep_from: int | None = None) -> bytearray | None:
        """Read the stream up to ``upto``; return the bytes from ``keep_from`` on."""
        if self._stream is None:
            self._stream = self.store.open_stream(self.uri, 0)
        kept = bytearray(upto - keep_from) if keep_from is not None else None
        while self._pos < upto:
            if kept is not None and keep_from is not None and self._pos >= keep_from:
                view = memoryview(kept)[self._pos - keep_from :]
                n = self._stream.readinto(view)  # type: ignore[attr-defined]
                block = view[:n]
            else:
                stop = keep_from if keep_from is not None else upto
                block = memoryview(self._stream.read(min(8 << 20, stop - self._pos)))
                n = len(block)
            if not n:
                raise SafetensorsError(f"{self.uri}: ended early at byte {self._pos}")
            self._hash(block)
            self._pos += n
        return kept

    def read(self, name: str) -> torch.Tensor:
        """One tensor by name."""
        info = self.header.tensors[name]
        if info.begin >= self._pos:
            data = self._advance(info.end, keep_from=info.begin)
            assert data is not None
        else:
            data = bytearray(self.store.read_range(self.uri, info.begin, info.nbytes))
        return to_tensor(info, data)

    def finish(self) -> str:
        """The file's sha256 (reads what was not read yet, unless it was known)."""
        if self._known is not None:
            self.close()
            return self._known
        self._advance(self.header.file_size)
        for pending, _size in self._pending:
            pending.result()
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        self._hasher.shutdown(wait=True)
        if self._stream is not None:
            self._stream.close()
            self._stream = None


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the writer will receive: name, dtype code and shape (known before any data)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * DTYPES[self.dtype].itemsize


class StreamingWriter:
    """Writes a safetensors file tensor by tensor, in the order its layout was declared.

    The header is written first, so every tensor's dtype and shape must be known up front (they
    are: a merge's output layout follows from its inputs' headers). Metadata values may hold
    placeholders that are patched in place once known (``patch``), keeping the header's length.
    """

    def __init__(
        self,
        path: Path,
        layout: Iterable[OutputTensor],
        metadata: dict[str, str],
        hash_inline: bool = False,
    ) -> None:
        self.path = path
        self.layout = list(layout)
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for t in self.layout:
            header[t.name] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes, as safetensors writes it
        self.header_bytes = blob
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        # With a final header the file's sha256 is computed while it is written, on a thread of
        # its own; with placeholders to patch it has to be hashed afterwards.
        self._digest = hashlib.sha256() if hash_inline else None
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256-out")
        self._pending: list[Future[None]] = []
        self._emit(struct.pack("<Q", len(blob)))
        self._emit(blob)
        self._next = 0

    def _emit(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        if self._digest is not None:
            self._pending.append(self._hasher.submit(self._digest.update, data))
            if len(self._pending) > 8:
                self._pending.pop(0).result()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the declared layout."""
        expected = self.layout[self._next]
        if name != expected.name:
            raise ValueError(f"wrote {name!r} where the layout expects {expected.name!r}")
        data = tensor.detach().to(DTYPES[expected.dtype]).contiguous().cpu()
        if tuple(data.shape) != expected.shape:
            raise ValueError(f"{name}: shape {tuple(data.shape)} != declared {expected.shape}")
        if data.numel():
            self._emit(data.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def patch(self, placeholder: str, value: str) -> None:
        """Replace a metadata placeholder by a value of the same length."""
        old, new = json.dumps(placeholder)[1:-1].encode(), json.dumps(value)[1:-1].encode()
        if len(old) != len(new):
            raise ValueError("a patched metadata value must keep the placeholder's length")
        if self._digest is not None:
            raise ValueError("an inline-hashed file cannot be patched")
        at = self.header_bytes.find(old)
        if at < 0:
            raise ValueError(f"placeholder {placeholder!r} not in the header")
        here = self._fh.tell()
        self._fh.seek(8 + at)
        self._fh.write(new)
        self._fh.seek(here)
        self.header_bytes = self.header_bytes.replace(old, new, 1)

    def close(self) -> str | None:
        """Finish the file; returns its sha256 when it was hashed inline."""
        if self._next != len(self.layout):
            missing = self.layout[self._next].name
            self.abort()
            raise ValueError(f"output incomplete: {missing!r} was never written")
        self._fh.close()
        for pending in self._pending:
            pending.result()
        self._hasher.shutdown()
        return self._digest.hexdigest() if self._digest is not None else None

    def abort(self) -> None:
        """Stop writing and remove the partial file."""
        self._fh.close()
        self._hasher.shutdown(cancel_futures=True)
        self.path.unlink(missing_ok=True)
