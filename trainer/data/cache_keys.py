"""The content addresses of cached tensors: a sample's latents and a caption's text embeddings.

A latent is addressed by the image's content (the sha256 cleaning found, from its bytes or from
the facts kept for that object version), the settings that change the tensors (resolution, crop,
rotation, buckets, whether flipped copies exist, Boomerang) and the model's identity; with random
crops, rotations or Boomerang the seed and the sample's key count too (they seed its draws). A
text embedding is addressed by the caption and the model's identity. Change any input and the
address changes, so nothing is ever updated in place: a changed image gets a new latent, a changed
caption a new text embedding, and everything else is found again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difftrain.api import PreprocessingSpec
    from difftrain.data.pairs import CleanPair

CACHE_FORMAT = "difftrain-latent-cache/2"


def _digest(parts: Sequence[object]) -> str:
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:40]


@dataclass(frozen=True)
class CacheSpace:
    """What the addresses of one run's samples depend on besides each sample's own content."""

    image: str  # digest of the tensor-changing image settings and the model
    text: str  # digest of the model (its tokenizer and text encoder)
    seeded: bool  # the key and seed change the tensors (random crops, rotations, Boomerang)
    flips: bool  # flipped copies are cached beside each latent
    copies: int  # Boomerang variants per image (0: none)
    added: bool = False  # SDXL: the pooled text embedding and each image's time ids cached too

    def latent(self, pair: CleanPair, copy: int | None = None) -> str:
        """The address of a pair's latents, or of its Boomerang variant ``copy``'s."""
        parts: list[object] = [self.image, pair.sha256]
        if self.seeded:
            parts.append(pair.key)
        if copy is not None:
            parts += ["boomerang", copy]
        return _digest(parts)

    def caption(self, caption: str) -> str:
        """The address of a caption's text embeddings."""
        return _digest([self.text, caption])


def cache_space(
    pre: PreprocessingSpec,
    model_identity: str,
    *,
    seed: int = 0,
    extra: dict[str, str] | None = None,
    added: bool = False,
) -> CacheSpace:
    """The space of a run's samples: preprocessing, model, seed (where it counts) and ``extra``."""
    seeded = pre.crop == "random" or pre.max_rotation_degrees > 0 or pre.boomerang.enabled
    settings = {
        "resolution": pre.resolution,
        "crop": pre.crop,
        "max_rotation_degrees": pre.max_rotation_degrees,
        "buckets": pre.buckets.model_dump(mode="json") if pre.buckets.enabled else None,
        # Only whether flipped copies exist matters, not how often they are used.
        "flipped": pre.flip_probability > 0,
        "boomerang": pre.boomerang.model_dump(mode="json") if pre.boomerang.enabled else None,
        "seed": seed if seeded else None,
    }
    extras = dict(sorted((extra or {}).items()))
    return CacheSpace(
        image=_digest([CACHE_FORMAT, "image", settings, model_identity, extras]),
        text=_digest([CACHE_FORMAT, "text", model_identity, extras]),
        seeded=seeded,
        flips=pre.flip_probability > 0,
        copies=pre.boomerang.copies if pre.boomerang.enabled else 0,
        added=added,
    )


@dataclass(frozen=True)
class Wanted:
    """One sample a run trains on, as the cache knows it."""

    key: str  # the pair's key, or "<key>~boomerang<i>" for a variant
    caption: str
    latent: str  # the latents' address
    text: str | None  # the text embeddings' address; None when texts are not cached
    source: int  # the index of the pair it comes from
    copy: int | None = None  # the Boomerang variant it is, None for the image itself


def wanted_samples(
    pairs: Sequence[CleanPair], space: CacheSpace, *, texts: bool = True
) -> list[Wanted]:
    """The samples of ``pairs``: each pair, then (with Boomerang) each pair's variants in turn.

    ``texts=False`` caches latents only (captions that change from epoch to epoch are encoded
    by the training loop instead).
    """
    out = [
        Wanted(p.key, p.caption, space.latent(p), space.caption(p.caption) if texts else None, i)
        for i, p in enumerate(pairs)
    ]
    out += [
        Wanted(
            f"{p.key}~boomerang{c}",
            p.caption,
            space.latent(p, c),
            space.caption(p.caption) if texts else None,
            i,
            c,
        )
        for i, p in enumerate(pairs)
        for c in range(space.copies)
    ]
    return out


class CacheError(RuntimeError):
    """A cache that cannot be built; the message names the sample and the fix."""
