"""The validation loss: held-out images denoised at fixed timesteps with fixed noise.

The split is decided by a hash of each image's key, so it does not move when images are added
or removed, and the noise of an image is seeded by its key and the timestep, so two evaluations
of the same weights give the same number on any number of processes. Each process evaluates its
share of the images and the sums meet in one collective.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from difftrain.api import ValidationSpec, ValidationStatus
from difftrain.data.transforms import ImageTransform, to_model_range, to_unit_range
from difftrain.models.families import TextConditioning, family
from difftrain.train import objective
from difftrain.train.batches import BatchBuilder, Example, image_workers
from difftrain.train.methods import TrainedModules, TrainingConfigError, predict

logger = logging.getLogger(__name__)

P = TypeVar("P")


def held_out_share(key: str) -> float:
    """Where a key falls in [0, 1): keys below the fraction are held out."""
    digest = hashlib.sha256(f"difftrain-validation:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_held_out(
    pairs: Sequence[P], fraction: float, key: Callable[[P], str]
) -> tuple[list[P], list[P]]:
    """(training pairs, held-out pairs): a pair is held out when its key's share is below
    ``fraction``; the order of each list is the input's."""
    train: list[P] = []
    held: list[P] = []
    for pair in pairs:
        (held if held_out_share(key(pair)) < fraction else train).append(pair)
    return train, held


def check_split(spec: ValidationSpec, kept: int, held: int) -> None:
    """A fraction that holds out nothing, or everything, is a configuration error."""
    if held == 0:
        raise TrainingConfigError(
            f"validation.fraction {spec.fraction} holds out none of the {kept} kept images; "
            "raise it, or name a separate validation dataset in validation.uri"
        )
    if held == kept:
        raise TrainingConfigError(
            f"validation.fraction {spec.fraction} holds out all {kept} kept images and leaves "
            "none to train on; lower it or add images"
        )


class EvalModel(Protocol):
    """What the validator needs from the model being trained."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def encode_text(self, captions: list[str]) -> Any: ...
    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, text: Any, cond: Any
    ) -> torch.Tensor: ...


@dataclass
class ModelForEval:
    """The trained modules as they are (unwrapped, not compiled: no collective, no
    recompilation), in whatever weights and mode the caller put them."""

    components: Any  # difftrain.models.Components
    modules: TrainedModules
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]  # the family's, in its order
    controlnet: torch.nn.Module | None
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents of the images' distribution means (no sampling: fixed)."""
        vae = self.components.vae
        dist = vae.encode(pixels.to(self.device, next(vae.parameters()).dtype)).latent_dist
        latents = dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        scaled: torch.Tensor = latents * vae.config.scaling_factor
        return scaled

    def encode_text(self, captions: list[str]) -> TextConditioning:
        fam = family(self.components.family)
        return fam.encode(self.components, captions, self.device, self.text_encoders)

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, cond: Any
    ) -> torch.Tensor:
        fam = family(self.components.family)
        scale = 2 ** (len(self.components.vae.config.block_out_channels) - 1)
        target = (noisy.shape[-2] * scale, noisy.shape[-1] * scale)
        with self.autocast():
            return predict(
                self.modules,
                noisy,
                timesteps,
                text.hidden,
                cond,
                unet=self.unet,
                controlnet=self.controlnet,
                added=fam.unet_kwargs(text, None, target),
            )


@dataclass
class _Prepared:
    """One batch of this process's share, encoded once: latents and conditioning on the device."""

    keys: list[str]
    captions: list[str]
    latents: torch.Tensor
    conditioning: torch.Tensor | None


@dataclass
class Validator:
    """Computes the validation loss of the current weights every ``every_steps`` steps."""

    spec: ValidationSpec
    examples: list[Example]  # all held-out images, in key-hash order (every process the same)
    builder: BatchBuilder  # no flips, no caption dropout
    scheduler: Any  # the noise scheduler (its alphas_cumprod on the training device)
    prediction_type: str
    batch_size: int
    rank: int = 0
    world: int = 1
    _prepared: list[_Prepared] | None = field(default=None, repr=False)

    def due(self, step: int, total_steps: int) -> bool:
        """Every ``every_steps`` steps and at the end."""
        return step == total_steps or step % self.spec.every_steps == 0

    def share(self) -> list[int]:
        """The indices of the held-out images this process evaluates."""
        return list(range(self.rank, len(self.examples), self.world))

    def _batches(self) -> list[list[int]]:
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in self.share():
            by_size.setdefault(self.examples[i].size, []).append(i)
        return [
            group[start : start + self.batch_size]
            for group in by_size.values()
            for start in range(0, len(group), self.batch_size)
        ]

    def _prepare(self, model: EvalModel, device: torch.device) -> list[_Prepared]:
        """The share's latents, encoded once (the VAE is frozen) and kept on the device."""
        prepared: list[_Prepared] = []
        for indices in self._batches():
            batch = self.builder(0, 0, indices)
            if batch.latents is not None:
                latents = batch.latents.to(device)
            else:
                assert batch.pixels is not None
                latents = model.encode_images(to_model_range(batch.pixels.to(device)))
            cond = None
            if batch.conditioning is not None:
                cond = to_unit_range(batch.conditioning.to(device))
            keys = [self.examples[i].key for i in indices]
            prepared.append(_Prepared(keys, batch.captions, latents.float(), cond))
        return prepared

    def local_sums(self, model: EvalModel, device: torch.device) -> torch.Tensor:
        """[sum of per-image losses, images] of this process's share, on the device (not read
        here). Call it under ``torch.no_grad()`` with the modules in eval mode."""
        if self._prepared is None:
            self._prepared = self._prepare(model, device)
        total = torch.zeros((), device=device)
        for part in self._prepared:
            text = model.encode_text(part.captions)
            noise = torch.stack(
                [self._noise(key, part.latents.shape[1:]) for key in part.keys]
            )  # (images, timesteps, C, H, W)
            noise = objective.to_device(noise, device)
            for j, t in enumerate(self.spec.timesteps):
                timesteps = torch.full((len(part.keys),), t, device=device, dtype=torch.long)
                eps = noise[:, j]
                noisy = self.scheduler.add_noise(part.latents, eps, timesteps)
                target = objective.target_for(
                    self.scheduler, part.latents, eps, timesteps, self.prediction_type
                )
                pred = model.predict(noisy, timesteps, text, part.conditioning)
                per_image = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
                total += per_image.sum() / len(self.spec.timesteps)
        count = sum(len(p.keys) for p in self._prepared)
        return torch.stack([total, torch.tensor(float(count), device=device)])

    def _noise(self, key: str, shape: torch.Size) -> torch.Tensor:
        gen = objective.step_generator(self.spec.seed, "validation", key)
        return torch.randn((len(self.spec.timesteps), *shape), generator=gen)

    def result(self, sums: list[float], step: int, ema: bool) -> ValidationStatus:
        """The status of an evaluation from its all-process [loss sum, images]."""
        loss_sum, count = sums
        return ValidationStatus(
            loss=loss_sum / max(count, 1.0),
            step=step,
            images=int(count),
            weights="ema" if ema else "trained",
        )


