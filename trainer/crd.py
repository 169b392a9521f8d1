"""Generate the CustomResourceDefinitions from the API models.

pydantic writes JSON Schema (2020-12); Kubernetes wants a *structural* OpenAPI v3.0 schema: every
node typed, no ``$ref``, ``anyOf`` only as a value validation, boolean ``exclusiveMinimum``,
``x-kubernetes-*`` extensions for free-form objects, int-or-string quantities and list semantics.
This module does that translation and adds what only a CRD has: names, printer columns, the status
subresource and the root-level transition rules.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from difftrain import api

JsonSchema = dict[str, Any]

# Keys of JSON Schema that mean the same in a structural OpenAPI v3 schema.
_KEEP = {
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "multipleOf",
    "required",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
}


def _resolve(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """Inline a ``$ref``, letting the referring node's keys (description, default) win."""
    if "$ref" not in node:
        return node
    target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
    extra = {k: v for k, v in node.items() if k != "$ref"}
    target.update(extra)
    return target


def _structural(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """Translate one pydantic JSON-Schema node into a structural OpenAPI v3 node."""
    node = _resolve(node, defs)
    branches = node.get("anyOf")
    if branches is not None:
        non_null = [_resolve(b, defs) for b in branches if b.get("type") != "null"]
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        if outer.get("default", "") is None:
            del outer["default"]  # Optional[...] = None: leave it out rather than store null
        types = sorted(b.get("type", "") for b in non_null)
        if types == ["integer", "string"]:
            out: JsonSchema = {
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer"}, {"type": "string"}],
            }
            for b in non_null:
                for key in ("pattern", "maxLength"):
                    if key in b:
                        out[key] = b[key]
            for k, v in outer.items():
                if k in _KEEP:
                    out[k] = v
            return out
        if len(non_null) != 1:
            raise TypeError(f"cannot express a union of {types} structurally: {node}")
        merged = dict(non_null[0])
        merged.update(outer)
        return _structural(merged, defs)

    out = {k: v for k, v in node.items() if k in _KEEP}
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        out["maximum"] = node["exclusiveMaximum"]
        out["exclusiveMaximum"] = True
    if "const" in node:
        out["enum"] = [node["const"]]
    kind = node.get("type")
    if kind is None and "enum" in node:
        kind = "string"
    if kind == "object":
        out["type"] = "object"
        props = node.get("properties")
        additional = node.get("additionalProperties")
        if props:
            out["properties"] = {name: _structural(sub, defs) for name, sub in props.items()}
        elif isinstance(additional, dict) and additional:
            out["additionalProperties"] = _structural(additional, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["type"] = "array"
        out["items"] = _structural(node["items"], defs)
    elif kind in ("string", "integer", "number", "boolean"):
        out["type"] = kind
    else:
        raise TypeError(f"schema node without a type: {node}")
    return out


_ORDER = ("type", "description", "required", "properties")


def _ordered(node: Any) -> Any:
    """Keys in the order people read a CRD: type and description first."""
    if isinstance(node, list):
        return [_ordered(n) for n in node]
    if not isinstance(node, dict):
        return node
    keys = sorted(node, key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), 0))
    return {k: node[k] if k in ("default", "enum") else _ordered(node[k]) for k in keys}


def openapi_schema(model: type[BaseModel]) -> JsonSchema:
    """The structural OpenAPI v3 schema of an API model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    ordered: JsonSchema = _ordered(_structural(raw, defs))
    return ordered


def _immutable_while_running(fields: list[str]) -> list[dict[str, str]]:
    """Root-level transition rules: these spec fields must not change once the job has started.

    The spec alone cannot tell whether a job runs, so the rules sit at the root where the old
    object's status is visible. Pending (not yet started) and finished jobs may change freely;
    suspend/resume and scheduling fields are never locked.
    """
    started = (
        "has(oldSelf.status) && has(oldSelf.status.phase) && "
        "oldSelf.status.phase in ['Preparing', 'Running', 'Suspended']"
    )
    rules = []
    for field in fields:
        same = (
            f"(has(self.spec.{field}) == has(oldSelf.spec.{field}) && "
            f"(!has(self.spec.{field}) || self.spec.{field} == oldSelf.spec.{field}))"
        )
        rules.append(
            api.cel(
                f"!({started}) || {same}",
                f"spec.{field} cannot change while the job runs; suspend it and create a new "
                "job, or wait until it finishes",
                f".spec.{field}",
            )
        )
    return rules


# Fields that define what is trained; changing them mid-run would make checkpoints meaningless.
TRAINING_IMMUTABLE_FIELDS = [
    "baseModel",
    "dataset",
    "datasets",
    "preprocessing",
    "method",
    "lora",
    "controlnet",
    "dreambooth",
    "hyperparameters",
    "output",
    "validation",  # which images are held out of training
]


def _crd(
    *,
    kind: str,
    plural: str,
    short_names: list[str],
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    description: str,
    columns: list[dict[str, str | int]],
    root_rules: list[dict[str, str]],
) -> dict[str, Any]:
    root: JsonSchema = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion of this object: difftrain.dev/v1alpha1.",
            },
            "kind": {"type": "string", "description": f"Kind of this object: {kind}."},
            "metadata": {"type": "object"},
            "spec": openapi_schema(spec_model),
            "status": openapi_schema(status_model),
        },
    }
    if root_rules:
        root["x-kubernetes-validations"] = root_rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{api.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "difftrain"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["difftrain", "all"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def training_job_crd() -> dict[str, Any]:
    """The DiffusionTrainingJob CRD."""
    return _crd(
        kind="DiffusionTrainingJob",
        plural="diffusiontrainingjobs",
        short_names=["dtj", "dtjob"],
        spec_model=api.DiffusionTrainingJobSpec,
        status_model=api.DiffusionTrainingJobStatus,
        description=(api.DiffusionTrainingJob.__doc__ or "").strip(),
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
            {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
            {"name": "Images/s", "type": "number", "jsonPath": ".status.imagesPerSecond"},
            {"name": "ETA", "type": "string", "jsonPath": ".status.eta", "priority": 1},
            {"name": "Method", "type": "string", "jsonPath": ".spec.method", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        root_rules=_immutable_while_running(TRAINING_IMMUTABLE_FIELDS),
    )


def model_merge_crd() -> dict[str, Any]:
    """The ModelMerge CRD."""
    return _crd(
        kind="ModelMerge",
        plural="modelmerges",
        short_names=["mmerge"],
        spec_model=api.ModelMergeSpec,
        status_model=api.ModelMergeStatus,
        description=(api.ModelMerge.__doc__ or "").strip(),
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
            {"name": "Hash", "type": "string", "jsonPath": ".status.shortHash"},
            {"name": "Output", "type": "string", "jsonPath": ".status.outputUri", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        root_rules=[],
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD, for every resource of the API."""
    return {
        f"{api.GROUP}_diffusiontrainingjobs.yaml": training_job_crd(),
        f"{api.GROUP}_modelmerges.yaml": model_merge_crd(),
    }


HEADER = "# Generated from difftrain.api by `difftrain crds`; do not edit by hand.\n"


def render(crd: dict[str, Any]) -> str:
    """A CRD as the YAML text that is committed."""
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=100, allow_unicode=True)


def write_crds(directory: Path) -> list[Path]:
    """Write every CRD into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, crd in all_crds().items():
        path = directory / name
        path.write_text(render(crd), encoding="utf-8")
        written.append(path)
    return written
