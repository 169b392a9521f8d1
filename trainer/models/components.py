"""The parts of a Stable Diffusion model that training works with, and the identity of weights."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from difftrain.storage import sha256_file


@dataclass
class Components:
    """A loaded base model: its networks, tokenizer and noise schedule."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    """The training noise schedule (DDPM, with the model's prediction type)."""
    scheduler_config: dict[str, Any]
    """The model's scheduler config, for building sampling schedulers."""
    prediction_type: str
    """'epsilon' or 'v_prediction' (the spec's override, else the scheduler config's)."""
    family: str
    """'sd1', 'sd2' or 'sdxl': a key of :data:`difftrain.models.families.FAMILIES`."""
    identity: str
    """sha256 hex identifying the weights: over the sorted manifest of the source files' sha256s."""
    source: str
    """The uri or hub id the model came from."""
    text_encoder_2: CLIPTextModelWithProjection | None = None
    """SDXL's OpenCLIP bigG encoder (with its pooled projection)."""
    tokenizer_2: CLIPTokenizer | None = None
    ldm_extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors of a single-file base model that the diffusers networks do not hold (SD2's
    OpenCLIP ``text_projection`` and last block), written back into single-file exports."""


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes."""
    return sha256_file(path)


def manifest_identity(files: dict[str, str]) -> str:
    """sha256 over a manifest of ``relative path -> sha256`` lines, sorted by path.

    Hashing the manifest rather than the bytes again makes the identity of a folder as cheap as the
    hashes of its files, and independent of where the folder was downloaded to.
    """
    lines = "".join(f"{name}\t{digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def folder_identity(root: Path, files: list[str] | None = None) -> str:
    """The identity of a diffusers folder: of ``files`` (relative paths), or of all its files."""
    if files is None:
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return manifest_identity({name: file_sha256(root / name) for name in files})