def build_validator(
    spec: ValidationSpec,
    examples: list[Example],
    components: Any,
    *,
    transform: ImageTransform,
    decode: Callable[[bytes, str], Any],
    read: Callable[[Any], bytes],
    batch_size: int,
    rank: int,
    world: int,
) -> Validator:
    """A validator of the first ``spec.maxImages`` held-out examples by key hash (raw
    examples: ``read`` gets their images, which the VAE encodes at the first evaluation)."""
    steps = int(components.noise_scheduler.config.num_train_timesteps)
    too_late = [t for t in spec.timesteps if t >= steps]
    if too_late:
        raise TrainingConfigError(
            f"validation.timesteps: {too_late[0]} is not below the model's {steps} training "
            f"timesteps; use timesteps from 0 to {steps - 1}"
        )
    unique: dict[str, Example] = {}
    for ex in examples:
        unique.setdefault(ex.key, ex)  # a repeated dataset's copies count once
    chosen = sorted(unique.values(), key=lambda e: held_out_share(e.key))[: spec.max_images]
    vae = components.vae
    builder = BatchBuilder(
        chosen,
        seed=spec.seed,
        transform=transform,
        decode=decode,
        flip_probability=0.0,
        caption_dropout=0.0,
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=getattr(vae.config, "shift_factor", None),
        read=read,
        workers=image_workers(),
    )
    return Validator(
        spec=spec,
        examples=chosen,
        builder=builder,
        scheduler=components.noise_scheduler,
        prediction_type=components.prediction_type,
        batch_size=spec.batch_size or batch_size,
        rank=rank,
        world=world,
    )


def hold_out(
    spec: ValidationSpec,
    pairs: list[P],
    load_uri: Callable[[str], list[P]],
    key: Callable[[P], str],
) -> tuple[list[P], list[P]]:
    """(pairs to train on, held-out pairs): a share of ``pairs`` by key hash, or the cleaned
    pairs of the separate dataset at ``validation.uri`` (loaded by ``load_uri``)."""
    if spec.uri is not None:
        held = load_uri(spec.uri)
        if not held:
            raise TrainingConfigError(
                f"validation.uri {spec.uri}: cleaning kept no image–text pair there; add "
                "images or relax dataset.cleaning"
            )
        return pairs, held
    if spec.fraction <= 0:
        return pairs, []
    train, held = split_held_out(pairs, spec.fraction, key)
    check_split(spec, len(pairs), len(held))
    logger.info("validation split held_out=%d training=%d", len(held), len(train))
    return train, held


def held_out_examples(
    pairs: Sequence[Any],
    sizes: Sequence[tuple[int, int]],
    conditioning: Mapping[str, bytes] | None,
) -> list[Example]:
    """Raw examples of the held-out pairs; with ControlNet conditioning (a mapping, possibly
    empty), only the pairs that have a conditioning image."""
    examples = [
        Example(
            key=p.key,
            caption=p.caption,
            size=size,
            data=p.data or None,  # a dataset's pairs hold none: read when first evaluated
            source=p,
            conditioning=conditioning.get(p.key) if conditioning is not None else None,
        )
        for p, size in zip(pairs, sizes, strict=True)
    ]
    if conditioning is None:
        return examples
    with_cond = [e for e in examples if e.conditioning is not None]
    if not with_cond:
        raise TrainingConfigError(
            "validation: no held-out image has a conditioning image of the same name in "
            "controlnet.conditioningUri; add them there"
        )
    return with_cond


def hold_out_each(
    spec: ValidationSpec, parts: Sequence[list[P]], key: Callable[[P], str]
) -> tuple[list[list[P]], list[P]]:
    """validation.fraction of each dataset of several (by key hash, as if it were alone): the
    pairs each trains on, and every held-out pair. A dataset left with nothing to train on, or
    a split that holds out nothing at all, is a configuration error."""
    if spec.fraction <= 0:
        return [list(p) for p in parts], []
    kept: list[list[P]] = []
    held: list[P] = []
    for pairs in parts:
        train, out = split_held_out(pairs, spec.fraction, key)
        if not train:
            check_split(spec, len(pairs), len(out))
        kept.append(train)
        held.extend(out)
    check_split(spec, sum(len(p) for p in parts), len(held))
    logger.info("validation split held_out=%d training=%d", len(held), sum(map(len, kept)))
    return kept, held
