"""Pure pieces of the diffusion objective: noise, targets, loss weights and the LR schedule.

Every random draw of a step comes from a generator seeded by (seed, step, micro-batch, rank), so
the run is a function of its configuration: a resumed run draws exactly what the uninterrupted run
would have drawn, without replaying RNG streams.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting: through pinned memory to a GPU (a copy from
    pageable memory makes the host wait for the GPU's queue)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def step_generator(
    seed: int, *parts: int | str, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator on ``device`` seeded from ``seed`` and the step coordinates.

    A generator on the training device draws the step's noise and timesteps where they are
    used: no host copy, no synchronisation (seeding one is host-side state only).
    """
    text = ":".join(str(p) for p in (seed, *parts))
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return torch.Generator(device=device).manual_seed(value)


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"hyperparameters.lrScheduler {kind!r} is not constant/cosine/linear")

    return factor


def sample_noise(
    latents: torch.Tensor, generator: torch.Generator, noise_offset: float
) -> torch.Tensor:
    """Gaussian noise like ``latents``, plus a per-channel offset (for very dark/bright images).

    Drawn on the generator's device (the training device in the loop)."""
    where = generator.device
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32, device=where)
    if noise_offset:
        offset = torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1),
            generator=generator,
            dtype=torch.float32,
            device=where,
        )
        noise = noise + noise_offset * offset
    return noise.to(device=latents.device, dtype=latents.dtype)


def target_for(
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        velocity: torch.Tensor = scheduler.get_velocity(latents, noise, timesteps)
        return velocity
    raise ValueError(f"baseModel.predictionType {prediction_type!r} is not epsilon/v_prediction")


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of the noise schedule at ``timesteps``."""
    alphas_cumprod: torch.Tensor = scheduler.alphas_cumprod
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return a / (1.0 - a)


def min_snr_weights(
    scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR, or /(SNR+1) for v-prediction."""
    s = snr(scheduler, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample MSE (in fp32), weighted per sample when weights are given."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample MSE (in fp32), weighted per sample when weights are given, then averaged."""
    return per_sample_loss(prediction, target, weights).mean()


def prior_preservation_loss(
    per_sample: torch.Tensor, prior: list[bool], prior_weight: float
) -> torch.Tensor:
    """DreamBooth's loss: the instance images' mean plus ``prior_weight`` × the class images'.

    ``prior`` says on the host which samples are class images, so the split needs no boolean
    indexing on the device (which would wait for the GPU to know how many there are).
    """
    n_prior = sum(prior)
    n_inst = len(prior) - n_prior
    mask = to_device(torch.tensor(prior, dtype=per_sample.dtype), per_sample.device)
    loss = per_sample.new_zeros(())
    if n_inst:
        loss = loss + (per_sample * (1.0 - mask)).sum() / n_inst
    if n_prior:
        loss = loss + prior_weight * (per_sample * mask).sum() / n_prior
    return loss
