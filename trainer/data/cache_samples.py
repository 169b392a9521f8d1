"""Cached samples and the shard files that hold their tensors.

A shard is a safetensors file of named tensors: ``latent/<address>`` (the VAE's mean and
log-variance), ``flipped/<address>`` (the mirrored image's, when flips are cached) and
``text/<address>`` (the text encoder's last hidden state); for SDXL also ``pooled/<address>``
beside each text (the pooled embedding) and ``sizes/<address>`` beside each latent (the time ids
of the image and of its mirror: original size, crop corner, target size). A sample reads its
tensors from the shards that hold them, in memory or memory-mapped from a verified local copy.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

LATENT, FLIPPED, TEXT = "latent", "flipped", "text"
POOLED, SIZES = "pooled", "sizes"


def tensor_name(kind: str, address: str) -> str:
    return f"{kind}/{address}"


class ShardFile:
    """A cache shard on local disk whose tensors are read on demand (safetensors memory-maps it).

    The pages are the operating system's page cache, shared by every process on the machine,
    instead of a copy of the whole cache in each process's memory.
    """

    def __init__(self, path: Path, names: set[str]) -> None:
        self.path = path
        self.names = names
        self._lock = threading.Lock()  # one handle, shared by the loop and a prefetch thread
        self._handle: Any = None

    def get(self, name: str) -> torch.Tensor:
        with self._lock:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            tensor: torch.Tensor = self._handle.get_tensor(name)
            return tensor


class ShardInMemory:
    """A shard's tensors loaded into memory."""

    def __init__(self, data: bytes) -> None:
        self.tensors: dict[str, torch.Tensor] = load_safetensors(data)
        self.names = set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


Shard = ShardFile | ShardInMemory
Ref = tuple[Shard, str] | torch.Tensor | None


def _resolve(ref: Ref) -> torch.Tensor | None:
    if ref is None or isinstance(ref, torch.Tensor):
        return ref
    shard, name = ref
    return shard.get(name)


class CachedSample:
    """One training example, encoded: its tensors held, or read from their shards on each access
    (never kept)."""

    __slots__ = ("_flipped", "_latent", "_pooled", "_sizes", "_text", "caption", "key")

    def __init__(
        self,
        key: str,
        caption: str,
        latent_params: Ref,
        latent_params_flipped: Ref = None,
        text_embeddings: Ref = None,
        pooled: Ref = None,
        sizes: Ref = None,
    ) -> None:
        if latent_params is None:
            raise ValueError("a cached sample needs its latents")
        self.key = key
        self.caption = caption
        self._latent = latent_params
        self._flipped = latent_params_flipped
        self._text = text_embeddings
        self._pooled = pooled
        self._sizes = sizes

    @property
    def latent_params(self) -> torch.Tensor:
        """(2C, h, w): the VAE's mean and log-variance, unscaled."""
        tensor = _resolve(self._latent)
        assert tensor is not None
        return tensor

    @property
    def latent_params_flipped(self) -> torch.Tensor | None:
        """The mirrored image's, when flips are cached."""
        return _resolve(self._flipped)

    @property
    def text_embeddings(self) -> torch.Tensor | None:
        """(tokens, D): the text encoder's last hidden state; None when texts are not cached."""
        return _resolve(self._text)

    @property
    def pooled(self) -> torch.Tensor | None:
        """(P,): SDXL's pooled text embedding, cached beside the text."""
        return _resolve(self._pooled)

    @property
    def sizes(self) -> torch.Tensor | None:
        """(views, 6): SDXL's time ids of the cached view and (second row) of its mirror."""
        return _resolve(self._sizes)


def write_shard(tensors: Mapping[str, torch.Tensor], path: Path, *, rank: int = 0) -> None:
    """Write named tensors as one shard; ``rank`` (which process encoded it) is informational."""
    metadata = {"format": "difftrain-latent-cache/2", "rank": str(rank)}
    save_file(dict(tensors), str(path), metadata=metadata)


def shard_names(path: Path) -> set[str]:
    """The tensor names in a shard file (its header only)."""
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    return set(header)


def shard_metadata(path: Path) -> dict[str, str]:
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        metadata: dict[str, str] = json.loads(fh.read(header_len)).get("__metadata__", {})
    return metadata
