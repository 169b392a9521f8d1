"""Cleaning: every pair is kept or dropped for one named reason, and every drop is counted.

Every file of the dataset is counted once (an image and its caption file as one pair): files the
source does not read are reported under the reason the listing gave them (``unsupported_format``,
``orphan_caption``, ``missing_image``, ``not_in_metadata``; see :data:`REASONS`), so ``total`` is
always ``kept`` plus the sum of ``dropped``. Checks run in this order, and a pair is dropped for
the first that fails (so each pair has exactly one reason):

1. ``unsupported_format``: an image Pillow reads in a format difftrain does not train on;
   ``corrupt``: unreadable, truncated or not an image (a text file named ``.jpg``);
2. ``too_small``: the shorter side is under ``minResolution``;
3. ``extreme_aspect_ratio``: long side / short side over ``maxAspectRatio``;
4. ``missing_caption`` / ``empty_caption`` / ``short_caption``: no caption file or column, a
   blank caption, fewer than ``minCaptionWords`` words (``minCaptionWords: 0`` keeps all three,
   a missing caption becoming an empty one);
5. ``banned_words``: the caption contains a banned word or phrase (case-insensitive, whole words);
6. ``exact_duplicate``: the same bytes (sha256) as a pair kept earlier;
7. ``near_duplicate``: a perceptual hash (imagehash's pHash, 64 bits) within
   ``nearDuplicateDistance`` bits of a pair kept earlier.

Duplicates are only compared with pairs that were kept, in key order, so the first occurrence
wins and a copy of a dropped pair is not dropped for being a copy. Decoding and hashing run in a
thread pool (Pillow, hashlib and numpy release the GIL); the decisions are taken in key order in
one thread, so the result does not depend on the number of workers.

A kept animated or multi-page image is trained on its first frame and counted in
``notes["first_frame_only"]`` (with example keys), so nothing is changed without a word.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import imagehash
import numpy as np

from difftrain.api import CleaningSpec, DatasetReport, DatasetSpec
from difftrain.data.captions import caption_lines
from difftrain.data.images import SUPPORTED, ImageError, UnsupportedFormatError, decode
from difftrain.data.pairs import CleanPair, ImageFacts, RawPair
from difftrain.data.parallel import ordered_map
from difftrain.data.sources import iter_pairs
from difftrain.storage import FILE_MANIFEST_SUFFIX, Store, commit_file, join, scratch_dir

if TYPE_CHECKING:
    from difftrain.data.facts import CleaningFacts

logger = logging.getLogger(__name__)

REASONS: dict[str, str] = {
    "unsupported_format": f"neither an image ({SUPPORTED}) nor a caption this layout reads",
    "orphan_caption": "a caption file (or shard sample) without an image",
    "missing_image": "named by metadata.jsonl but not in the dataset",
    "not_in_metadata": "an image that no metadata.jsonl row names",
    "corrupt": "unreadable, truncated or not an image",
    "too_small": "shorter side under cleaning.minResolution",
    "extreme_aspect_ratio": "long side / short side over cleaning.maxAspectRatio",
    "missing_caption": "no caption file or column",
    "empty_caption": "blank caption",
    "short_caption": "fewer words than cleaning.minCaptionWords",
    "banned_words": "caption contains one of cleaning.bannedWords",
    "exact_duplicate": "same bytes as a pair kept earlier",
    "near_duplicate": "perceptual hash within cleaning.nearDuplicateDistance of a kept pair",
}
# Kept pairs used with a change the user should know of.
NOTES: dict[str, str] = {
    "first_frame_only": "animated or multi-page image: only its first frame is trained",
}
MAX_EXAMPLES = 5
MAX_KEY_LENGTH = 253  # DatasetReport.examples entries are ShortText
REPORT_NAME = "dataset_report.json"
# pHash works on a 32x32 greyscale thumbnail: decode no larger than needed (JPEG DCT scaling).
HASH_DECODE_SIZE = (64, 64)


@dataclass
class CleaningResult:
    """The kept pairs (in key order), the report and the first keys dropped for each reason."""

    pairs: list[CleanPair]
    report: DatasetReport
    examples: dict[str, list[str]] = field(default_factory=dict)
    tokens_counted: bool = False  # whether captions were measured against the encoder's context


@dataclass(frozen=True)
class _Probe:
    """What the worker threads learn about one pair."""

    pair: RawPair
    sha256: str
    error: str | None = None
    reason: str | None = None  # why it cannot be used at all (with error): a key of REASONS
    width: int = 0
    height: int = 0
    phash: int | None = None
    frames: int = 1


def _probe(pair: RawPair, *, with_phash: bool) -> _Probe:
    if pair.skipped is not None:  # counted from the listing, never read
        return _Probe(pair, "", error=REASONS[pair.skipped], reason=pair.skipped)
    if pair.facts is not None:  # seen in an earlier run, unchanged: its facts, not its bytes
        f = pair.facts
        return _Probe(
            pair,
            f.sha256,
            error=f.error,
            reason=f.reason,
            width=f.width,
            height=f.height,
            phash=f.phash,
            frames=f.frames,
        )
    digest = hashlib.sha256(pair.data).hexdigest()
    try:
        decoded = decode(pair.data, pair.name, draft=HASH_DECODE_SIZE)
    except UnsupportedFormatError as exc:
        return _Probe(pair, digest, error=str(exc), reason="unsupported_format")
    except ImageError as exc:
        return _Probe(pair, digest, error=str(exc), reason="corrupt")
    phash = None
    if with_phash:
        bits = imagehash.phash(decoded.image).hash.flatten()
        phash = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return _Probe(
        pair,
        digest,
        width=decoded.width,
        height=decoded.height,
        phash=phash,
        frames=decoded.frames,
    )


def _learn(facts: CleaningFacts, probe: _Probe) -> None:
    """Keep what was learnt from an image read in this run, by its object version."""
    pair = probe.pair
    if pair.facts is not None or not pair.version or pair.skipped is not None:
        return
    facts.add_image(
        pair.version,
        ImageFacts(
            sha256=probe.sha256,
            width=probe.width,
            height=probe.height,
            phash=probe.phash,
            error=probe.error,
            reason=probe.reason,
            frames=probe.frames,
        ),
    )


class HammingIndex:
    """A BK-tree over 64-bit hashes: "is any stored hash within d bits?" without comparing
    against every stored hash (the triangle inequality prunes whole subtrees)."""

    def __init__(self) -> None:
        self._root: tuple[int, dict[int, object]] | None = None

    def add(self, value: int) -> None:
        if self._root is None:
            self._root = (value, {})
            return
        node = self._root
        while True:
            distance = (node[0] ^ value).bit_count()
            if distance == 0:
                return
            child = node[1].get(distance)
            if child is None:
                node[1][distance] = (value, {})
                return
            node = child  # type: ignore[assignment]

    def nearest_within(self, value: int, limit: int) -> int | None:
        """A stored hash within ``limit`` bits of ``value``, or None."""
        stack = [self._root] if self._root is not None else []
        while stack:
            node = stack.pop()
            assert node is not None
            distance = (node[0] ^ value).bit_count()
            if distance <= limit:
                return node[0]
            for edge, child in node[1].items():
                if distance - limit <= edge <= distance + limit:
                    stack.append(child)  # type: ignore[arg-type]
        return None


def _banned_pattern(words: list[str]) -> re.Pattern[str] | None:
    if not words:
        return None
    # Whole words or phrases: not preceded or followed by a word character.
    alternatives = "|".join(re.escape(w.strip()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


class _Cleaner:
    def __init__(self, spec: CleaningSpec, lines: str = "alternatives") -> None:
        self.spec = spec
        self.lines = lines  # dataset.captions.lines: how a caption's lines are read
        self.banned = _banned_pattern([w for w in spec.banned_words if w.strip()])
        self.hashes: set[str] = set()
        self.near = HammingIndex()

    def verdict(self, probe: _Probe) -> tuple[str | None, tuple[str, ...]]:
        """(reason or None, the captions to keep). Each of an image's captions is checked; one
        that fails drops the pair (its image goes with that caption)."""
        spec = self.spec
        if probe.reason is not None:
            return probe.reason, ()
        short, long = sorted((probe.width, probe.height))
        if short < spec.min_resolution:
            return "too_small", ()
        if long / short > spec.max_aspect_ratio:
            return "extreme_aspect_ratio", ()
        captions = caption_lines(probe.pair.caption, self.lines)
        if spec.min_caption_words > 0:
            if probe.pair.caption is None:
                return "missing_caption", ()
            if not captions:
                return "empty_caption", ()
            if any(len(c.split()) < spec.min_caption_words for c in captions):
                return "short_caption", ()
        if self.banned is not None and any(self.banned.search(c) for c in captions):
            return "banned_words", ()
        if spec.drop_exact_duplicates and probe.sha256 in self.hashes:
            return "exact_duplicate", ()
        if probe.phash is not None and (
            self.near.nearest_within(probe.phash, spec.near_duplicate_distance) is not None
        ):
            return "near_duplicate", ()
        self.hashes.add(probe.sha256)
        if probe.phash is not None:
            self.near.add(probe.phash)
        return None, tuple(captions) or ("",)


def clean(
    pairs: Iterable[RawPair],
    spec: CleaningSpec,
    *,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
    limit: int | None = None,
    progress: Callable[[int], object] | None = None,
    workers: int = 2,
    lines: str = "alternatives",
    facts: CleaningFacts | None = None,
) -> CleaningResult:
    """Keep or drop each pair (see the module's docstring); stop once ``limit`` pairs are kept.

    Pairs hold their image bytes only on their way through (a bounded window of them at a
    time): the kept pairs carry none, so memory does not grow with the images' sizes. With
    ``facts``, what is learnt from each image read is added to them for later runs.

    ``count_tokens``/``max_tokens``: captions longer than the text encoder's context are kept
    (the encoder truncates them) and counted in ``report.truncatedCaptions``. ``progress`` is
    called with the number of pairs examined so far. ``lines``: how a caption's lines are read
    (``dataset.captions.lines``, see :func:`difftrain.data.captions.caption_lines`).
    """
    cleaner = _Cleaner(spec, lines)
    probe = partial(_probe, with_phash=spec.near_duplicate_distance > 0)
    kept: list[CleanPair] = []
    dropped: dict[str, int] = {}
    notes: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    truncated = seen = 0

    def example(name: str, key: str) -> None:
        keys = examples.setdefault(name, [])
        if len(keys) < MAX_EXAMPLES:
            keys.append(key[:MAX_KEY_LENGTH])

    probes: Iterator[_Probe] = ordered_map(probe, pairs, workers=workers, name="difftrain-clean")
    try:
        for result in probes:
            seen += 1
            if facts is not None:
                _learn(facts, result)
            reason, captions = cleaner.verdict(result)
            pair = result.pair
            if reason is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
                example(reason, pair.key)
                logger.debug(
                    "pair dropped",
                    extra={"key": pair.key, "reason": reason, "detail": result.error or ""},
                )
            else:
                if count_tokens is not None and max_tokens is not None:
                    truncated += any(count_tokens(c) > max_tokens for c in captions)
                if result.frames > 1:
                    notes["first_frame_only"] = notes.get("first_frame_only", 0) + 1
                    example("first_frame_only", pair.key)
                kept.append(
                    CleanPair(
                        key=pair.key,
                        name=pair.name,
                        caption=captions[0],
                        width=result.width,
                        height=result.height,
                        sha256=result.sha256,
                        span=pair.span,
                        other_captions=captions[1:],
                    )
                )
            if progress is not None:
                progress(seen)
            if limit is not None and len(kept) >= limit:
                break
    finally:
        close = getattr(probes, "close", None)
        if close is not None:
            close()
    ordered = {r: dropped[r] for r in REASONS if r in dropped}
    noted = {n: notes[n] for n in NOTES if n in notes}
    report = DatasetReport(
        total=seen,
        kept=len(kept),
        dropped=ordered,
        notes=noted,
        truncated_captions=truncated,
        examples={r: examples[r] for r in (*ordered, *noted)},
    )
    logger.info(
        "dataset cleaned", extra={"total": seen, "kept": len(kept), "dropped": json.dumps(ordered)}
    )
    counted = count_tokens is not None and max_tokens is not None
    return CleaningResult(kept, report, report.examples, tokens_counted=counted)


def load_dataset(
    spec: DatasetSpec,
    store: Store,
    *,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
    progress: Callable[[int], object] | None = None,
    workers: int = 2,
    read_workers: int = 8,
    facts: CleaningFacts | None = None,
) -> CleaningResult:
    """Read (:func:`iter_pairs`) and clean (:func:`clean`) a dataset, honouring ``spec.limit``.

    With ``facts`` (:mod:`difftrain.data.facts`) objects seen in an earlier run are judged by
    what was learnt from them then, without being downloaded, and new ones are learnt.
    """
    return clean(
        iter_pairs(spec, store, workers=read_workers, facts=facts),
        spec.cleaning,
        count_tokens=count_tokens,
        max_tokens=max_tokens,
        limit=spec.limit,
        progress=progress,
        workers=workers,
        lines=spec.captions.lines,
        facts=facts,
    )


def write_report(store: Store, prefix: str, result: CleaningResult) -> str:
    """Commit the report (JSON, with the examples) under ``prefix``; return its URI."""
    uri = join(prefix, REPORT_NAME)
    data = json.dumps({"report": result.report.to_wire()}, indent=1).encode()
    folder = scratch_dir()
    path = folder / REPORT_NAME
    try:
        path.write_bytes(data)
        commit_file(store, uri, path, hashlib.sha256(data).hexdigest())
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()
    return uri


def read_report(store: Store, prefix: str) -> DatasetReport | None:
    """The report committed under ``prefix`` by :func:`write_report`, or None."""
    uri = join(prefix, REPORT_NAME)
    if not store.exists(uri + FILE_MANIFEST_SUFFIX):  # no manifest: never committed, or half
        return None
    doc = json.loads(store.get_bytes(uri))
    return DatasetReport.model_validate(doc["report"])


def format_report(result: CleaningResult) -> str:
    """The report as a table: totals, then each drop reason with its count and first keys."""
    report = result.report
    width = max(len(r) for r in REASONS) + 4
    lines = [
        f"{'total':<{width}}{report.total:>8}",
        f"{'kept':<{width}}{report.kept:>8}",
        f"{'dropped':<{width}}{sum(report.dropped.values()):>8}",
    ]
    for reason, count in report.dropped.items():
        lines.append(_reason_line(reason, count, result.examples, width))
    for note, count in report.notes.items():
        lines.append(_reason_line(note, count, result.examples, width, indent=""))
    if result.tokens_counted:  # without the model's tokenizer there is nothing to report
        lines.append(f"{'truncated captions':<{width}}{report.truncated_captions:>8}")
    if report.augmented:
        lines.append(f"{'augmented':<{width}}{report.augmented:>8}")
    meanings = {**REASONS, **NOTES}
    shown = [r for r in (*report.dropped, *report.notes) if r in meanings]
    if shown:
        lines.append("")
        lines.extend(f"{r}: {meanings[r]}" for r in shown)
    return "\n".join(lines)


def _reason_line(
    name: str, count: int, examples: dict[str, list[str]], width: int, indent: str = "  "
) -> str:
    keys = ", ".join(examples.get(name, []))
    if count > len(examples.get(name, [])):
        keys += ", ..."
    label = f"{indent}{name}"
    return f"{label:<{width}}{count:>8}   {_shorten(keys, 70)}"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
