"""What is trained: the UNet (full), LoRA adapters (PEFT) or a ControlNet, and their weights.

Each method says which modules learn, how their weights go into and come out of a checkpoint,
and how the noise prediction is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difftrain.api import DiffusionTrainingJobSpec

TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TrainingConfigError(ValueError):
    """Options that cannot work together or here; the message names the field and the fix."""


@dataclass
class TrainedModules:
    """The modules of one run and which of them learn."""

    method: str
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    controlnet: torch.nn.Module | None
    train_text_encoder: bool
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second encoder

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """Name -> text encoder, in the family's order (``text_encoder``, ``text_encoder_2``)."""
        out = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.text_encoder_2
        return out

    def learners(self) -> dict[str, torch.nn.Module]:
        """Name -> module with trainable parameters (what the optimizer and DDP see)."""
        out: dict[str, torch.nn.Module] = {}
        if self.method == "controlnet":
            assert self.controlnet is not None
            out["controlnet"] = self.controlnet
        else:
            out["unet"] = self.unet
        if self.train_text_encoder:
            out.update(self.text_encoders())
        return out


def attach(spec: DiffusionTrainingJobSpec, components: Any) -> TrainedModules:
    """Freeze what does not learn and add adapters or a ControlNet as the method asks."""
    from difftrain.models.families import family

    fam = family(components.family)
    if spec.method not in fam.methods:
        raise TrainingConfigError(
            f"method {spec.method!r} is not supported for {fam.name.upper()} base models yet; "
            f"use one of {sorted(fam.methods)}"
        )
    unet = components.unet
    text_encoder = components.text_encoder
    encoders = [getattr(components, name) for name in fam.text_encoders]
    components.vae.requires_grad_(False)
    for encoder in encoders:
        encoder.requires_grad_(False)
    controlnet = None
    train_te = False
    if spec.method == "full":
        unet.requires_grad_(True)
    elif spec.method == "lora":
        from peft import LoraConfig

        assert spec.lora is not None
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=spec.lora.rank,
                lora_alpha=spec.lora_alpha,
                lora_dropout=spec.lora.dropout,
                init_lora_weights="gaussian",
                target_modules=list(spec.lora.target_modules),
            )
        )
        if spec.lora.train_text_encoder:
            from peft import inject_adapter_in_model

            # transformers' own add_adapter needs a newer peft than exists; inject directly
            for encoder in encoders:  # SDXL: both
                inject_adapter_in_model(
                    LoraConfig(
                        r=spec.lora.rank,
                        lora_alpha=spec.lora_alpha,
                        lora_dropout=spec.lora.dropout,
                        init_lora_weights="gaussian",
                        target_modules=TEXT_ENCODER_LORA_TARGETS,
                    ),
                    encoder,
                )
                for name, param in encoder.named_parameters():
                    param.requires_grad_("lora_" in name)
            train_te = True
        if not any(p.requires_grad for p in unet.parameters()):
            raise TrainingConfigError(
                f"lora.targetModules {spec.lora.target_modules} matched no module of the UNet; "
                "use names such as to_q, to_k, to_v, to_out.0"
            )
    elif spec.method == "controlnet":
        from diffusers import ControlNetModel

        unet.requires_grad_(False)
        # the conditioning encoder downsamples images to latent size: one stride-2 stage per
        # VAE level (SD's (16, 32, 96, 256) for its 8x VAE)
        levels = len(components.vae.config.block_out_channels) - 1
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[: levels + 1]
        )
        controlnet.requires_grad_(True)
    else:
        raise TrainingConfigError(f"method {spec.method!r} is not full, lora or controlnet")
    second = encoders[1] if len(encoders) > 1 else None
    return TrainedModules(spec.method, unet, text_encoder, controlnet, train_te, second)


def trainable_state(modules: TrainedModules, unwrap: Any) -> dict[str, torch.Tensor]:
    """The learned weights, prefixed by module name, for checkpoints."""
    out: dict[str, torch.Tensor] = {}
    for name, module in modules.learners().items():
        module = unwrap(module)
        if modules.method == "lora":
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(module)
        else:
            state = module.state_dict()
        out.update({f"{name}.{k}": v for k, v in state.items()})
    return out


def load_trainable(modules: TrainedModules, state: dict[str, torch.Tensor], unwrap: Any) -> None:
    """Put checkpointed weights back; every learned tensor must be present."""
    for name, module in modules.learners().items():
        module = unwrap(module)
        part = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        if modules.method == "lora":
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(module, part)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise TrainingConfigError(
                    f"the checkpoint's {name} adapter does not match lora settings "
                    f"(unexpected {unexpected[:3]}); start a new output.uri or restore the settings"
                )
        else:
            module.load_state_dict(part, strict=True)


def predict(
    modules: TrainedModules,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    conditioning: torch.Tensor | None,
    *,
    unet: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    added: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The UNet's prediction, through the ControlNet's residuals for method controlnet;
    ``added``: what the family adds to both calls (SDXL's ``added_cond_kwargs``)."""
    added = added or {}
    if modules.method == "controlnet":
        assert controlnet is not None and conditioning is not None
        down, mid = controlnet(
            noisy,
            timesteps,
            encoder_hidden_states=text,
            controlnet_cond=conditioning.to(noisy.dtype),
            return_dict=False,
            **added,
        )
        out: torch.Tensor = unet(
            noisy,
            timesteps,
            encoder_hidden_states=text,
            down_block_additional_residuals=[d.to(noisy.dtype) for d in down],
            mid_block_additional_residual=mid.to(noisy.dtype),
            **added,
        ).sample
        return out
    pred: torch.Tensor = unet(noisy, timesteps, encoder_hidden_states=text, **added).sample
    return pred
