"""From `kubectl apply` to a trained model in MinIO, and a merge of two of them, on the node."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3Endpoint
from tests.e2e.conftest import (
    Cluster,
    apply,
    new_namespace,
    new_store,
    pods_of,
    report,
    tiny_job,
    two_worker_job,
    upload_inputs,
    wait_condition,
    worker_pods,
)


@dataclass
class Trained:
    namespace: str
    store: S3Endpoint
    statuses: dict[str, dict[str, Any]]
    seconds: float


@pytest.fixture(scope="module")
def trained(cluster: Cluster, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Two tiny jobs (different learning rates) applied together and trained to the end."""
    namespace = new_namespace(cluster)
    store = new_store(cluster, namespace)
    upload_inputs(store, inputs)
    folder = tmp_path_factory.mktemp("jobs")
    started = time.monotonic()
    apply(cluster, namespace, tiny_job(store, "tiny-a"), folder)
    apply(cluster, namespace, tiny_job(store, "tiny-b", learningRate=1e-3), folder)
    for name in ("tiny-a", "tiny-b"):
        wait_condition(cluster, "dtj", name, namespace, "Succeeded", 600)
    seconds = time.monotonic() - started
    statuses = {n: cluster.get("dtj", n, namespace)["status"] for n in ("tiny-a", "tiny-b")}
    report(f"two tiny jobs: apply -> both Succeeded in {seconds:.1f} s")
    return Trained(namespace, store, statuses, seconds)


def test_tiny_job_trains_in_a_pod_and_its_model_lands_in_minio(cluster: Cluster, trained: Trained):
    status = trained.statuses["tiny-a"]
    assert status["phase"] == "Succeeded" and status["step"] == 20
    assert status["dataset"]["kept"] == 48
    assert status["gpuHours"] > 0  # one GPU requested, for the pod's running time
    store = trained.store
    client = store.client()
    single = {o["format"]: o for o in status["outputs"]}["single_file"]
    key = single["uri"].removeprefix(f"s3://{store.bucket}/")
    data = client.get_object(store.bucket, key).read()
    assert hashlib.sha256(data).hexdigest() == single["sha256"]
    names = {
        o.object_name for o in client.list_objects(store.bucket, "runs/tiny-a/", recursive=True)
    }
    assert "runs/tiny-a/checkpoints/step-00000020/_manifest.json" in names
    assert "runs/tiny-a/checkpoints/step-00000010/_manifest.json" in names
    assert any(n.startswith("runs/tiny-a/samples/step-00000020/") for n in names)
    assert "runs/tiny-a/export/diffusers/model_index.json" in names
    # the pod the operator made ran our trainer image and ended with 0
    pods = pods_of(cluster, trained.namespace, "tiny-a")
    assert pods and all(p["spec"]["containers"][0]["image"] == cluster.trainer_image for p in pods)
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    # the two jobs trained two different models
    other = {o["format"]: o for o in trained.statuses["tiny-b"]["outputs"]}["single_file"]
    assert other["sha256"] != single["sha256"]


def test_a_model_merge_of_two_outputs_writes_the_merged_file_and_its_hashes(
    cluster: Cluster, trained: Trained, tmp_path: Path
):
    store = trained.store
    outputs = [
        {o["format"]: o for o in trained.statuses[n]["outputs"]}["single_file"]["uri"]
        for n in ("tiny-a", "tiny-b")
    ]
    merge = {
        "apiVersion": "difftrain.dev/v1alpha1",
        "kind": "ModelMerge",
        "metadata": {"name": "tiny-mix"},
        "spec": {
            "models": [{"uri": outputs[0]}, {"uri": outputs[1]}],
            "method": "weighted_sum",
            "alpha": 0.3,
            "output": {"uri": store.uri("merged/tiny-mix.safetensors")},
            "storage": {
                "endpoint": store.endpoint,
                "secure": False,
                "secretRef": {"name": "minio-credentials"},
            },
        },
    }
    apply(cluster, trained.namespace, merge, tmp_path)
    wait_condition(cluster, "mmerge", "tiny-mix", trained.namespace, "Succeeded", 300)
    status = cluster.get("mmerge", "tiny-mix", trained.namespace)["status"]
    data = store.client().get_object(store.bucket, "merged/tiny-mix.safetensors").read()
    digest = hashlib.sha256(data).hexdigest()
    assert status["sha256"] == digest and status["shortHash"] == digest[:10]
    assert status["sizeBytes"] == len(data) and status["tensors"] > 0
    assert status["outputUri"] == store.uri("merged/tiny-mix.safetensors")


