"""The difftrain API: specs and statuses of DiffusionTrainingJob and ModelMerge.

This module is the single source of truth for both resources. The CRDs in ``crds/`` are generated
from it (``difftrain crds``), the operator validates with it and the trainer reads its run
configuration with it. It imports neither torch nor a Kubernetes client.

Field names are camelCase on the wire (aliases) and snake_case in Python. Every cross-field rule is
written twice, on purpose: as a CEL rule in ``x-kubernetes-validations`` so the API server refuses a
bad object at ``kubectl apply``, and as a pydantic validator so a local run or the operator refuses
the same object with the same message. ``tests/`` holds both to agreement.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from difftrain.api.base import (
    API_VERSION,
    DNS_LABEL_PATTERN,
    EXIT_CONFIG_ERROR,
    EXIT_INTERRUPTED,
    GROUP,
    QUANTITY_PATTERN,
    URI_PATTERN,
    VERSION,
    APIModel,
    Condition,
    ConfigMapKeyRef,
    ObjectMeta,
    Prompt,
    Quantity,
    SecretKeyRef,
    SecretKeyRefs,
    ShortText,
    SpecError,
    StorageSpec,
    Uri,
    cel,
    format_validation_error,
    rules,
    section,
)
from difftrain.api.cluster import (
    ResourcesSpec,
    Toleration,
)
from difftrain.api.data import (
    BoomerangSpec,
    BucketSpec,
    CaptionSpec,
    CleaningSpec,
    DatasetFormat,
    DatasetSpec,
    PreprocessingSpec,
    WeightedDatasetSpec,
)
from difftrain.api.evaluation import (
    DEFAULT_VALIDATION_TIMESTEPS,
    ClipScoreStatus,
    MLflowSpec,
    TrackerName,
    TrackingSpec,
    ValidationSpec,
    ValidationStatus,
    WandbSpec,
)
from difftrain.api.merge import (
    DIFFERENCE_METHODS,
    Component,
    MergeInput,
    MergeMethod,
    MergeOutput,
    MergePhase,
    MergeResources,
    ModelMerge,
    ModelMergeSpec,
    ModelMergeStatus,
    OutputDtype,
)
from difftrain.api.methods import (
    DEFAULT_GRACE_PERIOD_SECONDS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_MAX_STEPS,
    MIN_GRACE_PERIOD_SECONDS,
    CheckpointingSpec,
    ConditioningType,
    ControlNetSpec,
    DreamBoothSpec,
    EMASpec,
    HyperparametersSpec,
    LoraSpec,
    LRScheduler,
    Method,
    MixedPrecision,
    Optimizer,
    RegularizationSpec,
    SamplingSpec,
)
from difftrain.api.training import (
    DEFAULT_FORMATS,
    BaseModelSpec,
    DatasetPartReport,
    DatasetReport,
    DiffusionTrainingJob,
    DiffusionTrainingJobSpec,
    DiffusionTrainingJobStatus,
    ExportedFile,
    OutputFormat,
    OutputSpec,
    PredictionType,
    TrainingPhase,
)

RESOURCES: dict[str, type[DiffusionTrainingJob] | type[ModelMerge]] = {
    "DiffusionTrainingJob": DiffusionTrainingJob,
    "ModelMerge": ModelMerge,
}


def parse_resource(obj: dict[str, Any]) -> DiffusionTrainingJob | ModelMerge:
    """Validate a resource (as read from YAML or the API server); raise SpecError if invalid."""
    if not isinstance(obj, dict):
        raise SpecError("resource", ["(root): expected a mapping with apiVersion, kind and spec"])
    kind = obj.get("kind")
    if kind not in RESOURCES:
        raise SpecError(
            str(kind),
            [f"kind: expected one of {', '.join(RESOURCES)}, got {kind!r}"],
        )
    if obj.get("apiVersion") != API_VERSION:
        raise SpecError(
            kind, [f"apiVersion: expected {API_VERSION}, got {obj.get('apiVersion')!r}"]
        )
    try:
        return RESOURCES[kind].model_validate(obj)
    except ValidationError as exc:
        raise SpecError(kind, format_validation_error(exc)) from None


def parse_spec(kind: str, spec: dict[str, Any]) -> DiffusionTrainingJobSpec | ModelMergeSpec:
    """Validate just a spec of the given kind; raise SpecError if invalid."""
    model: type[DiffusionTrainingJobSpec] | type[ModelMergeSpec] = (
        DiffusionTrainingJobSpec if kind == "DiffusionTrainingJob" else ModelMergeSpec
    )
    try:
        return model.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(kind, [f"spec.{e}" for e in format_validation_error(exc)]) from None


__all__ = [
    "API_VERSION",
    "DEFAULT_FORMATS",
    "DEFAULT_GRACE_PERIOD_SECONDS",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_MAX_STEPS",
    "DEFAULT_VALIDATION_TIMESTEPS",
    "DIFFERENCE_METHODS",
    "DNS_LABEL_PATTERN",
    "EXIT_CONFIG_ERROR",
    "EXIT_INTERRUPTED",
    "GROUP",
    "MIN_GRACE_PERIOD_SECONDS",
    "QUANTITY_PATTERN",
    "RESOURCES",
    "URI_PATTERN",
    "VERSION",
    "APIModel",
    "BaseModelSpec",
    "BoomerangSpec",
    "BucketSpec",
    "CaptionSpec",
    "CheckpointingSpec",
    "CleaningSpec",
    "ClipScoreStatus",
    "Component",
    "Condition",
    "ConditioningType",
    "ConfigMapKeyRef",
    "ControlNetSpec",
    "DatasetFormat",
    "DatasetPartReport",
    "DatasetReport",
    "DatasetSpec",
    "DiffusionTrainingJob",
    "DiffusionTrainingJobSpec",
    "DiffusionTrainingJobStatus",
    "DreamBoothSpec",
    "EMASpec",
    "ExportedFile",
    "HyperparametersSpec",
    "LRScheduler",
    "LoraSpec",
    "MLflowSpec",
    "MergeInput",
    "MergeMethod",
    "MergeOutput",
    "MergePhase",
    "MergeResources",
    "Method",
    "MixedPrecision",
    "ModelMerge",
    "ModelMergeSpec",
    "ModelMergeStatus",
    "ObjectMeta",
    "Optimizer",
    "OutputDtype",
    "OutputFormat",
    "OutputSpec",
    "PredictionType",
    "PreprocessingSpec",
    "Prompt",
    "Quantity",
    "RegularizationSpec",
    "ResourcesSpec",
    "SamplingSpec",
    "SecretKeyRef",
    "SecretKeyRefs",
    "ShortText",
    "SpecError",
    "StorageSpec",
    "Toleration",
    "TrackerName",
    "TrackingSpec",
    "TrainingPhase",
    "Uri",
    "ValidationSpec",
    "ValidationStatus",
    "WandbSpec",
    "WeightedDatasetSpec",
    "cel",
    "format_validation_error",
    "parse_resource",
    "parse_spec",
    "rules",
    "section",
]
