"""Boomerang augmentation: local variants of a training image made with the base model itself.

Each image is encoded, noised to ``strength`` of the schedule and denoised back with the base model
under its own caption (img2img: only the last ``strength`` fraction of the sampling steps run), then
decoded. A low strength keeps the content and changes local detail; a high one wanders further
(Luzi et al., "Boomerang: Local sampling on image manifolds using diffusion models", 2023).

Denoising uses DDIM with eta 0 on the model's own schedule and prediction type, so a variant is a
function of the source, the caption and its seeded noise only (drawn on the CPU, so the same on any
device): the same seed gives the same bytes, up to floating-point differences between devices,
dtypes and batch sizes.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from difftrain.data.cache_encode import sample_rng
from difftrain.data.pairs import CleanPair

if TYPE_CHECKING:
    from difftrain.data.transforms import ImageTransform
    from difftrain.models.components import Components
    from difftrain.models.families import TextConditioning

logger = logging.getLogger(__name__)


class BoomerangError(ValueError):
    """Boomerang settings that cannot work; the message names the field."""


def boomerang_variants(
    pairs: Sequence[CleanPair],
    components: Components,
    transform: ImageTransform,
    *,
    strength: float,
    copies: int,
    seed: int,
    num_inference_steps: int = 20,
    guidance_scale: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    sizes: Sequence[tuple[int, int]] | None = None,
    progress: Callable[[int], object] | None = None,
    read: Callable[[CleanPair], bytes] | None = None,
) -> list[CleanPair]:
    """``copies`` variants of every pair (keys ``<key>~boomerang<i>``), in the pairs' order.

    ``sizes`` gives each pair's (width, height) for aspect-ratio buckets. ``progress`` is called
    with the number of variants each batch made. The networks run together on ``device`` in
    ``dtype`` and eval mode, ``batch_size`` variants of one size at a time, and are left where
    and as they were. ``read`` gives a pair's image bytes when it holds none
    (:func:`difftrain.data.image_bytes.read_image`).
    """
    from difftrain.models.placement import placed  # not at import: it loads diffusers

    if not 0.0 < strength < 1.0:
        raise BoomerangError(f"preprocessing.boomerang.strength is {strength}: use 0 < s < 1")
    if copies < 1:
        raise BoomerangError(f"preprocessing.boomerang.copies is {copies}: use at least 1")
    if num_inference_steps < 1:
        raise BoomerangError(f"num_inference_steps is {num_inference_steps}: use at least 1")
    if batch_size < 1:
        raise BoomerangError(f"batch_size is {batch_size}: use at least 1")
    if sizes is not None and len(sizes) != len(pairs):
        raise BoomerangError(f"sizes has {len(sizes)} entries for {len(pairs)} pairs")
    from difftrain.models.families import family

    dev = torch.device(device)
    fam = family(components.family)
    networks = [components.vae, components.unet, *fam.encoders(components)]
    made: dict[tuple[int, int], CleanPair] = {}
    with placed(networks, dev, dtype), torch.inference_mode():
        uncond = fam.encode(components, [""], dev) if guidance_scale > 1.0 else None
        for batch in _batches(len(pairs), copies, sizes, batch_size):
            sources: dict[int, torch.Tensor] = {}
            for n, _ in batch:
                if n not in sources:
                    size = sizes[n] if sizes is not None else None
                    data = pairs[n].data or (read(pairs[n]) if read is not None else b"")
                    image = transform.decode(data, pairs[n].name, size=size)
                    rng = sample_rng(seed, pairs[n].key)
                    sources[n] = transform(image, size=size, rng=rng, flip=False)
            result = _img2img(
                components,
                torch.stack([sources[n] for n, _ in batch]).to(dev),
                fam.encode(components, [pairs[n].caption for n, _ in batch], dev),
                uncond,
                strength=strength,
                steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generators=[
                    torch.Generator().manual_seed(_variant_seed(seed, pairs[n].key, i))
                    for n, i in batch
                ],
            )
            for row, (n, i) in enumerate(batch):
                made[n, i] = _variant(pairs[n], i, result[row])
            if progress is not None:
                progress(len(batch))
    out = [made[n, i] for n in range(len(pairs)) for i in range(copies)]
    logger.info(
        "boomerang variants made",
        extra={"sources": len(pairs), "variants": len(out), "strength": strength},
    )
    return out


def _batches(
    n: int, copies: int, sizes: Sequence[tuple[int, int]] | None, batch_size: int
) -> Iterator[list[tuple[int, int]]]:
    """(pair, copy) batches in which every source has the same size (one bucket per batch)."""
    groups: dict[tuple[int, int] | None, list[tuple[int, int]]] = {}
    for p in range(n):
        group = groups.setdefault(sizes[p] if sizes is not None else None, [])
        group.extend((p, i) for i in range(copies))
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            yield members[start : start + batch_size]


def _variant(pair: CleanPair, copy: int, image: torch.Tensor) -> CleanPair:
    png = _to_png(image)
    stem = pair.name.rsplit(".", 1)[0]
    return CleanPair(
        key=f"{pair.key}~boomerang{copy}",
        name=f"{stem}~boomerang{copy}.png",
        data=png,
        caption=pair.caption,
        width=int(image.shape[-1]),
        height=int(image.shape[-2]),
        sha256=hashlib.sha256(png).hexdigest(),
    )


def _variant_seed(seed: int, key: str, copy: int) -> int:
    """A per-variant seed independent of the pairs' order and of the other variants."""
    digest = hashlib.sha256(f"{seed}:{key}:{copy}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _img2img(
    components: Components,
    pixels: torch.Tensor,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    *,
    strength: float,
    steps: int,
    guidance_scale: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Noise ``pixels`` (B, 3, H, W in [-1, 1]) to ``strength`` and denoise; returns [-1, 1].

    Image ``b``'s latent sample and noise come from ``generators[b]`` (CPU generators: the same
    draws on any device), so a variant does not depend on the others in its batch.
    """
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    from difftrain.models.families import TextConditioning, family

    vae, unet = components.vae, components.unet
    scheduler: Any = DDIMScheduler.from_config(
        components.scheduler_config, prediction_type=components.prediction_type
    )
    scheduler.set_timesteps(steps, device=pixels.device)
    # As img2img: skip the first (1 - strength) of the steps, but run at least one.
    run = max(1, min(int(steps * strength), steps))
    timesteps = scheduler.timesteps[steps - run :]
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    latents = (dist.sample(generator=generators) - shift) * scale
    noise = randn_tensor(
        latents.shape, generator=generators, device=latents.device, dtype=latents.dtype
    )
    latents = scheduler.add_noise(latents, noise, timesteps[:1])
    context = cond
    if uncond is not None:  # the unconditional rows first, then the conditional ones
        pooled = None
        if cond.pooled is not None and uncond.pooled is not None:
            pooled = torch.cat([uncond.pooled.expand_as(cond.pooled), cond.pooled])
        context = TextConditioning(
            torch.cat([uncond.hidden.expand_as(cond.hidden), cond.hidden]), pooled
        )
    hidden = context.hidden.to(unet.dtype)
    if context.pooled is not None:
        context = TextConditioning(hidden, context.pooled.to(unet.dtype))
    # the family's added conditioning (SDXL: the pooled text, the image uncropped at its size)
    target = (int(pixels.shape[-2]), int(pixels.shape[-1]))
    added = family(components.family).unet_kwargs(context, None, target)
    for t in timesteps:
        model_in = latents if uncond is None else torch.cat([latents, latents])
        model_in = scheduler.scale_model_input(model_in, t)
        pred = unet(model_in, t, encoder_hidden_states=hidden, **added).sample
        if uncond is not None:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        # DDIM with eta 0 draws no noise in its steps
        latents = scheduler.step(pred, t, latents).prev_sample
    decoded: torch.Tensor = vae.decode(latents / scale + shift).sample
    return decoded.float().clamp(-1.0, 1.0)


def _to_png(image: torch.Tensor) -> bytes:
    """A (3, H, W) tensor in [-1, 1] as PNG bytes."""
    from PIL import Image

    array = ((image + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pil = Image.fromarray(array.permute(1, 2, 0).cpu().numpy())
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()
