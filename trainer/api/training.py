"""The DiffusionTrainingJob resource: spec, status and the spec's resolved defaults."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from difftrain.api.base import (
    APIModel,
    Condition,
    ObjectMeta,
    SecretKeyRef,
    ShortText,
    StorageSpec,
    Uri,
    cel,
    conditions_field,
    rules,
    section,
)
from difftrain.api.cluster import ResourcesSpec
from difftrain.api.data import MAX_DATASETS, DatasetSpec, PreprocessingSpec, WeightedDatasetSpec
from difftrain.api.evaluation import (
    ClipScoreStatus,
    TrackingSpec,
    ValidationSpec,
    ValidationStatus,
)
from difftrain.api.methods import (
    DEFAULT_GRACE_PERIOD_SECONDS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_MAX_STEPS,
    CheckpointingSpec,
    ControlNetSpec,
    DreamBoothSpec,
    HyperparametersSpec,
    LoraSpec,
    Method,
    RegularizationSpec,
    SamplingSpec,
)

PredictionType = Literal["auto", "epsilon", "v_prediction"]


class BaseModelSpec(APIModel):
    """The pre-trained model to start from: a diffusers folder or single file, or a hub id."""

    model_config = rules(
        cel(
            "has(self.uri) != has(self.hub)",
            "set exactly one of baseModel.uri (a diffusers folder or .safetensors file in the "
            "store) and baseModel.hub (a model id, for clusters with internet access)",
        ),
        cel(
            "!has(self.tokenSecretRef) || has(self.hub)",
            "baseModel.tokenSecretRef is the model hub's token: set it with baseModel.hub",
        ),
        cel(
            "!has(self.tokenizerUri) || (has(self.uri) && (self.uri.endsWith('.safetensors') "
            "|| self.uri.endsWith('.ckpt')))",
            "baseModel.tokenizerUri is for single-file checkpoints (a .safetensors or .ckpt "
            "baseModel.uri); a diffusers folder brings its own tokenizer/",
        ),
    )

    uri: Uri | None = Field(
        default=None,
        description="A diffusers folder or a single-file .safetensors checkpoint (LDM key "
        "layout) in the object store (s3://bucket/prefix) or on a local path.",
    )
    hub: ShortText | None = Field(
        default=None,
        description="A model id on a model hub, such as 'org/model'. Needs internet access "
        "from the cluster; prefer uri for air-gapped clusters.",
    )
    revision: ShortText | None = Field(
        default=None, description="Hub revision (branch, tag or commit) to load."
    )
    variant: ShortText | None = Field(
        default=None, description="Weight variant to load, such as 'fp16'."
    )
    prediction_type: PredictionType = Field(
        default="auto",
        description="What the model predicts: 'auto' reads it from the scheduler config; "
        "'epsilon' or 'v_prediction' override it.",
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow loading pickle checkpoints (.ckpt, .pt, .bin). Unpickling runs "
        "arbitrary code; off by default so only safetensors are read.",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="For baseModel.hub: a Secret key holding the hub access token (gated or "
        "private models). It reaches the trainer as HF_TOKEN, never the job's ConfigMap.",
    )
    tokenizer_uri: Uri | None = Field(
        default=None,
        description="For a single-file checkpoint: its tokenizer folder (tokenizer.json, or "
        "vocab.json and merges.txt, with tokenizer_config.json) in the store or on a local path. "
        "Default: the tokenizer embedded in the file's header (difftrain's own exports), else a "
        "tokenizer/ folder beside the file.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> BaseModelSpec:
        if (self.uri is None) == (self.hub is None):
            raise ValueError(
                "set exactly one of baseModel.uri (a diffusers folder or .safetensors file in "
                "the store) and baseModel.hub (a model id, for clusters with internet access)"
            )
        if self.token_secret_ref is not None and self.hub is None:
            raise ValueError(
                "baseModel.tokenSecretRef is the model hub's token: set it with baseModel.hub"
            )
        if self.tokenizer_uri is not None and not (
            self.uri is not None and self.uri.endswith((".safetensors", ".ckpt"))
        ):
            raise ValueError(
                "baseModel.tokenizerUri is for single-file checkpoints (a .safetensors or .ckpt "
                "baseModel.uri); a diffusers folder brings its own tokenizer/"
            )
        return self


OutputFormat = Literal["diffusers", "single_file", "lora_peft", "lora_kohya"]
DEFAULT_FORMATS: dict[str, list[str]] = {
    "full": ["diffusers", "single_file"],
    "lora": ["lora_peft", "lora_kohya"],
    "controlnet": ["diffusers"],
}


class OutputSpec(APIModel):
    """Where checkpoints, samples and exports are written."""

    uri: Uri = Field(description="Output prefix (s3://bucket/prefix or a local folder).")
    formats: list[OutputFormat] | None = Field(
        default=None,
        min_length=1,
        max_length=4,
        description="Exports: 'diffusers' (folder), 'single_file' (.safetensors in the LDM "
        "layout for A1111/ComfyUI), 'lora_peft' and 'lora_kohya' (LoRA runs). Default: "
        "diffusers + single_file for full, both LoRA layouts for lora, diffusers for controlnet.",
    )


TrainingPhase = Literal[
    "Pending", "Queued", "Preparing", "Running", "Suspended", "Succeeded", "Failed"
]


class DiffusionTrainingJobSpec(APIModel):
    """What to fine-tune, on which data, how, and where the results go."""

    model_config = rules(
        cel(
            "self.method == 'lora' || !has(self.lora)",
            "lora is only allowed with method: lora",
            ".lora",
        ),
        cel(
            "self.method != 'lora' || has(self.lora)",
            "method: lora needs a lora block (lora: {} takes the defaults)",
            ".method",
        ),
        cel(
            "self.method == 'controlnet' || !has(self.controlnet)",
            "controlnet is only allowed with method: controlnet",
            ".controlnet",
        ),
        cel(
            "self.method != 'controlnet' || has(self.controlnet)",
            "method: controlnet needs a controlnet block with conditioningUri",
            ".method",
        ),
        cel(
            "!has(self.dreambooth) || self.method != 'controlnet'",
            "dreambooth works with method full or lora, not controlnet",
            ".dreambooth",
        ),
        cel(
            "!has(self.output.formats) || self.method == 'lora' || "
            "self.output.formats.all(f, !f.startsWith('lora'))",
            "output.formats lora_peft and lora_kohya need method: lora",
            ".output.formats",
        ),
        cel(
            "has(self.dataset) != has(self.datasets)",
            "set exactly one of dataset (one dataset) and datasets (several, each with a weight)",
        ),
        cel(
            "!has(self.datasets) || self.method != 'controlnet'",
            "datasets (several) does not work with method: controlnet, whose conditioning "
            "images are named by one dataset's keys; use dataset",
            ".datasets",
        ),
        cel(
            "has(self.storage) || !("
            "(has(self.dataset) && self.dataset.uri.startsWith('s3://')) || "
            "(has(self.datasets) && self.datasets.exists(d, d.uri.startsWith('s3://'))) || "
            "self.output.uri.startsWith('s3://') || "
            "(has(self.baseModel.uri) && self.baseModel.uri.startsWith('s3://')))",
            "storage (endpoint and secretRef) is needed when a uri is s3://",
            ".storage",
        ),
    )

    base_model: BaseModelSpec = Field(description="The pre-trained model to fine-tune.")
    dataset: DatasetSpec | None = Field(
        default=None, description="The training data (or datasets, for several)."
    )
    datasets: list[WeightedDatasetSpec] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_DATASETS,
        description="Several datasets instead of dataset, each read, cleaned (duplicates only "
        "within itself) and cached on its own, and sampled by its weight: each epoch takes "
        "weight / (sum of the weights) of its examples from a dataset, the epoch's length being "
        "the sum over the datasets of images times repeats; a dataset smaller than its share is "
        "cycled, each pass reshuffled, a larger one gives a different part of itself each epoch "
        "(all of it before any image repeats). Draws follow hyperparameters.seed and the epoch, "
        "so a resumed run sees the same. validation.fraction holds out that share of each "
        "dataset; validation.uri is cleaned with the first dataset's options.",
    )
    preprocessing: PreprocessingSpec = section(PreprocessingSpec, "Image preprocessing.")
    method: Method = Field(
        default="full",
        description="What is trained: 'full' (the UNet), 'lora' (adapters) or 'controlnet'.",
    )
    lora: LoraSpec | None = Field(default=None, description="LoRA settings (method lora).")
    controlnet: ControlNetSpec | None = Field(
        default=None, description="ControlNet settings (method controlnet)."
    )
    dreambooth: DreamBoothSpec | None = Field(
        default=None, description="Turns on DreamBooth data and prior preservation (full, lora)."
    )
    hyperparameters: HyperparametersSpec = section(HyperparametersSpec, "Optimisation.")
    regularization: RegularizationSpec = section(RegularizationSpec, "Regularisers.")
    sampling: SamplingSpec = section(SamplingSpec, "Samples during training.")
    checkpointing: CheckpointingSpec = section(CheckpointingSpec, "Checkpoints and resume.")
    validation: ValidationSpec = section(
        ValidationSpec, "A validation loss on held-out images (off until a split is set)."
    )
    tracking: TrackingSpec = section(
        TrackingSpec, "Experiment trackers (TensorBoard by default, MLflow, W&B)."
    )
    output: OutputSpec = Field(description="Where results are written.")
    storage: StorageSpec | None = Field(
        default=None, description="The object store; needed when any uri is s3://."
    )
    resources: ResourcesSpec = section(ResourcesSpec, "Workers, GPUs and scheduling.")
    suspend: bool = Field(
        default=False,
        description="Suspend the job: its pods are stopped (after a checkpoint) and it resumes "
        "from the newest checkpoint when set back to false.",
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries after pod failures (preemption does not count).",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Stop the job after this many seconds of running."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished child Job after this many seconds."
    )
    queue_name: Annotated[str, Field(max_length=63)] | None = Field(
        default=None,
        description="Kueue LocalQueue; passed on as the kueue.x-k8s.io/queue-name label.",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> DiffusionTrainingJobSpec:
        if self.lora is not None and self.method != "lora":
            raise ValueError("lora is only allowed with method: lora")
        if self.method == "lora" and self.lora is None:
            raise ValueError("method: lora needs a lora block (lora: {} takes the defaults)")
        if self.controlnet is not None and self.method != "controlnet":
            raise ValueError("controlnet is only allowed with method: controlnet")
        if self.method == "controlnet" and self.controlnet is None:
            raise ValueError("method: controlnet needs a controlnet block with conditioningUri")
        if self.dreambooth is not None and self.method == "controlnet":
            raise ValueError("dreambooth works with method full or lora, not controlnet")
        if (
            self.output.formats
            and self.method != "lora"
            and any(f.startswith("lora") for f in self.output.formats)
        ):
            raise ValueError("output.formats lora_peft and lora_kohya need method: lora")
        if (self.dataset is None) == (self.datasets is None):
            raise ValueError(
                "set exactly one of dataset (one dataset) and datasets (several, each with a "
                "weight)"
            )
        if self.datasets is not None and self.method == "controlnet":
            raise ValueError(
                "datasets (several) does not work with method: controlnet, whose conditioning "
                "images are named by one dataset's keys; use dataset"
            )
        uris = [d.uri for d in self.dataset_list] + [self.output.uri, self.base_model.uri or ""]
        if self.storage is None and any(u.startswith("s3://") for u in uris):
            raise ValueError("storage (endpoint and secretRef) is needed when a uri is s3://")
        return self

    # Resolved values: what the trainer runs with when a field was left unset.

    @property
    def dataset_list(self) -> list[DatasetSpec]:
        """The job's datasets: dataset alone, or each of datasets (with its weight)."""
        if self.datasets is not None:
            return list(self.datasets)
        return [self.dataset] if self.dataset is not None else []

    @property
    def learning_rate(self) -> float:
        """The learning rate, with the method's default when unset."""
        return self.hyperparameters.learning_rate or DEFAULT_LEARNING_RATE[self.method]

    @property
    def grace_period_seconds(self) -> int:
        """The pod's grace period for its last checkpoint, with the method's default when unset."""
        return self.checkpointing.grace_period_seconds or DEFAULT_GRACE_PERIOD_SECONDS[self.method]

    @property
    def output_formats(self) -> list[str]:
        """The export formats, with the method's default when unset."""
        return list(self.output.formats or DEFAULT_FORMATS[self.method])

    @property
    def lora_alpha(self) -> float | None:
        """LoRA alpha, defaulting to the rank; None unless method is lora."""
        if self.lora is None:
            return None
        return self.lora.alpha if self.lora.alpha is not None else float(self.lora.rank)

    def resolved(self) -> DiffusionTrainingJobSpec:
        """A copy with every method-dependent default filled in (for the trainer's ConfigMap)."""
        hp = self.hyperparameters.model_copy(update={"learning_rate": self.learning_rate})
        if hp.max_steps is None and hp.epochs is None:
            hp = hp.model_copy(update={"max_steps": DEFAULT_MAX_STEPS})
        update: dict[str, Any] = {
            "hyperparameters": hp,
            "output": self.output.model_copy(update={"formats": self.output_formats}),
            "checkpointing": self.checkpointing.model_copy(
                update={"grace_period_seconds": self.grace_period_seconds}
            ),
        }
        if self.lora is not None:
            update["lora"] = self.lora.model_copy(update={"alpha": self.lora_alpha})
        return self.model_copy(update=update)


