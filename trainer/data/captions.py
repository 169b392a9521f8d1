"""Caption tools: which caption an example trains with, in a given epoch.

An image may have several captions (the non-empty lines of its caption, see :func:`caption_lines`);
each epoch one of them is drawn, every one in turn: the epochs are taken in cycles as long as the
image has captions, and each cycle visits the captions in an order shuffled for that cycle. The
drawn caption's tags (the parts between ``separator``\\ s) may then be shuffled and dropped, the
first ``keep_tokens`` tags staying first and in order, never dropped (kohya's ``keep_tokens``).
Last, DreamBooth's instance prompt is applied as a template (``{caption}`` is the drawn caption;
a template without it replaces the caption).

Every draw comes from a generator seeded by (seed, epoch, example index), so the same run
resumed at a data position draws the same captions; nothing here holds state.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difftrain.api import CaptionSpec, DatasetSpec
    from difftrain.data.pairs import CleanPair

PLACEHOLDER = "{caption}"


def caption_lines(text: str | None, lines: str = "alternatives") -> list[str]:
    """A caption as found (a file's text, a column's value) -> its captions.

    ``lines``: 'alternatives' (each non-empty line is a caption), 'first' (the first non-empty
    line only) or 'joined' (all lines as one caption, joined by spaces). None gives [].
    """
    found = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if lines == "first":
        return found[:1]
    if lines == "joined":
        return [" ".join(found)] if found else []
    if lines != "alternatives":
        raise ValueError(f"dataset.captions.lines {lines!r}: use alternatives, first or joined")
    return found


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """'a, b ,,c' -> ['a', 'b', 'c']: the tags, stripped, empty ones left out."""
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def join_tags(tags: Sequence[str], separator: str = ",") -> str:
    """Tags back into a caption, as people write them: 'a, b' (',', ';' and ':' take a space
    after), 'a | b' (other separators a space on each side), 'a b' (a space as separator)."""
    mark = separator.strip()
    if not mark:
        glue = separator
    elif mark in {",", ";", ":"}:
        glue = mark + " "
    else:
        glue = f" {mark} "
    return glue.join(tags)


def process_tags(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool,
    keep_tokens: int = 0,
    dropout: float = 0.0,
    separator: str = ",",
) -> str:
    """The caption with its tags beyond the first ``keep_tokens`` dropped (each with probability
    ``dropout``) and shuffled; the kept ones stay first, in order."""
    if not shuffle and dropout <= 0:
        return caption
    tags = split_tags(caption, separator)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if dropout > 0:
        rest = [tag for tag in rest if rng.random() >= dropout]
    if shuffle:
        rng.shuffle(rest)
    return join_tags(kept + rest, separator)


def apply_template(template: str | None, caption: str) -> str:
    """``template`` with ``{caption}`` replaced; a template without it replaces the caption."""
    if template is None:
        return caption
    if PLACEHOLDER not in template:
        return template
    return template.replace(PLACEHOLDER, caption)


def choice_in_epoch(count: int, *, seed: int, epoch: int, index: int) -> int:
    """Which of an example's ``count`` captions it trains with in ``epoch``: each one once in
    every cycle of ``count`` epochs, in an order shuffled per cycle."""
    if count <= 1:
        return 0
    cycle, place = divmod(epoch, count)
    order = list(range(count))
    random.Random(f"{seed}:captions:{index}:{cycle}").shuffle(order)
    return order[place]


@dataclass(frozen=True)
class CaptionPolicy:
    """How a dataset's examples draw their captions (built from ``dataset.captions``)."""

    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    separator: str = ","
    template: str | None = None  # DreamBooth's instance prompt

    @classmethod
    def from_spec(cls, spec: CaptionSpec, template: str | None = None) -> CaptionPolicy:
        return cls(
            shuffle_tags=spec.shuffle_tags,
            keep_tokens=spec.keep_tokens,
            tag_dropout=spec.tag_dropout,
            separator=spec.separator,
            template=template,
        )

    @property
    def varies_tags(self) -> bool:
        """Whether the tags change from epoch to epoch."""
        return self.shuffle_tags or self.tag_dropout > 0

    def varies(self, captions: Sequence[str]) -> bool:
        """Whether an example with these captions trains with different text across epochs
        (then its text embedding cannot come from a cache)."""
        return self.varies_tags or len(captions) > 1

    def fixed(self, caption: str) -> str:
        """The text an example with this one caption trains with when nothing varies."""
        return apply_template(self.template, caption)

    def draw(self, captions: Sequence[str], *, seed: int, epoch: int, index: int) -> str:
        """The text example ``index`` trains with in ``epoch``."""
        if not captions:
            return self.fixed("")
        picked = captions[choice_in_epoch(len(captions), seed=seed, epoch=epoch, index=index)]
        rng = random.Random(f"{seed}:tags:{epoch}:{index}")
        text = process_tags(
            picked,
            rng,
            shuffle=self.shuffle_tags,
            keep_tokens=self.keep_tokens,
            dropout=self.tag_dropout,
            separator=self.separator,
        )
        return self.fixed(text)


PREVIEW_IMAGES = 3
PREVIEW_EPOCHS = 3
DEFAULT_SEED = 42  # hyperparameters.seed's default


def format_captions(
    pairs: Sequence[CleanPair], spec: DatasetSpec, *, seed: int = DEFAULT_SEED
) -> str:
    """What ``dataset.captions`` and ``repeats`` make of the kept pairs, for ``dataset check``:
    images with several captions, examples per epoch, and a few images' captions as a run with
    this seed draws them in its first epochs."""
    policy = CaptionPolicy.from_spec(spec.captions)
    several = [p for p in pairs if len(p.captions) > 1]
    width = 24
    count = sum(len(p.captions) for p in several)
    lines = [
        f"{'several captions':<{width}}{len(several):>8}   "
        f"({count} captions; captions.lines: {spec.captions.lines})",
        f"{'examples per epoch':<{width}}{len(pairs) * spec.repeats:>8}   (repeats {spec.repeats})",
    ]
    varying = [(i, p) for i, p in enumerate(pairs) if policy.varies(p.captions)][:PREVIEW_IMAGES]
    if varying:
        epochs = ", ".join(str(e) for e in range(PREVIEW_EPOCHS))
        lines.append(f"captions as drawn in epochs {epochs} (hyperparameters.seed {seed}):")
        for index, pair in varying:
            lines.append(f"  {pair.key}")
            for epoch in range(PREVIEW_EPOCHS):
                text = policy.draw(pair.captions, seed=seed, epoch=epoch, index=index)
                lines.append(f"    {epoch}  {text}")
    return "\n".join(lines)
