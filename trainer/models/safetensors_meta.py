"""Writing safetensors files with metadata, and adding metadata to files already written."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save_file

from difftrain.models.errors import ModelError


def _check(metadata: dict[str, str]) -> dict[str, str]:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ModelError(f"export metadata must map strings to strings; not so for {bad[:3]}")
    return metadata


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Write ``tensors`` with ``metadata`` atomically (a partial file never has the final name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    # tensors that share storage (tied weights, views) must be separate for safetensors
    owned = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(owned, str(partial), metadata=_check(metadata))
    os.replace(partial, path)


# a safetensors header is JSON of names, dtypes, shapes and offsets: a few MB even for SDXL
MAX_HEADER_BYTES = 100 << 20


def read_header(stream: IO[bytes], where: str) -> dict[str, Any]:
    """The JSON header at the start of a safetensors stream (only its first bytes are read)."""
    head = stream.read(8)
    if len(head) < 8:
        raise ModelError(f"{where}: not a readable safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES:
        raise ModelError(f"{where}: not a readable safetensors file (a {length}-byte header)")
    try:
        header = json.loads(stream.read(length))
    except ValueError as exc:
        raise ModelError(
            f"{where}: not a readable safetensors file (a header that is not JSON)"
        ) from exc
    if not isinstance(header, dict):
        raise ModelError(f"{where}: not a readable safetensors file (a header that is no object)")
    return header


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty when it has none)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return dict(header.get("__metadata__") or {})


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Merge ``metadata`` into a safetensors file's header; the tensor bytes are copied as they are.

    Offsets in a safetensors header are relative to the end of the header, so a header of another
    length needs no change to them.
    """
    _check(metadata)
    partial = path.with_name(f".{path.name}.part")
    with path.open("rb") as src:
        (length,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(length))
        header["__metadata__"] = {**(header.get("__metadata__") or {}), **metadata}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned, as writers do
        with partial.open("wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            shutil.copyfileobj(src, out, 8 << 20)
    os.replace(partial, path)
