"""Feedback during training: the validation loss on held-out images and the experiment trackers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from difftrain.api.base import APIModel, SecretKeyRef, ShortText, Uri, cel, rules

DEFAULT_VALIDATION_TIMESTEPS = [100, 300, 500, 700, 900]


class ValidationSpec(APIModel):
    """A validation loss on images the model never trains on, at fixed timesteps and noise.

    Each held-out image is noised at every timestep of ``timesteps`` with noise fixed by
    ``seed`` (image i at timestep j always gets the same noise), so two evaluations of the same
    weights give the same number and a falling value means the model generalises, not that the
    draws were kind. It runs in eval mode, without gradients, with the EMA weights when
    regularization.ema is on (the weights samples and exports use), else the trained weights.
    """

    model_config = rules(
        cel(
            "!(has(self.uri) && self.fraction > 0.0)",
            "set validation.fraction (a share of dataset.uri held out) or validation.uri (a "
            "separate validation dataset), not both",
        ),
        cel(
            "!has(self.timesteps) || self.timesteps.all(t, self.timesteps.exists_one(u, u == t))",
            "validation.timesteps lists a timestep twice; list each once",
            ".timesteps",
        ),
    )

    fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=0.5,
        description="Share of the cleaned dataset held out of training for the validation "
        "loss, chosen by a hash of each image's key, so adding images never moves one between "
        "the splits. 0 (and no uri): no validation.",
    )
    uri: Uri | None = Field(
        default=None,
        description="A separate validation dataset (same format as dataset.uri, cleaned with "
        "the same settings), instead of fraction.",
    )
    every_steps: int = Field(
        default=100,
        ge=1,
        le=10_000_000,
        description="Compute the validation loss every this many optimizer steps, and at the "
        "end of training.",
    )
    max_images: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Evaluate at most this many held-out images (the first by key hash), so an "
        "evaluation costs the same however large the held-out split grows.",
    )
    timesteps: list[Annotated[int, Field(ge=0, le=9999)]] = Field(
        default=DEFAULT_VALIDATION_TIMESTEPS,
        min_length=1,
        max_length=32,
        description="Noise timesteps each image is evaluated at; the loss is the mean squared "
        "error over images and timesteps. Each must be below the model's number of training "
        "timesteps (1000 for Stable Diffusion).",
    )
    seed: int = Field(
        default=0, ge=0, le=2**32 - 1, description="Seed of the fixed validation noise."
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Images per forward pass while validating. Default: hyperparameters.batchSize.",
    )

    @property
    def enabled(self) -> bool:
        """Whether a validation split is configured."""
        return self.uri is not None or self.fraction > 0

    @model_validator(mode="after")
    def _one_source(self) -> ValidationSpec:
        if self.uri is not None and self.fraction > 0:
            raise ValueError(
                "set validation.fraction (a share of dataset.uri held out) or validation.uri (a "
                "separate validation dataset), not both"
            )
        if len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError("validation.timesteps lists a timestep twice; list each once")
        return self


TrackerName = Literal["tensorboard", "mlflow", "wandb"]
DEFAULT_TRACKERS: tuple[TrackerName, ...] = ("tensorboard",)


class MLflowSpec(APIModel):
    """An MLflow tracking server."""

    tracking_uri: Annotated[str, Field(min_length=1, max_length=1024)] = Field(
        description="The MLflow tracking server, e.g. 'http://mlflow.mlops.svc:5000'."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="A Secret key holding the server's token; it reaches the trainer as "
        "MLFLOW_TRACKING_TOKEN, never the job's ConfigMap.",
    )


class WandbSpec(APIModel):
    """Weights & Biases."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="A Secret key holding the W&B API key; it reaches the trainer as "
        "WANDB_API_KEY, never the job's ConfigMap. Needed in a cluster.",
    )
    entity: ShortText | None = Field(
        default=None, description="The W&B team or user the run belongs to."
    )
    base_url: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        default=None, description="A self-hosted W&B server's address."
    )


class TrackingSpec(APIModel):
    """Experiment trackers, through Accelerate: the training loss, learning rate, validation
    loss and sample grids, logged at the steps the status shows them."""

    model_config = rules(
        cel(
            "!has(self.backends) || self.backends.all(b, self.backends.exists_one(c, c == b))",
            "tracking.backends lists a tracker twice; list each once",
            ".backends",
        ),
        cel(
            "!has(self.backends) || !self.backends.exists(b, b == 'mlflow') || has(self.mlflow)",
            "tracking.backends mlflow needs tracking.mlflow.trackingUri",
            ".backends",
        ),
        cel(
            "!has(self.mlflow) || (has(self.backends) && self.backends.exists(b, b == 'mlflow'))",
            "tracking.mlflow is set but tracking.backends does not list mlflow; add it",
            ".mlflow",
        ),
        cel(
            "!has(self.wandb) || (has(self.backends) && self.backends.exists(b, b == 'wandb'))",
            "tracking.wandb is set but tracking.backends does not list wandb; add it",
            ".wandb",
        ),
    )

    backends: list[TrackerName] = Field(
        default=list(DEFAULT_TRACKERS),
        max_length=3,
        description="Trackers to log to: 'tensorboard' (event files committed to "
        "<output.uri>/tracking/tensorboard/ beside the samples), 'mlflow' and 'wandb' (their "
        "package must be in the trainer image). Empty: no tracker.",
    )
    project: ShortText = Field(
        default="difftrain",
        description="The project (W&B), experiment (MLflow) or folder (TensorBoard) of the run.",
    )
    run_name: ShortText | None = Field(
        default=None, description="The run's name in the trackers. Default: the job's name."
    )
    mlflow: MLflowSpec | None = Field(default=None, description="MLflow (backend mlflow).")
    wandb: WandbSpec | None = Field(default=None, description="Weights & Biases (backend wandb).")

    @model_validator(mode="after")
    def _backends(self) -> TrackingSpec:
        if len(set(self.backends)) != len(self.backends):
            raise ValueError("tracking.backends lists a tracker twice; list each once")
        if "mlflow" in self.backends and self.mlflow is None:
            raise ValueError("tracking.backends mlflow needs tracking.mlflow.trackingUri")
        if self.mlflow is not None and "mlflow" not in self.backends:
            raise ValueError(
                "tracking.mlflow is set but tracking.backends does not list mlflow; add it"
            )
        if self.wandb is not None and "wandb" not in self.backends:
            raise ValueError(
                "tracking.wandb is set but tracking.backends does not list wandb; add it"
            )
        return self


class ValidationStatus(APIModel):
    """The newest validation loss."""

    loss: float = Field(description="Mean validation loss over held-out images and timesteps.")
    step: int = Field(ge=0, description="The optimizer step it was computed at.")
    images: int = Field(ge=0, description="Held-out images evaluated.")
    weights: Literal["ema", "trained"] = Field(
        description="Which weights were evaluated: the EMA weights or the trained ones."
    )


class ClipScoreStatus(APIModel):
    """The newest CLIP score of the sample images (with spec.sampling.clipModelUri)."""

    score: float = Field(
        ge=0.0,
        description="Mean over the sample images of 100 x the cosine similarity of the image's "
        "and its prompt's CLIP embeddings, clamped at 0.",
    )
    step: int = Field(ge=0, description="The optimizer step of the samples.")
    images: int = Field(ge=0, description="Sample images scored.")
    weights: Literal["ema", "trained"] = Field(
        description="Which weights made the samples: the EMA weights or the trained ones."
    )
