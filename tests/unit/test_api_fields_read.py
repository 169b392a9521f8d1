"""Every field of both specs is read by the product: the operator or the trainer, not only the API.

A field that only `difftrain.api` knows (parsed, validated, written to the CRD, read nowhere) is a
promise the product does not keep. "Read" means an attribute of that name is accessed in the
operator's or the trainer's code outside `difftrain.api` (ast, not text: comments and docstrings do
not count). Models handed on whole (a toleration goes to the pod spec as it is) are named below,
and the test checks that they arrive whole.

Limits: a field whose name is also an attribute of something else (``uri``, ``seed``) counts as
read wherever that name is accessed; this test finds fields that nothing reads, while the feature
tests check what each field does.
"""

from __future__ import annotations

import ast
import typing

from pydantic import BaseModel

from difftrain import api
from difftrain_operator.builders import build_training_children
from tests.infra.environment import REPO
from tests.unit.test_operator_builders import SETTINGS, training_job

# models whose every field the product passes on whole (`to_wire()`), and where
PASSED_WHOLE = {api.Toleration: "the trainer pods' tolerations"}
# fields the product reads through an accessor of the API that applies their default
READ_THROUGH: dict[tuple[type[BaseModel], str], str] = {
    (api.OutputSpec, "formats"): "output_formats"
}


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def spec_fields(model: type[BaseModel], path: str) -> list[tuple[str, str, type[BaseModel]]]:
    """(wire path, Python name, owning model) of every field under ``model``, nested included."""
    found: list[tuple[str, str, type[BaseModel]]] = []
    seen: set[type[BaseModel]] = set()

    def walk(m: type[BaseModel], prefix: str) -> None:
        for name, field in m.model_fields.items():
            wire = f"{prefix}.{field.alias or name}"
            found.append((wire, name, m))
            for sub in _models_in(field.annotation):
                if sub not in seen:
                    seen.add(sub)
                    walk(sub, wire)

    walk(model, path)
    return found


def _attributes_read() -> set[str]:
    """Attribute names accessed in the operator's and the trainer's code outside the API."""
    names: set[str] = set()
    sources = [*(REPO / "trainer").rglob("*.py"), *(REPO / "operator").rglob("*.py")]
    api_dir = REPO / "trainer" / "api"
    for path in sources:
        if api_dir in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    return names


def test_the_walk_finds_every_field_of_both_specs():
    fields = {wire for wire, _, _ in spec_fields(api.DiffusionTrainingJobSpec, "spec")}
    assert {"spec.controlnet.conditioningScale", "spec.resources.tolerations.effect"} <= fields
    assert "spec.hyperparameters.learningRate" in fields and len(fields) > 100
    merge = {wire for wire, _, _ in spec_fields(api.ModelMergeSpec, "spec")}
    assert "spec.alpha" in merge and "spec.output.uri" in merge


def test_every_spec_field_is_read_outside_the_api():
    read = _attributes_read()
    unread = [
        f"{kind}: {wire}"
        for kind, model in (
            ("DiffusionTrainingJob", api.DiffusionTrainingJobSpec),
            ("ModelMerge", api.ModelMergeSpec),
        )
        for wire, name, owner in spec_fields(model, "spec")
        if name not in read
        and owner not in PASSED_WHOLE
        and READ_THROUGH.get((owner, name), "") not in read
    ]
    assert not unread, (
        "fields that neither the operator nor the trainer reads (make them work or remove them "
        "from the API):\n" + "\n".join(unread)
    )


def test_models_passed_whole_arrive_whole():
    toleration = {
        "key": "nvidia.com/gpu",
        "operator": "Equal",
        "value": "h100",
        "effect": "NoExecute",
        "tolerationSeconds": 30,
    }
    assert set(toleration) == {f.alias or n for n, f in api.Toleration.model_fields.items()}, (
        "a new Toleration field: add it here"
    )
    children = build_training_children(
        training_job(resources={"tolerations": [toleration]}), "uid-1", SETTINGS
    )
    assert children.job["spec"]["template"]["spec"]["tolerations"] == [toleration]
    assert set(PASSED_WHOLE) == {api.Toleration}


def test_fields_read_through_an_accessor_reach_it():
    job = training_job(output={"uri": "s3://runs/pets", "formats": ["single_file"]})
    assert job.spec.output_formats == ["single_file"]
    assert training_job().spec.output_formats == ["diffusers", "single_file"]  # full's default
    assert set(READ_THROUGH) == {(api.OutputSpec, "formats")}
