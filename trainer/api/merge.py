"""The ModelMerge resource: inputs, method, output and status of a merge."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from difftrain.api.base import (
    APIModel,
    Condition,
    ObjectMeta,
    Quantity,
    ShortText,
    StorageSpec,
    Uri,
    cel,
    conditions_field,
    rules,
    section,
)

# ModelMerge

MergeMethod = Literal[
    "weighted_sum",
    "add_difference",
    "slerp",
    "ties",
    "dare",
    "block_weighted",
    "lora_into_checkpoint",
    "lora_merge",
]
DIFFERENCE_METHODS = ("add_difference", "ties", "dare")
Component = Literal["unet", "text_encoder", "text_encoder_2", "vae"]
OutputDtype = Literal["fp16", "bf16", "fp32"]


class MergeInput(APIModel):
    """One input model."""

    uri: Uri = Field(description="A .safetensors file or diffusers folder (store or local).")
    weight: float | None = Field(
        default=None,
        ge=-10.0,
        le=10.0,
        description="Weight of this input. weighted_sum: normalised to sum 1 (default equal; "
        "two models without weights use alpha). ties: task-vector weight, normalised over the "
        "inputs that agree in sign (default 1). dare: task-vector scale (default 1/N). LoRAs: "
        "strength (default 1). Give a weight to every model or to none.",
    )


class MergeOutput(APIModel):
    """Where the merged model is written."""

    uri: Uri = Field(description="Output .safetensors file (s3://bucket/key or local path).")


class MergeResources(APIModel):
    """Resources of the merge pod."""

    gpu: bool = Field(default=False, description="Run the arithmetic on one GPU.")
    gpu_resource_name: ShortText = Field(default="nvidia.com/gpu", description="GPU resource.")
    cpu: Quantity | None = Field(default=None, description="CPU request.")
    memory: Quantity | None = Field(default=None, description="Memory request.")
    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        default=None, description="Trainer image; defaults to the operator's setting."
    )


class ModelMergeSpec(APIModel):
    """Inputs, method and output of a checkpoint or LoRA merge."""

    model_config = rules(
        cel(
            "!(self.method in ['add_difference', 'ties', 'dare']) || has(self.base)",
            "method add_difference, ties and dare need a base model (base.uri) to take "
            "differences from",
            ".base",
        ),
        cel(
            "self.method != 'block_weighted' || has(self.blockWeights)",
            "method block_weighted needs blockWeights (one ratio per UNet block)",
            ".blockWeights",
        ),
        cel(
            "self.method != 'slerp' || size(self.models) == 2",
            "method slerp merges exactly two models",
            ".models",
        ),
        cel(
            "self.vaeSource != 'uri' || has(self.vaeUri)",
            "vaeSource: uri needs vaeUri",
            ".vaeUri",
        ),
    )

    models: list[MergeInput] = Field(
        min_length=2,
        max_length=16,
        description="Input models (two or more). For lora_into_checkpoint the first is the "
        "checkpoint and the rest are LoRAs.",
    )
    base: MergeInput | None = Field(
        default=None, description="Base model that differences are taken from."
    )
    method: MergeMethod = Field(default="weighted_sum", description="Merge method.")
    alpha: float = Field(
        default=0.5,
        ge=-10.0,
        le=10.0,
        description="Ratio toward the second model (weighted_sum, slerp) or scale of the "
        "difference (add_difference).",
    )
    block_weights: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="block_weighted: ratio toward the second model for each UNet block, in "
        "the order IN00.., M00, OUT00.. (25 for SD1/SD2, 19 for SDXL); the other UNet tensors "
        "(time embedding, output layers) use alpha.",
    )
    density: float = Field(
        default=0.2, gt=0.0, le=1.0, description="Fraction of each task vector kept (ties)."
    )
    drop_rate: float = Field(
        default=0.9, ge=0.0, lt=1.0, description="Fraction of each task vector dropped (dare)."
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of dare's drop mask.")
    lora_merge_mode: Literal["sum", "concat", "svd"] = Field(
        default="sum",
        description="lora_merge: 'sum' adds the factors (needs equal ranks; exact when the LoRAs "
        "share their down factors, the usual approximation otherwise), 'concat' stacks them "
        "(exact; ranks add up), 'svd' re-factors the exact summed update to loraRank.",
    )
    lora_rank: int | None = Field(
        default=None, ge=1, le=1024, description="Rank of the SVD re-extraction (lora_merge)."
    )
    components: list[Component] = Field(
        default=["unet", "text_encoder", "text_encoder_2", "vae"],
        min_length=1,
        max_length=4,
        description="Components merged; others are copied from the first model.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    vae_source: Literal["merge", "first", "base", "uri"] = Field(
        default="first",
        description="Where the VAE comes from: merged, the first model, the base, or vaeUri.",
    )
    vae_uri: Uri | None = Field(default=None, description="VAE to use with vaeSource: uri.")
    output_dtype: OutputDtype = Field(default="fp16", description="dtype of the output.")
    output: MergeOutput = Field(description="Where the merged model goes.")
    storage: StorageSpec | None = Field(default=None, description="The object store.")
    resources: MergeResources = section(MergeResources, "Resources of the merge pod.")
    allow_pickle: bool = Field(
        default=False, description="Allow pickle inputs (.ckpt); off so only safetensors load."
    )

    @model_validator(mode="after")
    def _cross_field(self) -> ModelMergeSpec:
        if self.method in DIFFERENCE_METHODS and self.base is None:
            raise ValueError(
                "method add_difference, ties and dare need a base model (base.uri) to take "
                "differences from"
            )
        if self.method == "block_weighted" and self.block_weights is None:
            raise ValueError("method block_weighted needs blockWeights (one ratio per UNet block)")
        if self.method == "slerp" and len(self.models) != 2:
            raise ValueError("method slerp merges exactly two models")
        if self.vae_source == "uri" and self.vae_uri is None:
            raise ValueError("vaeSource: uri needs vaeUri")
        return self


MergePhase = Literal["Pending", "Running", "Succeeded", "Failed"]


class ModelMergeStatus(APIModel):
    """Observed state of a merge."""

    phase: MergePhase | None = Field(default=None, description="Lifecycle phase.")
    conditions: list[Condition] = conditions_field()
    observed_generation: int | None = Field(default=None, description="Generation described.")
    output_uri: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="Where the merged model was written."
    )
    sha256: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="sha256 of the output file."
    )
    short_hash: Annotated[str, Field(max_length=10)] | None = Field(
        default=None, description="First 10 hex digits of sha256 (as A1111 and Civitai show)."
    )
    size_bytes: int | None = Field(default=None, ge=0, description="Output size in bytes.")
    tensors: int | None = Field(default=None, ge=0, description="Tensors in the output.")
    duration_seconds: float | None = Field(default=None, ge=0, description="Merge duration.")
    start_time: str | None = Field(
        default=None,
        description="When the merge started.",
        json_schema_extra={"format": "date-time"},
    )
    completion_time: str | None = Field(
        default=None,
        description="When the merge finished.",
        json_schema_extra={"format": "date-time"},
    )


class ModelMerge(APIModel):
    """A merge of checkpoints or LoRAs into one model."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["difftrain.dev/v1alpha1"] = "difftrain.dev/v1alpha1"
    kind: Literal["ModelMerge"] = Field(default="ModelMerge")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: ModelMergeSpec
    status: ModelMergeStatus | None = None