def test_one_worker_with_two_gpus_trains_one_model_with_two_processes(
    cluster: Cluster, e2e_namespace: str, store: S3Endpoint, inputs: Path, tmp_path: Path
):
    """gpusPerWorker: 2 -> the pod's elastic agent starts two ranks of one process group."""
    upload_inputs(store, inputs)
    job = tiny_job(store, "twoproc", maxSteps=10)
    job["spec"]["resources"]["gpusPerWorker"] = 2
    job["spec"]["checkpointing"] = {"everySteps": 10, "keepLast": 2}
    apply(cluster, e2e_namespace, job, tmp_path)
    wait_condition(cluster, "dtj", "twoproc", e2e_namespace, "Succeeded", 600)
    state = json.loads(
        store.client()
        .get_object(store.bucket, "runs/twoproc/checkpoints/step-00000010/state.json")
        .read()
    )["state"]
    assert state["step"] == 10 and state["images_seen"] == 10 * 4 * 2  # two ranks, batch 4
    (pod,) = pods_of(cluster, e2e_namespace, "twoproc")
    log = cluster.kubectl("logs", pod["metadata"]["name"], "-n", e2e_namespace).stdout
    assert "starting processes=2" in log and "rank 1 read no image" in log
    status = cluster.get("dtj", "twoproc", e2e_namespace)["status"]
    assert status["gpuHours"] > 0 and status["phase"] == "Succeeded"


def test_two_workers_with_one_gpu_each_train_one_model_in_one_process_group(
    cluster: Cluster, e2e_namespace: str, store: S3Endpoint, inputs: Path, tmp_path: Path
):
    """workers: 2 -> two pods meet at the rendezvous on worker 0's name at the headless Service
    (resolved by the cluster DNS), train one model, and only rank 0 writes."""
    upload_inputs(store, inputs)
    job = two_worker_job(store, "twopods", maxSteps=10)
    apply(cluster, e2e_namespace, job, tmp_path)
    started = time.monotonic()
    wait_condition(cluster, "dtj", "twopods", e2e_namespace, "Succeeded", 600)
    seconds = time.monotonic() - started
    pods = worker_pods(cluster, e2e_namespace, "twopods")
    assert sorted(pods) == [0, 1]
    logs = {
        i: cluster.kubectl("logs", p["metadata"]["name"], "-n", e2e_namespace).stdout
        for i, p in pods.items()
    }
    for index, pod in pods.items():
        ended = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert ended["exitCode"] == 0, logs[index][-3000:]
        assert f"machine_rank={index} machines=2" in logs[index]
    # one process group of two ranks: one model, its images counted for both ranks
    state = json.loads(
        store.client()
        .get_object(store.bucket, "runs/twopods/checkpoints/step-00000010/state.json")
        .read()
    )["state"]
    assert state["step"] == 10 and state["images_seen"] == 10 * 4 * 2
    # the rendezvous orders the machines (not always worker 0 first): the pod of rank 0 read
    # the data and wrote the outputs, the other neither
    (writer,) = [i for i, log in logs.items() if "trained 10 steps" in log]
    other = logs[1 - writer]
    assert "rank 1 read no image" in other and "rank 1 read no image" not in logs[writer]
    assert "exported format=" in logs[writer] and "exported format=" not in other
    status = cluster.get("dtj", "twopods", e2e_namespace)["status"]
    assert status["step"] == 10 and {o["format"] for o in status["outputs"]} >= {"single_file"}
    report(f"two workers x one process: apply -> Succeeded in {seconds:.1f} s")
