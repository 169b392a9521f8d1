"""Encoding samples for the latent cache: images through the VAE, captions through the text
encoder, batch by batch, with the images decoded and transformed on threads ahead of the VAE.

What is encoded: the VAE's latent distribution parameters (mean and log-variance, unscaled)
rather than one sample, so training still draws a fresh latent per step as the uncached loop
does; and the text encoder's last hidden state. Random crops and rotations are frozen at cache
time (one draw per image, seeded by its key); horizontal flips are not: when flips are cached the
mirrored image is encoded too, and the training loop picks one of the two per step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from difftrain.data.cache_keys import CacheError
from difftrain.data.parallel import ordered_map

if TYPE_CHECKING:
    from difftrain.data.pairs import CleanPair
    from difftrain.data.transforms import ImageTransform
    from difftrain.models.components import Components

Size = tuple[int, int]  # (width, height)


class EncodedImage(NamedTuple):
    """One image's cache entry."""

    latent: torch.Tensor  # (2C, h, w): the VAE's mean and log-variance
    flipped: torch.Tensor | None  # the mirrored image's, when flips are cached
    sizes: torch.Tensor  # (views, 6) float32: each view's time ids (SDXL's size conditioning)


class EncodedText(NamedTuple):
    """One caption's cache entry."""

    hidden: torch.Tensor  # (tokens, D): the UNet's encoder_hidden_states
    pooled: torch.Tensor | None  # (P,): SDXL's pooled embedding


def sample_rng(seed: int, key: str) -> random.Random:
    """The per-image random source of the frozen crop and rotation (independent of order)."""
    return random.Random(f"{seed}:{key}")


def encode_images(
    pairs: Sequence[CleanPair],
    components: Components,
    transform: ImageTransform,
    *,
    sizes: Sequence[Size] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    progress: Callable[[int], object] | None = None,
    workers: int = 4,
) -> list[EncodedImage]:
    """Each pair's latent params (and its mirror's, with flips) and time ids, in order, on the
    CPU in ``dtype``. The pairs hold their bytes. Batches hold one target size each (buckets)."""
    from difftrain.models.placement import placed  # not at import: it loads diffusers

    if sizes is not None and len(sizes) != len(pairs):
        raise CacheError(f"sizes has {len(sizes)} entries for {len(pairs)} pairs: give one each")
    if batch_size < 1:
        raise CacheError(f"batch_size is {batch_size}: it must be at least 1")
    flips = transform.pre.flip_probability > 0
    out: list[EncodedImage | None] = [None] * len(pairs)
    dev = torch.device(device)
    batches = list(_batches(len(pairs), sizes, batch_size))
    # Decoding and transforms (Pillow and torch release the GIL) run on threads ahead of the
    # encoder, in encoding order, so the accelerator does not wait for the CPU.
    views = ordered_map(
        lambda i: _views(pairs[i], transform, sizes[i] if sizes else None, seed, flips),
        (i for batch in batches for i in batch),
        workers=workers,
        window=2 * batch_size,
        name="difftrain-cache",
    )
    with placed([components.vae], dev):
        for batch in batches:
            images = [next(views) for _ in batch]
            with torch.inference_mode():
                latents = encode_latent_params(
                    components.vae, torch.stack([v[0] for v in images]), dev
                )
                mirrored = [v[1] for v in images if v[1] is not None]
                flipped = (
                    encode_latent_params(components.vae, torch.stack(mirrored), dev)
                    if mirrored
                    else None
                )
            # Copies made outside inference mode: plain tensors, usable in autograd later.
            for j, i in enumerate(batch):
                out[i] = EncodedImage(
                    _plain(latents[j], dtype),
                    _plain(flipped[j], dtype) if flipped is not None else None,
                    images[j][2],
                )
            if progress is not None:
                progress(len(batch))
    return [o for o in out if o is not None]


def encode_captions(
    captions: Sequence[str],
    components: Components,
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
) -> list[EncodedText]:
    """The text conditioning of each caption, in order, on the CPU in ``dtype``: the family's
    (one encoder's last hidden state; SDXL's two penultimate ones and the pooled embedding)."""
    from difftrain.models.families import family
    from difftrain.models.placement import placed

    fam = family(components.family)
    dev = torch.device(device)
    out: list[EncodedText] = []
    with placed(fam.encoders(components), dev):
        for start in range(0, len(captions), max(1, batch_size)):
            batch = list(captions[start : start + max(1, batch_size)])
            with torch.inference_mode():
                text = fam.encode(components, batch, dev)
            pooled = text.pooled if text.pooled is not None else [None] * len(batch)
            out.extend(
                EncodedText(_plain(h, dtype), None if p is None else _plain(p, dtype))
                for h, p in zip(text.hidden, pooled, strict=True)
            )
    return out


def _plain(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to("cpu", dtype, copy=True).contiguous()


def _batches(n: int, sizes: Sequence[Size] | None, batch_size: int) -> Iterator[list[int]]:
    """Index batches in which every image has the same target size (one bucket per batch)."""
    groups: dict[Size | None, list[int]] = {}
    for i in range(n):
        groups.setdefault(sizes[i] if sizes is not None else None, []).append(i)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            yield members[start : start + batch_size]


def _views(
    pair: CleanPair, transform: ImageTransform, size: Size | None, seed: int, flips: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The image as a training tensor, mirrored when flips are cached, and their time ids."""
    from difftrain.data.transforms import to_model_range

    image = transform.decode(pair.data, pair.name, size=size)
    # Both views from identically seeded sources: the same crop and rotation, mirrored.
    views = [False, True] if flips else [False]
    cut = [
        transform.pixels_and_sizes(image, size=size, rng=sample_rng(seed, pair.key), flip=f)
        for f in views
    ]
    # the decoded image may be reduced (JPEG draft): the original size is the pair's
    original = (pair.height, pair.width) if pair.width and pair.height else None
    sizes = torch.tensor(
        [[*(original or s.original_size), *s.crop_top_left, *s.target_size] for _, s in cut],
        dtype=torch.float32,
    )
    plain = to_model_range(cut[0][0])
    mirrored = to_model_range(cut[1][0]) if flips else None
    return plain, mirrored, sizes


def encode_latent_params(vae: Any, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The VAE's latent distribution parameters (B, 2C, h, w) of images in [-1, 1]."""
    dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    params: torch.Tensor = dist.parameters
    return params


def token_ids(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """The captions' token ids (B, tokens), padded or truncated to the tokenizer's context."""
    ids: torch.Tensor = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids


def encode_text(components: Components, captions: list[str], device: torch.device) -> torch.Tensor:
    """The text encoder's last hidden state (B, tokens, D), padded to the tokenizer's context."""
    ids = token_ids(components.tokenizer, captions)
    hidden: torch.Tensor = components.text_encoder(ids.to(device))[0]
    return hidden
