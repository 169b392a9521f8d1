"""What is trained and how: method blocks, optimisation, regularisers, samples, checkpoints."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from difftrain.api.base import APIModel, Prompt, Uri, cel, rules, section

Method = Literal["full", "lora", "controlnet"]
_PLACEHOLDER = re.compile(r"\{(\w*)\}")


class LoraSpec(APIModel):
    """LoRA adapter settings (PEFT)."""

    rank: int = Field(default=16, ge=1, le=1024, description="Rank of the LoRA matrices.")
    alpha: float | None = Field(
        default=None,
        gt=0,
        le=4096,
        description="LoRA alpha (scale = alpha / rank); defaults to the rank.",
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default=["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        max_length=64,
        description="Names of the modules that get adapters (the UNet's attention projections "
        "by default).",
    )
    train_text_encoder: bool = Field(
        default=False, description="Also put adapters on the text encoder(s)."
    )


ConditioningType = Literal["canny", "depth", "pose", "segmentation", "scribble", "normal", "other"]


class ControlNetSpec(APIModel):
    """ControlNet training: a ControlNet initialised from the UNet, fed conditioning images."""

    conditioning_uri: Uri = Field(
        description="Where the conditioning images are; each is paired with the training image "
        "of the same key (file name without extension)."
    )
    conditioning_type: ConditioningType = Field(
        default="other",
        description="What the conditioning images show; recorded in the exported ControlNet's "
        "safetensors header (difftrain.controlnet.conditioning_type).",
    )
    conditioning_scale: float = Field(
        default=1.0,
        ge=0.0,
        le=10.0,
        description="Scale of the ControlNet's residuals in the samples made during training "
        "(0: the UNet alone); recorded in the export's header too.",
    )


class DreamBoothSpec(APIModel):
    """DreamBooth: teach a subject from a few images, with prior preservation."""

    model_config = rules(
        cel(
            "!self.priorPreservation || has(self.classPrompt)",
            "dreambooth.classPrompt is needed when priorPreservation is on "
            "(e.g. 'a photo of a dog'), or set priorPreservation: false",
        )
    )

    instance_prompt: Prompt = Field(
        description="Prompt naming the subject with its identifier, e.g. 'a photo of sks dog'. "
        "It replaces each instance image's caption, unless it holds {caption}: then it is a "
        "template the image's own caption (as drawn, after the dataset's caption tools) goes "
        "into, e.g. 'a photo of sks dog, {caption}'."
    )
    class_prompt: Prompt | None = Field(
        default=None, description="Prompt for the subject's class, e.g. 'a photo of a dog'."
    )
    prior_preservation: bool = Field(
        default=True, description="Add the prior-preservation loss on class images."
    )
    class_data_uri: Uri | None = Field(
        default=None,
        description="Class images to use; when unset (or too few), they are generated with the "
        "base model from classPrompt.",
    )
    num_class_images: int = Field(
        default=100, ge=1, le=100000, description="Class images used for prior preservation."
    )
    prior_loss_weight: float = Field(
        default=1.0, ge=0.0, le=100.0, description="Weight of the prior-preservation loss."
    )

    @model_validator(mode="after")
    def _placeholders(self) -> DreamBoothSpec:
        unknown = sorted(set(_PLACEHOLDER.findall(self.instance_prompt)) - {"caption"})
        if unknown:
            raise ValueError(
                f"dreambooth.instancePrompt: unknown placeholder {{{unknown[0]}}}; the only one "
                "is {caption} (the image's own caption)"
            )
        return self

    @model_validator(mode="after")
    def _class_prompt(self) -> DreamBoothSpec:
        if self.prior_preservation and self.class_prompt is None:
            raise ValueError(
                "dreambooth.classPrompt is needed when priorPreservation is on "
                "(e.g. 'a photo of a dog'), or set priorPreservation: false"
            )
        return self


Optimizer = Literal["adamw", "adamw8bit"]
LRScheduler = Literal["constant", "cosine", "linear"]
MixedPrecision = Literal["no", "fp16", "bf16"]

DEFAULT_LEARNING_RATE: dict[str, float] = {"full": 1e-6, "lora": 1e-4, "controlnet": 1e-5}
DEFAULT_MAX_STEPS = 1000


class HyperparametersSpec(APIModel):
    """Optimisation settings."""

    model_config = rules(
        cel(
            "!(has(self.maxSteps) && has(self.epochs))",
            "set hyperparameters.maxSteps or hyperparameters.epochs, not both",
        ),
        cel(
            "!has(self.maxSteps) || self.warmupSteps < self.maxSteps",
            "hyperparameters.warmupSteps (default 100) must be below maxSteps",
            ".warmupSteps",
        ),
    )

    batch_size: int = Field(
        default=8, ge=1, le=4096, description="Images per step on each process (GPU)."
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Peak learning rate. Default: 1e-6 for method full, 1e-4 for lora, 1e-5 "
        "for controlnet.",
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description=f"Optimizer steps to train. Default {DEFAULT_MAX_STEPS} when neither "
        "maxSteps nor epochs is set.",
    )
    epochs: int | None = Field(
        default=None, ge=1, le=100_000, description="Passes over the dataset (instead of maxSteps)."
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step."
    )
    optimizer: Optimizer = Field(
        default="adamw",
        description="'adamw' (fused on CUDA) or 'adamw8bit' (needs bitsandbytes in the image).",
    )
    lr_scheduler: LRScheduler = Field(
        default="constant", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: int = Field(default=100, ge=0, le=10_000_000, description="Linear warm-up steps.")
    mixed_precision: MixedPrecision = Field(
        default="bf16",
        description="Autocast precision: 'bf16', 'fp16' (with loss scaling) or 'no'.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass to save memory."
    )
    compile: bool | None = Field(
        default=None,
        description="Compile the UNet with torch.compile; when compilation fails the trainer "
        "warns and trains in eager mode. Default: on when training on a GPU, off on a CPU.",
    )
    seed: int = Field(
        default=42, ge=0, le=2**32 - 1, description="Seed for data order, noise and dropout."
    )

    @model_validator(mode="after")
    def _steps(self) -> HyperparametersSpec:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set hyperparameters.maxSteps or hyperparameters.epochs, not both")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError("hyperparameters.warmupSteps (default 100) must be below maxSteps")
        return self


class EMASpec(APIModel):
    """Exponential moving average of the trained weights, used for samples and exports."""

    enabled: bool = Field(default=False, description="Keep EMA weights.")
    decay: float = Field(default=0.9999, gt=0.0, lt=1.0, description="Maximum EMA decay.")
    warmup_steps: int = Field(
        default=0, ge=0, description="Steps before the EMA starts following the weights."
    )
    offload_to_cpu: bool = Field(
        default=False, description="Keep the EMA weights in CPU memory to save GPU memory."
    )


class RegularizationSpec(APIModel):
    """Regularisers."""

    ema: EMASpec = section(EMASpec, "EMA weights.")
    weight_decay: float = Field(default=1e-2, ge=0.0, le=1.0, description="AdamW weight decay.")
    caption_dropout: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Probability of training on an empty caption (helps classifier-free guidance).",
    )
    snr_gamma: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description="Min-SNR-γ loss weighting; 5.0 is the usual value. Unset turns it off.",
    )
    noise_offset: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Noise offset (0.05–0.1 helps very dark or bright images).",
    )
    max_grad_norm: float = Field(
        default=1.0, gt=0.0, le=1000.0, description="Gradient clipping norm."
    )


class SamplingSpec(APIModel):
    """Sample images made during training from fixed prompts and seeds."""

    every_steps: int = Field(
        default=500, ge=0, description="Make samples every this many steps (0: only at the end)."
    )
    prompts: list[Prompt] = Field(
        default_factory=list,
        max_length=16,
        description="Prompts to sample; empty uses a few captions from the dataset.",
    )
    negative_prompt: Annotated[str, Field(max_length=2048)] | None = Field(
        default=None, description="Negative prompt for every sample."
    )
    num_inference_steps: int = Field(default=25, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(
        default=7.5, ge=0.0, le=100.0, description="Classifier-free guidance scale."
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the first sample.")
    clip_model_uri: Uri | None = Field(
        default=None,
        description="A CLIP model to score the samples with: a transformers CLIPModel folder "
        "(config.json, safetensors weights, tokenizer and preprocessor_config.json, as "
        "save_pretrained writes them) in the object store or a local folder. Each time samples "
        "are made, their CLIP score (100 x the cosine similarity of each image's and its "
        "prompt's embeddings, at least 0, averaged over the images) is reported in "
        "status.clipScore, the difftrain_clip_score metric and the trackers. Unset: no score.",
    )


# Seconds a stopped trainer pod has for its last checkpoint (terminationGracePeriodSeconds), by
# method: finish the step, then copy, write, sha256 and upload the checkpoint. A full fine-tune
# of an SD1.5-sized UNet with AdamW moments and EMA is ~14 GB (SDXL ~3x), a ControlNet ~6 GB, a
# LoRA well under 1 GB; each default leaves room for a slow store. 600 s is also the longest
# the Kubernetes cluster autoscaler waits for a pod on a node it scales down.
DEFAULT_GRACE_PERIOD_SECONDS: dict[str, int] = {"full": 600, "controlnet": 300, "lora": 120}
MIN_GRACE_PERIOD_SECONDS = 30


class CheckpointingSpec(APIModel):
    """Periodic checkpoints, committed atomically and resumed from automatically."""

    every_steps: int = Field(default=500, ge=1, description="Checkpoint every this many steps.")
    keep_last: int = Field(default=3, ge=1, le=1000, description="Checkpoints kept (newest).")
    grace_period_seconds: int | None = Field(
        default=None,
        ge=MIN_GRACE_PERIOD_SECONDS,
        le=86400,
        description="Seconds a deleted, evicted or preempted trainer pod has to finish its step "
        "and write its last checkpoint (the pod's terminationGracePeriodSeconds). Default: 600 "
        "for method full, 300 for controlnet, 120 for lora.",
    )
