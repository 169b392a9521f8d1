"""What the SDXL family needs beyond SD1 to condition its UNet: two text encoders and time ids.

SDXL's cross-attention context is the penultimate hidden state of CLIP ViT-L (``text_encoder``)
concatenated with that of OpenCLIP bigG (``text_encoder_2``); its added conditioning is bigG's
pooled projection plus six "time ids" (original size, crop top-left, target size) that tell the
UNet how the training image was resized and cropped. Not yet wired into the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from difftrain.data.cache_encode import token_ids
from difftrain.models.errors import ModelError

SizeHW = tuple[int, int]
"""(height, width) in pixels, or (top, left) for a crop's corner."""


class SDXLText(NamedTuple):
    """SDXL's two tokenizers and text encoders (CLIP ViT-L first, then bigG with projection)."""

    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection


class TimeIdSizes(NamedTuple):
    """One image's size conditioning: size before resizing, crop corner, output size."""

    original_size: SizeHW
    crop_top_left: SizeHW
    target_size: SizeHW


def load_sdxl_text(folder: Path, dtype: torch.dtype = torch.float32) -> SDXLText:
    """Load the tokenizers and text encoders of a local diffusers SDXL folder (safetensors only).

    Pickled weights (``.bin``) are refused: unpickling runs any code the file's author put in it.
    """
    return SDXLText(
        tokenizer=_load_tokenizer(folder, "tokenizer"),
        tokenizer_2=_load_tokenizer(folder, "tokenizer_2"),
        text_encoder=_load_encoder(folder, "text_encoder", CLIPTextModel, dtype),
        text_encoder_2=_load_encoder(folder, "text_encoder_2", CLIPTextModelWithProjection, dtype),
    )


def _load_tokenizer(folder: Path, name: str) -> CLIPTokenizer:
    try:
        tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(
            folder / name, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"SDXL folder {folder}: cannot load {name}/: {exc}") from exc
    return tokenizer


_Encoder = TypeVar("_Encoder", CLIPTextModel, CLIPTextModelWithProjection)


def _load_encoder(folder: Path, name: str, cls: type[_Encoder], dtype: torch.dtype) -> _Encoder:
    try:
        model = cls.from_pretrained(
            folder / name, dtype=dtype, use_safetensors=True, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        # transformers raises OSError "no file named model.safetensors" for a .bin-only folder.
        raise ModelError(
            f"SDXL folder {folder}: cannot load {name}/ from safetensors ({exc}); only "
            "safetensors weights are loaded (unpickling a .bin runs arbitrary code): "
            f"convert {name}/'s weights to model.safetensors"
        ) from exc
    return model.eval()


def encode_sdxl_prompts(
    text: SDXLText, prompts: list[str], *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, tokens, D1 + D2), pooled_prompt_embeds (B, P)) as SDXL conditions.

    Each encoder's penultimate hidden state, concatenated on the last dim (CLIP-L first); the
    pooled embedding is ``text_encoder_2``'s projection output. ``device`` defaults to the
    encoders'. Empty prompts are encoded like any other: see :func:`zero_for_dropout`.
    """
    target = torch.device(device) if device is not None else text.text_encoder.device
    out_1 = text.text_encoder(
        token_ids(text.tokenizer, prompts).to(text.text_encoder.device), output_hidden_states=True
    )
    out_2 = text.text_encoder_2(
        token_ids(text.tokenizer_2, prompts).to(text.text_encoder_2.device),
        output_hidden_states=True,
    )
    hidden_1: torch.Tensor = out_1.hidden_states[-2]
    hidden_2: torch.Tensor = out_2.hidden_states[-2]
    pooled: torch.Tensor = out_2.text_embeds
    embeds = torch.cat([hidden_1.to(target), hidden_2.to(target)], dim=-1)
    return embeds, pooled.to(target)


def zero_for_dropout(
    embeds: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero both embeddings where ``mask`` (B,) is True: SDXL's caption dropout.

    SDXL base ships ``force_zeros_for_empty_prompt``: its unconditional input is all zeros rather
    than the encoding of "", so dropped captions train towards zeros too.
    """
    if mask.shape != (embeds.shape[0],) or pooled.shape[0] != embeds.shape[0]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must be (batch,) for embeds {tuple(embeds.shape)} "
            f"and pooled {tuple(pooled.shape)}"
        )
    return _zero_rows(embeds, mask), _zero_rows(pooled, mask)


def _zero_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not a multiply: exact zeros even for -x, inf or nan rows.
    drop = mask.to(device=values.device, dtype=torch.bool).view(-1, *([1] * (values.dim() - 1)))
    return torch.where(drop, torch.zeros((), dtype=values.dtype, device=values.device), values)


def add_time_ids(original_size: SizeHW, crop_top_left: SizeHW, target_size: SizeHW) -> torch.Tensor:
    """SDXL's six time ids (6,): original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def batch_time_ids(sizes: list[TimeIdSizes] | list[tuple[SizeHW, SizeHW, SizeHW]]) -> torch.Tensor:
    """The time ids (B, 6) of a batch, one ``(original_size, crop_top_left, target_size)`` a row."""
    if not sizes:
        raise ValueError("batch_time_ids needs at least one (original, crop, target) triple")
    return torch.stack([add_time_ids(*triple) for triple in sizes])


def added_cond_kwargs(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet's ``added_cond_kwargs`` for SDXL's ``text_time`` conditioning."""
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}
