"""DreamBooth prior preservation: class images (given or generated) paired with each batch."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import random
from collections.abc import Iterator
from typing import Any

import torch

from difftrain.api import DiffusionTrainingJobSpec
from difftrain.storage import Store, commit, join, open_store, read_manifest, scratch_dir
from difftrain.train.batches import Example
from difftrain.train.methods import TrainingConfigError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CLASS_BATCH = 4  # class images generated per pipeline call


class PriorPairedSampler:
    """Each instance batch followed by as many class images, drawn from (seed, epoch, batch)."""

    def __init__(self, inner: Any, n_instance: int, n_class: int, *, seed: int) -> None:
        self.inner = inner
        self.n_instance = n_instance
        self.n_class = n_class
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.inner):
            rng = random.Random(f"{self.seed}:{self.epoch}:{i}:prior")
            yield list(batch) + [self.n_instance + rng.randrange(self.n_class) for _ in batch]


def check_prior_settings(spec: DiffusionTrainingJobSpec) -> None:
    """Refuse what prior preservation cannot do yet, before any data or model is loaded."""
    db = spec.dreambooth
    if db is not None and db.prior_preservation and spec.preprocessing.buckets.enabled:
        raise TrainingConfigError(
            "dreambooth.priorPreservation does not work with preprocessing.buckets yet; "
            "turn buckets off or set priorPreservation: false"
        )


def _given_images(uri: str, store: Store, limit: int) -> list[bytes]:
    base = uri.rstrip("/")
    found = sorted(u for u in store.list(base + "/") if u.lower().endswith(IMAGE_SUFFIXES))
    return [store.read_range(u, 0, store.size(u)) for u in found[:limit]]


def generate_class_images(
    spec: DiffusionTrainingJobSpec,
    components: Any,
    output_store: Store,
    count: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = CLASS_BATCH,
) -> list[bytes]:
    """Class images from the base model; committed under the output, reused on restart.

    Image ``i`` comes from seed ``hyperparameters.seed + i`` (drawn on the CPU, so the same start
    on any device). The pipeline's networks run together on ``device`` in ``dtype``,
    ``batch_size`` images at a time, and are left where and as they were.
    """
    from difftrain.models.placement import placed
    from difftrain.train.sampling import build_pipeline

    assert spec.dreambooth is not None and spec.dreambooth.class_prompt is not None
    prefix = join(spec.output.uri, "class-images")
    manifest = read_manifest(output_store, prefix)
    if manifest is not None and manifest["metadata"].get("count") == count:
        return [
            output_store.read_range(join(prefix, e["name"]), 0, e["size"])
            for e in manifest["files"]
        ]
    logger.info(
        "generating class images count=%d prompt=%r device=%s",
        count,
        spec.dreambooth.class_prompt,
        device,
    )
    pipe = build_pipeline(components, components.unet)
    res = spec.preprocessing.resolution
    work = scratch_dir("difftrain-class-")
    files = {}
    out: list[bytes] = []
    seed = spec.hyperparameters.seed
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
    networks = [pipe.vae, *(e for e in encoders if e is not None), pipe.unet]
    with placed(networks, device, dtype), torch.no_grad():
        for start in range(0, count, batch_size):
            batch = range(start, min(count, start + batch_size))
            images = pipe(
                spec.dreambooth.class_prompt,
                num_images_per_prompt=len(batch),
                num_inference_steps=spec.sampling.num_inference_steps,
                guidance_scale=spec.sampling.guidance_scale,
                height=res,
                width=res,
                generator=[torch.Generator().manual_seed(seed + i) for i in batch],
            ).images
            for i, image in zip(batch, images, strict=True):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                path = work / f"{i:05d}.png"
                path.write_bytes(buf.getvalue())
                files[path.name] = path
                out.append(buf.getvalue())
    commit(output_store, prefix, files, metadata={"count": count})
    return out


def class_examples(
    spec: DiffusionTrainingJobSpec,
    components: Any,
    options: Any,
    output_store: Store,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> list[Example]:
    """The prior-preservation examples (``is_prior``), cached like the instance images.

    Missing class images are generated, and all are encoded, on ``device`` (the networks that
    generate them in ``dtype``).
    """
    from difftrain.data.cache import LatentCache, cache_space
    from difftrain.data.images import decode_rgb
    from difftrain.data.pairs import CleanPair
    from difftrain.data.transforms import ImageTransform

    db = spec.dreambooth
    assert db is not None and db.class_prompt is not None
    images: list[bytes] = []
    if db.class_data_uri:
        store = open_store(db.class_data_uri, options.store_config)
        images = _given_images(db.class_data_uri, store, db.num_class_images)
    if len(images) < db.num_class_images:
        images += generate_class_images(
            spec,
            components,
            output_store,
            db.num_class_images - len(images),
            device=device,
            dtype=dtype,
        )
    pairs = []
    for i, data in enumerate(images):
        image = decode_rgb(data, f"class image {i}")
        pairs.append(
            CleanPair(
                key=f"class/{i:05d}",
                name=f"class image {i}",
                data=data,
                caption=db.class_prompt,
                width=image.width,
                height=image.height,
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    res = spec.preprocessing.resolution
    if spec.preprocessing.cache_latents:
        cache = LatentCache(output_store, join(spec.output.uri, "class-images", "cache"))
        pre = spec.preprocessing
        # class images get no Boomerang variants: their space has none
        from difftrain.models.families import family

        added = family(components.family).size_conditioning
        space = dataclasses.replace(
            cache_space(pre, components.identity, extra={"role": "class"}, added=added), copies=0
        )
        samples, _ = cache.get_or_build(
            pairs, components, ImageTransform(pre), space=space, seed=0, device=device
        )
        return [
            Example(key=s.key, caption=s.caption, size=(res, res), cached=s, is_prior=True)
            for s in samples
        ]
    return [
        Example(key=p.key, caption=p.caption, size=(res, res), data=p.data, is_prior=True)
        for p in pairs
    ]
