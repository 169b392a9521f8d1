"""Merge methods as pure functions of fp32 tensors (one tensor of every input at a time).

Conventions: ``models`` are the inputs' tensors for one key; ``base`` is the base model's tensor for
difference methods, whose task vectors are ``model - base``. Weights are per input.

- weighted sum: ``Σ wᵢ·xᵢ / Σ wᵢ`` (two inputs with ``alpha``: ``(1-α)·a + α·b``)
- add difference: ``a + α·(b - base)``
- SLERP: spherical interpolation of ``a`` and ``b`` by ``t``; linear for nearly parallel tensors
- task arithmetic: ``base + Σ wᵢ·τᵢ``
- TIES (Yadav et al. 2023): trim each τ to its top-``density`` magnitudes, elect the sign of
  ``Σ wᵢ·τ̂ᵢ`` per element, average the weighted entries that agree with it (weights normalised
  over the agreeing inputs, as mergekit does)
- DARE (Yu et al. 2023): drop each τ entry with probability ``p``, rescale the rest by
  ``1/(1-p)``, then task arithmetic; the mask is drawn from a generator seeded per tensor name,
  so a merge repeats exactly whatever the order tensors are visited in
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def weighted_sum(models: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted average of the inputs (weights normalised to sum to 1)."""
    total = float(sum(weights))
    if total == 0:
        raise ValueError("weights sum to 0: a weighted average needs a non-zero total")
    out = models[0] * (weights[0] / total)
    for x, w in zip(models[1:], weights[1:], strict=True):
        if w:
            out.add_(x, alpha=w / total)
    return out


def add_difference(a: Tensor, b: Tensor, base: Tensor, alpha: float) -> Tensor:
    """``a + alpha * (b - base)``."""
    return a + alpha * (b - base)


def slerp(a: Tensor, b: Tensor, t: float, parallel_threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1)."""
    a_flat, b_flat = a.reshape(-1), b.reshape(-1)
    a_norm, b_norm = a_flat.norm(), b_flat.norm()
    if a_norm == 0 or b_norm == 0:
        return (1 - t) * a + t * b
    dot = torch.clamp(torch.dot(a_flat / a_norm, b_flat / b_norm), -1.0, 1.0)
    if abs(float(dot)) > parallel_threshold:
        return (1 - t) * a + t * b
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    wa = torch.sin((1 - t) * omega) / sin_omega
    wb = torch.sin(t * omega) / sin_omega
    return wa * a + wb * b


def task_arithmetic(base: Tensor, models: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``base + Σ wᵢ·(xᵢ - base)``."""
    out = base.clone()
    for x, w in zip(models, weights, strict=True):
        if w:
            out.add_(x - base, alpha=w)
    return out


def trim(tau: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude; zero the rest."""
    if density >= 1.0:
        return tau
    k = round(density * tau.numel())
    if k <= 0:
        return torch.zeros_like(tau)
    flat = tau.reshape(-1).abs()
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ties(
    base: Tensor, models: Sequence[Tensor], weights: Sequence[float], density: float
) -> Tensor:
    """TIES merging: trim, elect sign, disjoint (weighted) mean."""
    taus = torch.stack([w * trim(x - base, density) for x, w in zip(models, weights, strict=True)])
    sign = torch.sign(taus.sum(dim=0))
    agree = (torch.sign(taus) == sign) & (taus != 0)
    w = torch.tensor(weights, dtype=taus.dtype).reshape(-1, *([1] * base.dim()))
    mass = (agree * w).sum(dim=0)
    merged = (taus * agree).sum(dim=0) / torch.where(mass == 0, torch.ones_like(mass), mass)
    return base + merged


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A seed for one tensor of one input, independent of the order tensors are visited in."""
    digest = hashlib.sha256(f"{seed}/{index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float],
    drop_rate: float,
    seed: int,
    name: str,
) -> Tensor:
    """DARE: random drop with rescale, then task arithmetic."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"dropRate must be in [0, 1), got {drop_rate}")
    taus = []
    for i, x in enumerate(models):
        tau = x - base
        if drop_rate > 0:
            gen = torch.Generator().manual_seed(tensor_seed(seed, name, i))
            keep = torch.rand(tau.shape, generator=gen) >= drop_rate
            tau = torch.where(keep, tau / (1.0 - drop_rate), torch.zeros_like(tau))
        taus.append(tau)
    out = base.clone()
    for tau, w in zip(taus, weights, strict=True):
        if w:
            out.add_(tau, alpha=w)
    return out


def lora_delta(
    down: Tensor, up: Tensor, alpha: float | None, target_shape: Sequence[int]
) -> Tensor:
    """The weight update ``(alpha / rank) · up @ down`` of one LoRA module, in the target's shape.

    Linear layers: down ``[r, in]``, up ``[out, r]``. Convolutions: down ``[r, in, kh, kw]``,
    up ``[out, r, 1, 1]`` (LoCon); the product is reshaped to ``[out, in, kh, kw]``.
    """
    rank = down.shape[0]
    scale = (alpha / rank) if alpha is not None else 1.0
    delta = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
    return (scale * delta).reshape(tuple(target_shape))


def lora_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors ``(down, up)`` of a 2-D update (truncated SVD), alpha = rank."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    return down, up
