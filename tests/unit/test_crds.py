"""The generated CRDs: fresh, structural, and documented field by field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from difftrain import crd

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
CHART_CRD_DIR = REPO / "charts" / "difftrain" / "crds"


def schema_of(obj: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = obj["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("directory", [CRD_DIR, CHART_CRD_DIR], ids=["crds", "chart"])
@pytest.mark.parametrize("name", sorted(crd.all_crds()))
def test_committed_crds_match_the_api(name, directory):
    committed = (directory / name).read_text(encoding="utf-8")
    assert committed == crd.render(crd.all_crds()[name]), (
        f"{directory.relative_to(REPO)}/{name} is stale: run `make crds`"
    )


def test_stale_check_command_fails_on_a_changed_file(tmp_path, capsys):
    from difftrain.cli import main

    crd.write_crds(tmp_path)
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 0
    victim = next(tmp_path.iterdir())
    victim.write_text(victim.read_text().replace("Phase", "Stage"))
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 1
    assert victim.name in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(crd.all_crds()))
def test_every_field_is_typed_and_described(name):
    schema = schema_of(crd.all_crds()[name])
    for path, node in walk(schema):
        assert "$ref" not in node and "allOf" not in node, path
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type (not structural)"
        documented = path.startswith((".spec", ".status"))
        if documented and not path.endswith("[]") and "{}" not in path:
            assert node.get("description"), f"{path} has no description"


def test_defaults_enums_and_printer_columns():
    dtj = crd.training_job_crd()
    spec = schema_of(dtj)["properties"]["spec"]["properties"]
    hp = spec["hyperparameters"]["properties"]
    assert hp["batchSize"]["default"] == 8
    assert spec["preprocessing"]["properties"]["resolution"]["default"] == 512
    assert spec["method"]["enum"] == ["full", "lora", "controlnet"]
    assert "1e-6" in hp["learningRate"]["description"]
    assert spec["preprocessing"]["default"] == {}
    names = dtj["spec"]["names"]
    assert names["shortNames"] == ["dtj", "dtjob"]
    assert "difftrain" in names["categories"]
    columns = [c["name"] for c in dtj["spec"]["versions"][0]["additionalPrinterColumns"]]
    for wanted in ("Phase", "Progress", "Loss", "Images/s", "Age"):
        assert wanted in columns
    assert dtj["spec"]["versions"][0]["subresources"] == {"status": {}}
    merge = crd.model_merge_crd()
    assert merge["spec"]["names"]["shortNames"] == ["mmerge"]


def test_cel_rules_and_pydantic_validators_say_the_same():
    """Each CEL message is also raised by the model, so both layers refuse with one voice."""
    api_dir = Path(crd.__file__).parent / "api"
    source = "".join(p.read_text(encoding="utf-8") for p in api_dir.glob("*.py"))
    for crd_obj in crd.all_crds().values():
        for path, node in walk(schema_of(crd_obj)):
            if path == "":
                continue  # root transition rules need the old object: only the server has it
            for rule in node.get("x-kubernetes-validations", []):
                assert source.count(rule["message"][:40]) >= 2, (
                    f"{path}: CEL message without a matching pydantic check: {rule['message']}"
                )


def test_crd_yaml_parses_as_one_document_each():
    for path in CRD_DIR.glob("*.yaml"):
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 1
        assert docs[0]["kind"] == "CustomResourceDefinition"
