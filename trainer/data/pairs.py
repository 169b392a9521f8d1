"""The records that flow through the dataset pipeline, and its errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DatasetError(ValueError):
    """A dataset that cannot be read as configured; the message names the location and the fix."""


@dataclass(frozen=True)
class RawPair:
    """One image and its caption as found in the dataset, before any check."""

    key: str  # unique, stable: the path relative to dataset.uri without extension
    name: str  # the file (or shard member) the user recognises
    data: bytes  # encoded image bytes
    caption: str | None  # None when the pair has no caption file or column
    # Set when the file is counted but never read: a reason of cleaning.REASONS decided from the
    # listing (unsupported_format, orphan_caption, missing_image, not_in_metadata).
    skipped: str | None = None


@dataclass(frozen=True)
class CleanPair:
    """A pair that passed cleaning, with the image's upright size and content hash."""

    key: str
    name: str
    data: bytes
    caption: str
    width: int
    height: int
    sha256: str


def caption_text(data: bytes) -> str:
    """A caption file's text: UTF-8 (undecodable bytes replaced), BOM and outer space removed."""
    return data.decode("utf-8", errors="replace").removeprefix("\ufeff").strip()


def caption_value(value: Any) -> str | None:
    """A caption from a JSON field: a string, the first string of a list, or None."""
    if isinstance(value, list):  # several captions per image: the first one
        value = next((v for v in value if isinstance(v, str)), None)
    if value is None:
        return None
    return str(value).strip()
