"""A job's settings checked against its base model's family, and the family's defaults filled in.

Run right after the base model is loaded, before any data is read: a method or option the
family does not support is refused with the field named, and the fields the user left unset
take the family's defaults (SDXL trains at 1024 pixels with gradient checkpointing).
"""

from __future__ import annotations

from difftrain.api import DiffusionTrainingJobSpec
from difftrain.models.families import Family
from difftrain.train.methods import TrainingConfigError


def for_family(
    spec: DiffusionTrainingJobSpec, written: DiffusionTrainingJobSpec, fam: Family
) -> DiffusionTrainingJobSpec:
    """``spec`` (resolved) for a base model of family ``fam``; ``written`` is the spec as the
    user wrote it (to tell a field left unset from one set to its default)."""
    label = fam.name.upper()
    if spec.method not in fam.methods:
        raise TrainingConfigError(
            f"method {spec.method!r} is not supported for {label} base models yet; use one of "
            f"{', '.join(sorted(fam.methods))}, or an SD1.x/SD2.x base model"
        )
    if spec.preprocessing.boomerang.enabled and not fam.boomerang:
        raise TrainingConfigError(
            f"preprocessing.boomerang.enabled: Boomerang variants are not made for {label} base "
            "models yet; turn it off"
        )
    pre = spec.preprocessing
    unset = "resolution" not in written.preprocessing.model_fields_set
    if unset and pre.resolution != fam.default_resolution:
        pre = pre.model_copy(update={"resolution": fam.default_resolution})
        spec = spec.model_copy(update={"preprocessing": pre})
    hp = spec.hyperparameters
    unset = "gradient_checkpointing" not in written.hyperparameters.model_fields_set
    if unset and hp.gradient_checkpointing != fam.gradient_checkpointing:
        hp = hp.model_copy(update={"gradient_checkpointing": fam.gradient_checkpointing})
        spec = spec.model_copy(update={"hyperparameters": hp})
    return spec
