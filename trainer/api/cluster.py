"""Where a job runs: workers, GPUs and scheduling of its pods."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from difftrain.api.base import APIModel, Quantity, ShortText


class Toleration(APIModel):
    """A pod toleration (as in core/v1)."""

    key: ShortText | None = Field(default=None, description="Taint key; empty matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Match operator.")
    value: ShortText | None = Field(default=None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect; empty matches all."
    )
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays after the taint."
    )


class ResourcesSpec(APIModel):
    """Workers, GPUs and scheduling of the training pods."""

    workers: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Nodes (pods) that train together; more than one uses an Indexed Job and "
        "a headless Service for rendezvous.",
    )
    gpus_per_worker: int = Field(
        default=1, ge=0, le=16, description="GPUs requested by each worker (0: CPU only)."
    )
    gpu_resource_name: ShortText = Field(
        default="nvidia.com/gpu", description="Extended resource name of the GPUs."
    )
    cpu: Quantity | None = Field(default=None, description="CPU request per worker, e.g. '8'.")
    memory: Quantity | None = Field(
        default=None, description="Memory request per worker, e.g. '64Gi'."
    )
    shm_size: Quantity = Field(
        default="8Gi", description="Size of the memory-backed /dev/shm for data loaders."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Tolerations of the pods."
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="Pod affinity, as in core/v1 Affinity."
    )
    priority_class_name: ShortText | None = Field(
        default=None, description="PriorityClass of the pods."
    )
    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        default=None, description="Trainer image; defaults to the operator's setting."
    )