class DatasetPartReport(APIModel):
    """One of spec.datasets in the cleaning report: what it kept and dropped, and its share."""

    uri: Annotated[str, Field(max_length=1024)] = Field(description="The dataset's uri.")
    weight: float = Field(default=1.0, gt=0, description="Its weight (spec.datasets[].weight).")
    total: int = Field(default=0, ge=0, description="Everything found in it (as total above).")
    kept: int = Field(default=0, ge=0, description="Its pairs kept for training.")
    dropped: dict[str, int] = Field(
        default_factory=dict, description="What it did not keep, by reason (as dropped above)."
    )
    examples_per_epoch: int = Field(
        default=0, ge=0, description="Examples it gives each epoch (its weight's share)."
    )
    share: float = Field(
        default=0.0, ge=0, le=1, description="examplesPerEpoch over the epoch's examples."
    )


class DatasetReport(APIModel):
    """What the cleaning kept and dropped."""

    total: int = Field(
        default=0,
        ge=0,
        description="Everything found, each counted once: images (with their caption file), "
        "shard samples, and every other file; always kept plus the sum of dropped.",
    )
    kept: int = Field(default=0, ge=0, description="Pairs kept for training.")
    dropped: dict[str, int] = Field(
        default_factory=dict,
        description="What was not kept, by reason: unsupported_format, orphan_caption, "
        "missing_image, not_in_metadata, corrupt, too_small, extreme_aspect_ratio, "
        "missing_caption, empty_caption, short_caption, banned_words, exact_duplicate, "
        "near_duplicate, missing_conditioning.",
    )
    notes: dict[str, int] = Field(
        default_factory=dict,
        description="Kept pairs used with a change, by kind: first_frame_only (an animated or "
        "multi-page image, trained on its first frame).",
    )
    truncated_captions: int = Field(
        default=0, ge=0, description="Captions longer than the text encoder's context."
    )
    augmented: int = Field(default=0, ge=0, description="Boomerang variants added.")
    examples: dict[str, Annotated[list[ShortText], Field(max_length=5)]] = Field(
        default_factory=dict,
        description="The first few keys (at most 5) dropped for each reason and kept with each "
        "note, so they can be found and fixed; with spec.datasets each key is prefixed by its "
        "dataset's position in the list and a colon ('1:cats/003').",
    )
    datasets: list[DatasetPartReport] = Field(
        default_factory=list,
        max_length=MAX_DATASETS,
        description="With spec.datasets: each dataset's part, in the list's order; the totals "
        "above are their sums.",
    )


