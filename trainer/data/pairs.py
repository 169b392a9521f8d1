"""The records that flow through the dataset pipeline, and its errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DatasetError(ValueError):
    """A dataset that cannot be read as configured; the message names the location and the fix."""


Span = tuple[int, int]  # (offset, length) of an image's bytes inside an uncompressed tar shard


@dataclass(frozen=True)
class ImageFacts:
    """What cleaning learns from an image's bytes: enough to judge it again without them."""

    sha256: str
    width: int = 0
    height: int = 0
    phash: int | None = None  # 64-bit pHash; None when it was not computed
    error: str | None = None  # why the bytes are not a usable image
    reason: str | None = None  # with error: the cleaning reason (corrupt, unsupported_format)
    frames: int = 1  # frames or pages (an animated image is trained on its first)


@dataclass(frozen=True)
class RawPair:
    """One image and its caption as found in the dataset, before any check.

    ``data`` is empty when ``facts`` are known from an earlier run for this ``version`` of the
    object (:mod:`difftrain.data.facts`): cleaning judges the pair without its bytes.
    """

    key: str  # unique, stable: the path relative to dataset.uri without extension
    name: str  # the file (or shard member) the user recognises
    data: bytes  # encoded image bytes (b"" when not read)
    caption: str | None  # None when the pair has no caption file or column
    version: str = ""  # the image object's version key (difftrain.data.facts); "" unknown
    facts: ImageFacts | None = None  # known from an earlier run: the bytes were not read
    span: Span | None = None  # where the bytes are inside an uncompressed tar shard
    # Set when the file is counted but never read: a reason of cleaning.REASONS decided from the
    # listing (unsupported_format, orphan_caption, missing_image, not_in_metadata).
    skipped: str | None = None


@dataclass(frozen=True)
class CleanPair:
    """A pair that passed cleaning, with the image's upright size and content hash.

    A dataset's pairs do not hold their image bytes: they are read again by ``name`` (and
    ``span``) when a sample is encoded or trained on (:mod:`difftrain.data.image_bytes`), so
    memory does not grow with the dataset. Pairs made in memory (Boomerang variants, DreamBooth
    class images) carry theirs in ``data``.
    """

    key: str
    name: str
    caption: str
    width: int
    height: int
    sha256: str
    span: Span | None = None
    data: bytes = b""
    other_captions: tuple[str, ...] = ()  # the image's further captions (caption tools)

    @property
    def captions(self) -> tuple[str, ...]:
        """Every caption of the image, the one in ``caption`` first."""
        return (self.caption, *self.other_captions)


def caption_text(data: bytes) -> str:
    """A caption file's text: UTF-8 (undecodable bytes replaced), BOM and outer space removed."""
    return data.decode("utf-8", errors="replace").removeprefix("\ufeff").strip()


def caption_value(value: Any) -> str | None:
    """A caption from a JSON field: a string, or a list's strings one per line (several captions
    per image, like a caption file's lines: see difftrain.data.captions.caption_lines), or None."""
    if isinstance(value, list):
        strings = [v.strip() for v in value if isinstance(v, str)]
        return "\n".join(v for v in strings if v) if strings else None
    if value is None:
        return None
    return str(value).strip()
