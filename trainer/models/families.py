"""Model families: what differs between SD1/SD2 and SDXL wherever a run touches the model.

A family says which text encoders and tokenizers a model has (the :class:`Components` attributes,
in pipeline order), how captions become the UNet's conditioning (one encoder's last hidden
state, or SDXL's two penultimate ones concatenated with a pooled embedding), what else the UNet
is called with (SDXL's ``added_cond_kwargs``), which diffusers pipeline draws its samples, which
resolution it trains at by default, and which training methods it supports. The loop, the
validation pass, sampling and export ask the family instead of branching on its name; a new
family is one more class here (or in its own module) and its entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from difftrain.data.cache_encode import token_ids


@dataclass(frozen=True)
class TextConditioning:
    """The UNet's text conditioning of a batch."""

    hidden: torch.Tensor
    """(B, tokens, D): ``encoder_hidden_states``."""
    pooled: torch.Tensor | None = None
    """(B, P): SDXL's pooled text embedding (``added_cond_kwargs['text_embeds']``)."""


class Family:
    """SD1.x: one CLIP text encoder, its last hidden state, nothing added."""

    name: ClassVar[str] = "sd1"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    default_resolution: ClassVar[int] = 512
    gradient_checkpointing: ClassVar[bool] = False
    """The default of hyperparameters.gradientCheckpointing for this family."""
    methods: ClassVar[frozenset[str]] = frozenset({"full", "lora", "controlnet"})
    boomerang: ClassVar[bool] = True
    """Whether Boomerang variants can be made with this family's pipeline."""
    caches_text: ClassVar[bool] = True
    """Whether the latent cache's text conditioning is used (SDXL's with its pooled embedding)."""
    size_conditioning: ClassVar[bool] = False
    """Whether the UNet is told each image's original size and crop (SDXL's time ids)."""

    def encoders(self, components: Any) -> list[torch.nn.Module]:
        return [getattr(components, name) for name in self.text_encoders]

    def encode(
        self,
        components: Any,
        captions: list[str],
        device: torch.device,
        encoders: Sequence[torch.nn.Module] | None = None,
    ) -> TextConditioning:
        """The conditioning of ``captions`` with ``encoders`` (default: the components')."""
        (encoder,) = encoders if encoders is not None else self.encoders(components)
        ids = token_ids(components.tokenizer, captions).to(device)
        hidden: torch.Tensor = encoder(ids)[0]
        return TextConditioning(hidden)

    def unet_kwargs(
        self, text: TextConditioning, time_ids: torch.Tensor | None, target: tuple[int, int]
    ) -> dict[str, Any]:
        """What the UNet and a ControlNet take besides the noisy latents, timesteps and
        ``encoder_hidden_states``; ``target`` is the batch's (height, width) in pixels."""
        return {}

    def pipeline(
        self,
        components: Any,
        unet: torch.nn.Module,
        scheduler: Any,
        *,
        text_encoders: Sequence[torch.nn.Module] | None = None,
        controlnet: torch.nn.Module | None = None,
    ) -> Any:
        """A diffusers pipeline around these networks (no safety checker)."""
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        (text_encoder,) = text_encoders if text_encoders is not None else self.encoders(components)
        parts = {
            "vae": components.vae,
            "text_encoder": text_encoder,
            "tokenizer": components.tokenizer,
            "unet": unet,
            "scheduler": scheduler,
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
        if controlnet is not None:
            return StableDiffusionControlNetPipeline(controlnet=controlnet, **parts)
        return StableDiffusionPipeline(**parts)


class SD2(Family):
    """SD2.x: as SD1 with OpenCLIP-H as its one encoder (768-pixel models are v-prediction)."""

    name: ClassVar[str] = "sd2"


class SDXL(Family):
    """SDXL: CLIP ViT-L and OpenCLIP bigG, their penultimate hidden states concatenated, bigG's
    pooled projection and six time ids (original size, crop corner, target size) added."""

    name: ClassVar[str] = "sdxl"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    default_resolution: ClassVar[int] = 1024
    # at 1024 px and batch 8 the activations, not the weights, decide whether a card is enough
    gradient_checkpointing: ClassVar[bool] = True
    methods: ClassVar[frozenset[str]] = frozenset({"full", "lora", "controlnet"})
    size_conditioning: ClassVar[bool] = True

    def encode(
        self,
        components: Any,
        captions: list[str],
        device: torch.device,
        encoders: Sequence[torch.nn.Module] | None = None,
    ) -> TextConditioning:
        from difftrain.models.sdxl import zero_for_dropout

        first, second = encoders if encoders is not None else self.encoders(components)
        ids_1 = token_ids(components.tokenizer, captions).to(device)
        out_1 = first(ids_1, output_hidden_states=True)
        out_2 = second(
            token_ids(components.tokenizer_2, captions).to(device), output_hidden_states=True
        )
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled: torch.Tensor = out_2.text_embeds
        # the base model's unconditional input is zeros (force_zeros_for_empty_prompt), so a
        # dropped (empty) caption trains towards zeros as well
        dropped = torch.tensor([not c for c in captions], device=hidden.device)
        if bool(dropped.any()):
            hidden, pooled = zero_for_dropout(hidden, pooled, dropped)
        return TextConditioning(hidden, pooled)

    def unet_kwargs(
        self, text: TextConditioning, time_ids: torch.Tensor | None, target: tuple[int, int]
    ) -> dict[str, Any]:
        from difftrain.models.sdxl import add_time_ids, added_cond_kwargs

        assert text.pooled is not None, "SDXL conditioning has a pooled embedding"
        if time_ids is None:  # no size facts (cached latents): the image as trained
            time_ids = add_time_ids(target, (0, 0), target).expand(text.pooled.shape[0], 6)
        return {"added_cond_kwargs": added_cond_kwargs(text.pooled, time_ids)}

    def pipeline(
        self,
        components: Any,
        unet: torch.nn.Module,
        scheduler: Any,
        *,
        text_encoders: Sequence[torch.nn.Module] | None = None,
        controlnet: torch.nn.Module | None = None,
    ) -> Any:
        from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

        first, second = text_encoders if text_encoders is not None else self.encoders(components)
        parts = {
            "vae": components.vae,
            "text_encoder": first,
            "text_encoder_2": second,
            "tokenizer": components.tokenizer,
            "tokenizer_2": components.tokenizer_2,
            "unet": unet,
            "scheduler": scheduler,
            "force_zeros_for_empty_prompt": True,
            "add_watermarker": False,
        }
        if controlnet is not None:
            return StableDiffusionXLControlNetPipeline(controlnet=controlnet, **parts)
        return StableDiffusionXLPipeline(**parts)


FAMILIES: dict[str, Family] = {f.name: f for f in (Family(), SD2(), SDXL())}


def family(name: str) -> Family:
    """The family registered as ``name`` (a loaded model's ``Components.family``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None