class ExportedFile(APIModel):
    """One exported file or folder."""

    format: OutputFormat = Field(description="Export format.")
    uri: Annotated[str, Field(max_length=1024)] = Field(description="Where it was written.")
    sha256: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="sha256 of the file (of the manifest for folders)."
    )


RestartReason = Literal["Preempted", "Evicted", "NodeLost", "Interrupted", "Failed", "Suspended"]


class PodAccount(APIModel):
    """One worker pod in the operator's ledger: its GPUs and when it held them."""

    uid: Annotated[str, Field(max_length=64)] = Field(description="The pod's uid.")
    gpus: int = Field(default=0, ge=0, description="GPUs the pod held.")
    start_time: str = Field(
        description="When the pod started.", json_schema_extra={"format": "date-time"}
    )
    end_time: str | None = Field(
        default=None,
        description="When the pod ended (unset while it runs).",
        json_schema_extra={"format": "date-time"},
    )


class Accounting(APIModel):
    """The operator's ledger behind gpuHours and restarts, so that both only ever grow: pods
    that are gone (replaced, preempted, deleted with their Job) keep their GPU-hours."""

    closed_gpu_hours: float = Field(
        default=0.0, ge=0, description="GPU-hours of pods no longer in the ledger."
    )
    observed_at: str | None = Field(
        default=None,
        description="When the ledger was last brought up to date.",
        json_schema_extra={"format": "date-time"},
    )
    pods: list[PodAccount] = Field(
        default_factory=list, max_length=2048, description="Worker pods that exist or just ended."
    )


