"""The API models: defaults, cross-field rules and the errors users see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from difftrain import api

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def minimal_job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "baseModel": {"uri": "/models/sd15"},
        "dataset": {"uri": "/data/pets"},
        "output": {"uri": "/runs/pets"},
    }
    base.update(spec)
    return base


def refused(kind: str, spec: dict[str, Any]) -> str:
    with pytest.raises(api.SpecError) as info:
        api.parse_spec(kind, spec)
    return str(info.value)


def test_defaults_follow_the_field_starting_points():
    spec = api.parse_spec("DiffusionTrainingJob", minimal_job())
    assert isinstance(spec, api.DiffusionTrainingJobSpec)
    assert spec.hyperparameters.batch_size == 8
    assert spec.learning_rate == 1e-6
    assert spec.preprocessing.resolution == 512
    assert spec.hyperparameters.optimizer == "adamw"
    assert spec.hyperparameters.lr_scheduler == "constant"
    assert spec.hyperparameters.mixed_precision == "bf16"
    assert spec.resources.workers == 1
    assert spec.output_formats == ["diffusers", "single_file"]


def test_lora_gets_a_higher_learning_rate_and_alpha_equal_to_rank():
    spec = api.parse_spec("DiffusionTrainingJob", minimal_job(method="lora", lora={"rank": 8}))
    assert isinstance(spec, api.DiffusionTrainingJobSpec)
    assert spec.learning_rate == 1e-4 > 1e-6
    assert spec.lora_alpha == 8.0
    assert spec.output_formats == ["lora_peft", "lora_kohya"]


def test_resolved_spec_fills_every_method_dependent_default():
    spec = api.parse_spec("DiffusionTrainingJob", minimal_job(method="lora", lora={}))
    assert isinstance(spec, api.DiffusionTrainingJobSpec)
    wire = spec.resolved().to_wire()
    assert wire["hyperparameters"]["learningRate"] == 1e-4
    assert wire["hyperparameters"]["maxSteps"] == api.DEFAULT_MAX_STEPS
    assert wire["lora"]["alpha"] == 16.0
    assert wire["output"]["formats"] == ["lora_peft", "lora_kohya"]
    # the resolved spec is itself valid and resolves to itself
    again = api.parse_spec("DiffusionTrainingJob", wire)
    assert isinstance(again, api.DiffusionTrainingJobSpec)
    assert again.resolved().to_wire() == wire


@pytest.mark.parametrize(
    ("method", "blocks", "seconds"),
    [
        ("full", {}, 600),
        ("controlnet", {"controlnet": {"conditioningUri": "/data/edges"}}, 300),
        ("lora", {"lora": {}}, 120),
    ],
)
def test_grace_period_defaults_to_the_time_the_methods_checkpoint_needs(method, blocks, seconds):
    spec = api.parse_spec("DiffusionTrainingJob", minimal_job(method=method, **blocks))
    assert isinstance(spec, api.DiffusionTrainingJobSpec)
    assert spec.checkpointing.grace_period_seconds is None
    assert spec.grace_period_seconds == seconds == api.DEFAULT_GRACE_PERIOD_SECONDS[method]
    assert spec.resolved().to_wire()["checkpointing"]["gracePeriodSeconds"] == seconds


def test_a_jobs_own_grace_period_wins_over_the_methods_default():
    spec = api.parse_spec(
        "DiffusionTrainingJob",
        minimal_job(method="lora", lora={}, checkpointing={"gracePeriodSeconds": 900}),
    )
    assert isinstance(spec, api.DiffusionTrainingJobSpec)
    assert spec.grace_period_seconds == 900
    assert spec.resolved().checkpointing.grace_period_seconds == 900


def test_compile_is_left_to_the_device_unless_set():
    spec = api.parse_spec("DiffusionTrainingJob", minimal_job())
    assert isinstance(spec, api.DiffusionTrainingJobSpec)
    assert spec.hyperparameters.compile is None  # on for a GPU, off for a CPU
    off = api.parse_spec("DiffusionTrainingJob", minimal_job(hyperparameters={"compile": False}))
    assert isinstance(off, api.DiffusionTrainingJobSpec)
    assert off.hyperparameters.compile is False
    assert off.resolved().to_wire()["hyperparameters"]["compile"] is False


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (minimal_job(lora={"rank": 4}), "lora", "only allowed with method: lora"),
        (minimal_job(method="lora"), "method", "needs a lora block"),
        (minimal_job(method="controlnet"), "controlnet", "conditioningUri"),
        (
            minimal_job(dreambooth={"instancePrompt": "a photo of sks dog"}),
            "dreambooth.classPrompt",
            "priorPreservation",
        ),
        (
            minimal_job(hyperparameters={"batchSize": -1}),
            "hyperparameters.batchSize",
            "greater than or equal to 1",
        ),
        (minimal_job(hyperparameters={"maxSteps": 50}), "warmupSteps", "below maxSteps"),
        (
            minimal_job(hyperparameters={"maxSteps": 50, "epochs": 2, "warmupSteps": 0}),
            "maxSteps or hyperparameters.epochs",
            "not both",
        ),
        (minimal_job(resources={"workers": 0}), "resources.workers", "greater than or equal to 1"),
        (minimal_job(method="dance"), "spec.method", "'full', 'lora' or 'controlnet'"),
        (minimal_job(dataset={}), "spec.dataset.uri", "required field is missing"),
        (minimal_job(dataset={"uri": "/d", "formt": "jsonl"}), "dataset.formt", "unknown field"),
        (
            minimal_job(baseModel={"uri": "/m", "hub": "org/m"}),
            "baseModel",
            "exactly one of baseModel.uri",
        ),
        (minimal_job(dataset={"uri": "s3://data/pets"}), "storage", "needed when a uri is s3://"),
        (minimal_job(output={"uri": "/o", "formats": ["lora_kohya"]}), "lora_kohya", "method"),
        (minimal_job(preprocessing={"resolution": 500}), "preprocessing.resolution", "multiple"),
        (minimal_job(dataset={"uri": "http://x/y"}), "spec.dataset.uri", "neither s3://bucket"),
        (
            minimal_job(checkpointing={"gracePeriodSeconds": 10}),
            "checkpointing.gracePeriodSeconds",
            "greater than or equal to 30",
        ),
        (minimal_job(hyperparameters={"compile": "often"}), "hyperparameters.compile", "boolean"),
    ],
)
def test_invalid_training_specs_are_refused_naming_the_field(spec, field, words):
    message = refused("DiffusionTrainingJob", spec)
    assert field in message
    assert words in message


def datasets_job(datasets: Any, **spec: Any) -> dict[str, Any]:
    """minimal_job with spec.datasets instead of spec.dataset."""
    job = minimal_job(datasets=datasets, **spec)
    del job["dataset"]
    return job


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (
            minimal_job(datasets=[{"uri": "/data/cats"}]),
            "spec",
            "set exactly one of dataset (one dataset) and datasets (several, each with a weight)",
        ),
        (
            datasets_job(None),
            "spec",
            "set exactly one of dataset (one dataset) and datasets (several, each with a weight)",
        ),
        (datasets_job([]), "spec.datasets", "at least 1 item"),
        (datasets_job([{"uri": "/d"}] * 17), "spec.datasets", "at most 16 items"),
        (datasets_job([{"uri": "/d", "weight": 0}]), "spec.datasets[0].weight", "greater than 0"),
        (datasets_job([{"uri": "/d"}, {"weight": 2}]), "spec.datasets[1].uri", "missing"),
        (
            datasets_job([{"uri": "/d"}, {"uri": "s3://data/cats"}]),
            "storage",
            "needed when a uri is s3://",
        ),
        (
            datasets_job(
                [{"uri": "/d"}, {"uri": "/e"}],
                method="controlnet",
                controlnet={"conditioningUri": "/c"},
            ),
            "spec",
            "datasets (several) does not work with method: controlnet",
        ),
        (
            datasets_job([{"uri": "/d", "captions": {"keepTokens": 1}}]),
            "spec.datasets[0].captions",
            "keepTokens has no effect",
        ),
    ],
)
def test_datasets_rules_name_the_fields(spec, field, words):
    message = refused("DiffusionTrainingJob", spec)
    assert field in message
    assert words in message


def test_several_datasets_keep_their_own_options_and_weights():
    spec = api.parse_spec(
        "DiffusionTrainingJob",
        datasets_job(
            [
                {"uri": "/data/cats", "weight": 3, "repeats": 2, "captions": {"shuffleTags": True}},
                {"uri": "/data/dogs", "cleaning": {"minResolution": 64}},
            ]
        ),
    )
    assert isinstance(spec, api.DiffusionTrainingJobSpec)
    assert spec.dataset is None
    first, second = spec.dataset_list
    assert isinstance(first, api.WeightedDatasetSpec)
    assert (first.uri, first.weight, first.repeats, first.captions.shuffle_tags) == (
        "/data/cats",
        3.0,
        2,
        True,
    )
    assert isinstance(second, api.WeightedDatasetSpec)
    assert (second.weight, second.cleaning.min_resolution) == (1.0, 64)
    one = api.parse_spec("DiffusionTrainingJob", minimal_job())
    assert isinstance(one, api.DiffusionTrainingJobSpec)
    assert [d.uri for d in one.dataset_list] == ["/data/pets"] and one.datasets is None


def merge_spec(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "models": [{"uri": "/m/a.safetensors"}, {"uri": "/m/b.safetensors"}],
        "output": {"uri": "/m/out.safetensors"},
    }
    base.update(spec)
    return base


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (merge_spec(method="add_difference"), "need a base model"),
        (merge_spec(method="ties"), "need a base model"),
        (merge_spec(method="block_weighted"), "blockWeights"),
        (merge_spec(models=[{"uri": "/a"}]), "spec.models: List should have at least 2 items"),
        (
            merge_spec(method="slerp", models=[{"uri": "/a"}, {"uri": "/b"}, {"uri": "/c"}]),
            "exactly two models",
        ),
        (merge_spec(outputDtype="int8"), "spec.outputDtype"),
        (merge_spec(vaeSource="uri"), "vaeUri"),
    ],
)
def test_invalid_merge_specs_are_refused(spec, words):
    assert words in refused("ModelMerge", spec)


def test_merge_defaults():
    spec = api.parse_spec("ModelMerge", merge_spec())
    assert isinstance(spec, api.ModelMergeSpec)
    assert spec.method == "weighted_sum"
    assert spec.alpha == 0.5
    assert spec.output_dtype == "fp16"
    assert spec.components == ["unet", "text_encoder", "text_encoder_2", "vae"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    # Other kinds beside ours (the store's Secret) are checked by the real API server in
    # tests/integration/test_examples.py.
    ours = [
        doc
        for doc in yaml.safe_load_all(path.read_text())
        if str(doc.get("apiVersion", "")).startswith("difftrain.dev/")
    ]
    assert ours or path.name == "store-secret.yaml", f"{path.name} holds no difftrain resource"
    for doc in ours:
        resource = api.parse_resource(doc)
        assert resource.metadata.name


def test_wrong_kind_and_api_version_are_named():
    with pytest.raises(api.SpecError, match="kind: expected one of"):
        api.parse_resource({"kind": "Pod", "apiVersion": "v1"})
    with pytest.raises(api.SpecError, match=r"apiVersion: expected difftrain.dev/v1alpha1"):
        api.parse_resource({"kind": "ModelMerge", "apiVersion": "v1", "spec": merge_spec()})
    with pytest.raises(api.SpecError, match="expected a mapping"):
        api.parse_resource(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_api_imports_no_torch_and_no_kubernetes_client():
    import subprocess
    import sys

    code = (
        "import sys, difftrain.api, difftrain.crd; "
        "bad = [m for m in ('torch', 'kubernetes', 'kopf') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_tokenizer_uri_is_only_for_single_files():
    from difftrain.api.training import BaseModelSpec

    assert BaseModelSpec.model_validate(
        {"uri": "s3://models/sd.safetensors", "tokenizerUri": "s3://models/tok"}
    )
    with pytest.raises(ValueError, match="tokenizerUri is for single-file checkpoints"):
        BaseModelSpec.model_validate({"uri": "s3://models/sd15", "tokenizerUri": "s3://models/tok"})
