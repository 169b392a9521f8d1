"""A short reconstruction pre-training of the tiny VAE on generated shapes.

A random-initialised VAE is no autoencoder: its GroupNorms discard an image's colours and its
posterior noise (std ~1) drowns the image, so a diffusion model trained on its latents has
nothing to learn from the captions. A few hundred seeded steps on generated coloured shapes give
the local run a VAE that keeps colours and shapes, so its loss and samples mean something.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

# Start with a near-deterministic posterior (std e^-3 ~ 0.05), as a trained VAE has.
INITIAL_LOGVAR = -6.0
KL_WEIGHT = 1e-6


def shapes_batch(rng: random.Random, count: int, size: int) -> torch.Tensor:
    """``count`` generated shapes images as a (count, 3, size, size) tensor in [-1, 1]."""
    from difftrain.train.synthetic import COLOURS, SHAPES, draw_shape

    names = list(COLOURS)
    images = []
    for _ in range(count):
        colour = rng.choice(names)
        background = rng.choice([c for c in names if c != colour])
        image = draw_shape(size, rng.choice(SHAPES), colour, background, rng)
        images.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def pretrain_vae(vae: Any, *, steps: int, seed: int, image_size: int) -> float:
    """Train ``vae`` to reconstruct shapes; set its scaling factor to 1/std of the latents.

    Returns the final reconstruction MSE (on [-1, 1] pixels) of a held-out batch.
    """
    rng = random.Random(seed)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        latent = vae.config.latent_channels
        with torch.no_grad():
            vae.quant_conv.bias[latent:] = INITIAL_LOGVAR
        optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
        vae.train()
        for _ in range(steps):
            x = shapes_batch(rng, 8, image_size)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            loss = torch.nn.functional.mse_loss(recon, x) + KL_WEIGHT * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        vae.eval()
        with torch.no_grad():
            x = shapes_batch(random.Random(seed + 1), 32, image_size)
            mean = vae.encode(x).latent_dist.mean
            error = float(torch.nn.functional.mse_loss(vae.decode(mean).sample, x))
            # as Stable Diffusion chose 0.18215: unit-variance latents for the diffusion model
            vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    finally:
        torch.random.set_rng_state(generator_state)
    return error