class DiffusionTrainingJobStatus(APIModel):
    """Observed state of a training job, written by the operator and the trainer."""

    phase: TrainingPhase | None = Field(default=None, description="Lifecycle phase.")
    conditions: list[Condition] = conditions_field()
    observed_generation: int | None = Field(
        default=None, description="Generation of the spec the status describes."
    )
    step: int | None = Field(default=None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    progress: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="step/totalSteps and percent, for kubectl get."
    )
    epoch: int | None = Field(default=None, ge=0, description="Current epoch.")
    loss: float | None = Field(default=None, description="Smoothed training loss.")
    validation: ValidationStatus | None = Field(
        default=None, description="The newest validation loss (with spec.validation)."
    )
    clip_score: ClipScoreStatus | None = Field(
        default=None,
        description="The newest CLIP score of the sample images (with spec.sampling.clipModelUri).",
    )
    images_per_second: float | None = Field(
        default=None, ge=0, description="Training throughput, all workers."
    )
    eta: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="Estimated time left, e.g. '1h20m'."
    )
    start_time: str | None = Field(
        default=None,
        description="When training started.",
        json_schema_extra={"format": "date-time"},
    )
    completion_time: str | None = Field(
        default=None,
        description="When the job finished.",
        json_schema_extra={"format": "date-time"},
    )
    restarts: int = Field(
        default=0,
        ge=0,
        description="Worker pods replaced so far, for any reason (preemption, eviction, node "
        "loss, the trainer's exit-75 restart, failure, suspension); never falls.",
    )
    last_restart_reason: RestartReason | None = Field(
        default=None,
        description="Why the last worker pod was replaced: Preempted, Evicted, NodeLost, "
        "Interrupted (the trainer checkpointed and asked for a restart, exit 75), Failed or "
        "Suspended.",
    )
    latest_checkpoint: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="URI of the newest complete checkpoint."
    )
    samples: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="URIs of the newest sample images."
    )
    outputs: list[ExportedFile] = Field(
        default_factory=list, max_length=16, description="Exported files."
    )
    dataset: DatasetReport | None = Field(default=None, description="Cleaning report.")
    gpu_hours: float | None = Field(
        default=None,
        ge=0,
        description="GPU-hours held by the job's pods so far, across restarts and preemptions; "
        "never falls.",
    )
    estimated_cost: float | None = Field(
        default=None, ge=0, description="gpuHours times the operator's price per GPU-hour."
    )
    accounting: Accounting | None = Field(
        default=None, description="The operator's ledger behind gpuHours and restarts."
    )


class DiffusionTrainingJob(APIModel):
    """A fine-tuning run of a diffusion model (full, LoRA, DreamBooth or ControlNet)."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["difftrain.dev/v1alpha1"] = "difftrain.dev/v1alpha1"
    kind: Literal["DiffusionTrainingJob"] = Field(default="DiffusionTrainingJob")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: DiffusionTrainingJobSpec
    status: DiffusionTrainingJobStatus | None = None
