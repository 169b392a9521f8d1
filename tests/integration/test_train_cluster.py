"""A training run against the real MinIO and API server: data, cache, checkpoints and exports in
the object store, progress patched into the resource's status by the job's own ServiceAccount."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from difftrain import api
from difftrain.train.report import ConsoleReporter, Reporters, StatusReporter
from difftrain.train.run import RunOptions, run_training
from difftrain_operator.builders import OperatorSettings, build_training_children
from tests.integration.resources import create
from tests.minio_jobs import on_minio, store_config, upload_folder
from tests.training import prepare_local_inputs, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("crds_installed")]
PLURAL = "diffusiontrainingjobs"


def _as_service_account(kube_api, namespace: str, name: str) -> client.ApiClient:
    """An API client that acts as the trainer pod's ServiceAccount (impersonation)."""
    impersonating = client.ApiClient(
        kube_api.configuration,
        header_name="Impersonate-User",
        header_value=f"system:serviceaccount:{namespace}:{name}",
    )
    return impersonating


def test_trainer_reads_minio_and_patches_only_its_own_status(
    kube_api, namespace, s3, tmp_path: Path
):
    inputs = prepare_local_inputs(tmp_path / "inputs", images=16)
    mc = s3.client()
    upload_folder(s3, inputs / "base-model", "models/tiny")
    upload_folder(s3, inputs / "dataset", "data/shapes")
    job = tiny_job(
        inputs,
        tmp_path / "unused",
        hyperparameters={
            "batchSize": 4,
            "maxSteps": 4,
            "warmupSteps": 1,
            "mixedPrecision": "no",
        },
        checkpointing={"everySteps": 2, "keepLast": 1},
        sampling={"everySteps": 0, "numInferenceSteps": 2, "prompts": ["a red circle"]},
    )
    spec = on_minio(job, s3, model="models/tiny", output="runs/shapes", secret="store-keys")["spec"]
    spec["dataset"]["uri"] = s3.uri("data/shapes")
    job["metadata"] = {"name": "shapes"}
    other = {**job, "metadata": {"name": "neighbour"}}
    stored = create(kube_api, namespace, job)
    create(kube_api, namespace, other)

    # The per-job RBAC exactly as the operator creates it.
    resource = api.parse_resource(stored)
    assert isinstance(resource, api.DiffusionTrainingJob)
    children = build_training_children(
        resource, stored["metadata"]["uid"], OperatorSettings(trainer_image="t:1")
    )
    core = client.CoreV1Api(kube_api)
    rbac = client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(namespace, children.service_account)
    rbac.create_namespaced_role(namespace, children.role)
    rbac.create_namespaced_role_binding(namespace, children.role_binding)
    sa_client = _as_service_account(
        kube_api, namespace, children.service_account["metadata"]["name"]
    )

    reporter = Reporters(
        ConsoleReporter(bar=False),
        StatusReporter("shapes", namespace, interval=0.0, api_client=sa_client),
    )
    options = RunOptions(
        work_dir=tmp_path / "work",
        store_config=store_config(s3),
        job_name="shapes",
        namespace=namespace,
        reporter=reporter,
    )
    outcome = run_training(resource, options)
    assert outcome.cache_hit is False

    status = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, PLURAL, "shapes"
    )["status"]
    assert status["step"] == 4 and status["totalSteps"] == 4
    assert status["progress"] == "4/4 (100%)"
    assert status["loss"] > 0 and status["imagesPerSecond"] > 0
    assert status["latestCheckpoint"] == s3.uri("runs/shapes/checkpoints/step-00000004")
    assert status["samples"][0].startswith(s3.uri("runs/shapes/samples/step-00000004/"))
    assert status["dataset"]["total"] == 16 and status["dataset"]["kept"] == 16
    assert {o["format"] for o in status["outputs"]} == {"diffusers", "single_file"}
    names = {o.object_name for o in mc.list_objects(s3.bucket, "runs/shapes/", recursive=True)}
    assert "runs/shapes/export/model.safetensors" in names
    assert "runs/shapes/export/model.safetensors.manifest.json" in names
    assert "runs/shapes/checkpoints/step-00000004/_manifest.json" in names
    assert not any(n.startswith("runs/shapes/checkpoints/step-00000002/") for n in names)
    cached = list(mc.list_objects(s3.bucket, "data/shapes/.difftrain-cache/", recursive=True))
    # the per-sample cache: its shards, and the index written after them
    assert any("/.difftrain-cache/index/" in o.object_name for o in cached)
    assert any("/.difftrain-cache/shards/" in o.object_name for o in cached)

    # The trainer's identity may patch exactly its own resource's status.
    custom = client.CustomObjectsApi(sa_client)
    with pytest.raises(ApiException) as denied:
        custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, PLURAL, "neighbour", {"status": {"step": 1}}
        )
    assert denied.value.status == 403
    with pytest.raises(ApiException) as denied_spec:
        custom.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, PLURAL, "shapes", {"spec": {"suspend": True}}
        )
    assert denied_spec.value.status == 403

    # A second run on the same data and model reuses the cache (no encoder call).
    job2 = {**job, "spec": {**spec, "output": {"uri": s3.uri("runs/second")}}}
    resource2 = api.parse_resource(job2)
    assert isinstance(resource2, api.DiffusionTrainingJob)
    second = run_training(
        resource2, RunOptions(work_dir=tmp_path / "work2", store_config=options.store_config)
    )
    assert second.cache_hit is True
