"""The generated CRDs on a real kube-apiserver: accepted, refused, explained and listed."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from difftrain import api
from tests.integration.resources import PLURALS, create, model_merge, refusal, training_job

pytestmark = pytest.mark.usefixtures("crds_installed")


def test_examples_are_accepted_and_read_back_through_the_model(
    control_plane, namespace, examples_dir
):
    result = control_plane.kubectl("apply", "-n", namespace, "-f", str(examples_dir))
    assert result.stdout.count("created") == len(list(examples_dir.glob("*.yaml")))
    for kind in PLURALS.values():
        listing = json.loads(
            control_plane.kubectl("get", kind, "-n", namespace, "-o", "json").stdout
        )
        assert listing["items"]
        for item in listing["items"]:
            resource = api.parse_resource(item)
            assert resource.metadata.namespace == namespace


def test_server_applies_the_defaults_of_the_api(kube_api, namespace):
    stored = create(kube_api, namespace, training_job("defaults"))
    spec = stored["spec"]
    assert spec["hyperparameters"]["batchSize"] == 8
    assert spec["preprocessing"]["resolution"] == 512
    assert spec["preprocessing"]["cacheLatents"] is True
    assert spec["method"] == "full"
    assert spec["resources"]["gpuResourceName"] == "nvidia.com/gpu"
    assert "learningRate" not in spec["hyperparameters"]  # method-dependent: resolved by the model
    assert "gracePeriodSeconds" not in spec["checkpointing"]  # so is the grace period
    assert "compile" not in spec["hyperparameters"]  # on a GPU, off on a CPU: the trainer decides
    model = api.parse_spec("DiffusionTrainingJob", spec)
    assert isinstance(model, api.DiffusionTrainingJobSpec)
    assert model.learning_rate == 1e-6
    assert model.grace_period_seconds == 600


def several(name: str, datasets: Any, **spec: Any) -> dict[str, Any]:
    """A training job with spec.datasets (and no spec.dataset); a None section is left out."""
    body = training_job(name, datasets=datasets, **spec)
    del body["spec"]["dataset"]
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    return body


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (training_job("enum", method="dance"), "spec.method", "Unsupported value"),
        (
            training_job("neg", hyperparameters={"batchSize": -1}),
            "spec.hyperparameters.batchSize",
            "greater than or equal to 1",
        ),
        (training_job("lora", method="lora"), "spec.method", "needs a lora block"),
        (training_job("lora2", lora={"rank": 4}), "spec.lora", "only allowed with method: lora"),
        (training_job("nouri", dataset={"format": "jsonl"}), "spec.dataset.uri", "Required value"),
        (
            training_job("db", dreambooth={"instancePrompt": "sks dog"}),
            "spec.dreambooth",
            "classPrompt is needed",
        ),
        (
            training_job("steps", hyperparameters={"maxSteps": 10}),
            "spec.hyperparameters.warmupSteps",
            "below maxSteps",
        ),
        (
            training_job("both", baseModel={"uri": "/m", "hub": "org/m"}),
            "spec.baseModel",
            "exactly one of baseModel.uri",
        ),
        (
            training_job("tok", baseModel={"uri": "/m", "tokenizerUri": "/t"}),
            "spec.baseModel",
            "tokenizerUri is for single-file checkpoints",
        ),
        (
            training_job("res", preprocessing={"resolution": 500}),
            "spec.preprocessing.resolution",
            "multiple of 8",
        ),
        (
            training_job("grace", checkpointing={"gracePeriodSeconds": 10}),
            "spec.checkpointing.gracePeriodSeconds",
            "greater than or equal to 30",
        ),
        (
            training_job("workers", resources={"workers": 0}),
            "spec.resources.workers",
            "greater than or equal to 1",
        ),
        (
            training_job("scheme", dataset={"uri": "http://host/data"}),
            "spec.dataset.uri",
            "should match",
        ),
        (
            training_job("keep", dataset={"uri": "/d", "captions": {"keepTokens": 1}}),
            "spec.dataset.captions.keepTokens",
            "has no effect without shuffleTags or tagDropout",
        ),
        (
            training_job("tagdrop", dataset={"uri": "/d", "captions": {"tagDropout": 1.5}}),
            "spec.dataset.captions.tagDropout",
            "less than or equal to 1",
        ),
        (
            training_job("repeats", dataset={"uri": "/d", "repeats": 0}),
            "spec.dataset.repeats",
            "greater than or equal to 1",
        ),
        (
            training_job("typo", dataset={"uri": "/d", "formt": "jsonl"}),
            "spec.dataset.formt",
            "unknown field",
        ),
        (
            training_job("both-sets", datasets=[{"uri": "/d"}]),
            "spec",
            "set exactly one of dataset (one dataset) and datasets (several, each with a weight)",
        ),
        (
            several("no-sets", None),
            "spec",
            "set exactly one of dataset (one dataset) and datasets (several, each with a weight)",
        ),
        (several("w0", [{"uri": "/d", "weight": 0}]), "spec.datasets[0].weight", "greater than 0"),
        (several("many", [{"uri": "/d"}] * 17), "spec.datasets", "must have at most 16 items"),
        (
            several("keep2", [{"uri": "/d"}, {"uri": "/e", "captions": {"keepTokens": 2}}]),
            "spec.datasets[1].captions.keepTokens",
            "has no effect without shuffleTags or tagDropout",
        ),
        (
            several(
                "s3-set",
                [{"uri": "/d"}, {"uri": "s3://datasets/cats"}],
                baseModel={"uri": "/m"},
                output={"uri": "/o"},
                storage=None,
            ),
            "spec.storage",
            "storage (endpoint and secretRef) is needed when a uri is s3://",
        ),
        (
            several(
                "cn-sets",
                [{"uri": "/d"}, {"uri": "/e"}],
                method="controlnet",
                controlnet={"conditioningUri": "/c"},
            ),
            "spec.datasets",
            "datasets (several) does not work with method: controlnet",
        ),
        (model_merge("diff", method="add_difference"), "spec.base", "need a base model"),
        (model_merge("one", models=[{"uri": "/a"}]), "spec.models", "should have at least 2 items"),
        (model_merge("dtype", outputDtype="int8"), "spec.outputDtype", "Unsupported value"),
    ],
    ids=lambda v: v["metadata"]["name"] if isinstance(v, dict) else None,
)
def test_invalid_resources_are_refused_naming_the_field(kube_api, namespace, body, field, words):
    message = refusal(kube_api, namespace, body)
    assert field in message, message
    assert words in message, message
    # the model refuses the same spec, naming the same field or rule
    with pytest.raises(api.SpecError):
        api.parse_resource(body)


def test_kubectl_explain_teaches_the_fields(control_plane):
    out = control_plane.kubectl("explain", "dtj.spec.hyperparameters.learningRate").stdout
    assert "Peak learning rate" in out
    assert "1e-6" in out
    out = control_plane.kubectl("explain", "mmerge.spec.method").stdout
    assert "weighted_sum" in out


def _set_status(kube_api, namespace: str, name: str, status: dict) -> None:
    client.CustomObjectsApi(kube_api).patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, "diffusiontrainingjobs", name, {"status": status}
    )


def test_kubectl_get_shows_the_printer_columns(control_plane, kube_api, namespace):
    create(kube_api, namespace, training_job("cols"))
    _set_status(
        kube_api,
        namespace,
        "cols",
        {
            "phase": "Running",
            "progress": "250/1000 (25%)",
            "loss": 0.1234,
            "imagesPerSecond": 57.4,
            "step": 250,
            "totalSteps": 1000,
        },
    )
    out = control_plane.kubectl("get", "dtj", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "IMAGES/S", "AGE"]
    row = out[1].split()
    assert row[:6] == ["cols", "Running", "250/1000", "(25%)", "0.1234", "57.4"]
    # the category lists it too
    assert "cols" in control_plane.kubectl("get", "difftrain", "-n", namespace).stdout


def test_training_fields_are_immutable_while_running_but_suspend_is_not(kube_api, namespace):
    objects = client.CustomObjectsApi(kube_api)
    create(kube_api, namespace, training_job("imm"))

    def patch(spec: dict) -> None:
        objects.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, "diffusiontrainingjobs", "imm", {"spec": spec}
        )

    patch({"hyperparameters": {"batchSize": 4}})  # not started yet: allowed
    _set_status(kube_api, namespace, "imm", {"phase": "Running"})
    with pytest.raises(ApiException) as info:
        patch({"hyperparameters": {"batchSize": 16}})
    assert "spec.hyperparameters cannot change while the job runs" in str(info.value.body)
    with pytest.raises(ApiException) as info:
        patch({"method": "lora", "lora": {}})
    assert "spec.method cannot change while the job runs" in str(info.value.body)
    patch({"suspend": True})
    patch({"resources": {"nodeSelector": {"pool": "spot"}}})
    _set_status(kube_api, namespace, "imm", {"phase": "Succeeded"})
    patch({"hyperparameters": {"batchSize": 2}})  # finished: the job no longer depends on it
    stored = objects.get_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, "diffusiontrainingjobs", "imm"
    )
    assert stored["spec"]["suspend"] is True
    assert stored["spec"]["hyperparameters"]["batchSize"] == 2


def test_kubectl_wait_for_succeeded_condition(control_plane, kube_api, namespace):
    create(kube_api, namespace, training_job("done"))
    waiter = subprocess.Popen(
        [
            str(control_plane.bin_dir / "kubectl"),
            f"--kubeconfig={control_plane.kubeconfig}",
            "wait",
            "--for=condition=Succeeded",
            "--timeout=60s",
            "-n",
            namespace,
            "dtj/done",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _set_status(
        kube_api,
        namespace,
        "done",
        {
            "phase": "Succeeded",
            "conditions": [
                {
                    "type": "Succeeded",
                    "status": "True",
                    "reason": "TrainingComplete",
                    "message": "1000 steps",
                    "lastTransitionTime": "2026-11-26T12:00:00Z",
                }
            ],
        },
    )
    out, _ = waiter.communicate(timeout=90)
    assert waiter.returncode == 0, out
    assert "condition met" in out


def test_kubectl_apply_refuses_a_typo_with_the_field_named(control_plane, namespace, tmp_path):
    manifest = training_job("typo2")
    manifest["spec"]["hyperparameters"] = {"learningrate": 1e-5}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = control_plane.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.hyperparameters.learningrate"' in result.stderr
