"""A training job from `kubectl apply` to a trained model in MinIO, on the real node."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import S3Endpoint
from tests.e2e.conftest import Cluster, upload_folder
from tests.infra.environment import REPO
from tests.training import prepare_local_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_local_inputs(tmp_path_factory.mktemp("inputs"))


def tiny_job(store: S3Endpoint, name: str, **hyperparameters: Any) -> dict[str, Any]:
    """examples/tiny-job.yaml, pointed at the test's bucket and the cluster's MinIO."""
    job: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-job.yaml").read_text())
    spec = job["spec"]
    job["metadata"]["name"] = name
    spec["baseModel"]["uri"] = store.uri("models/tiny")
    spec["dataset"]["uri"] = store.uri("datasets/shapes")
    spec["output"]["uri"] = store.uri(f"runs/{name}")
    spec["storage"]["endpoint"] = store.endpoint
    spec["hyperparameters"].update(hyperparameters)
    return job


def apply(cluster: Cluster, namespace: str, obj: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / f"{obj['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(obj))
    cluster.kubectl("apply", "-n", namespace, "-f", str(path))


def wait_condition(
    cluster: Cluster, kind: str, name: str, namespace: str, condition: str, timeout: int
) -> None:
    done = cluster.kubectl(
        "wait",
        f"--for=condition={condition}",
        f"--timeout={timeout}s",
        f"{kind}/{name}",
        "-n",
        namespace,
        check=False,
    )
    if done.returncode != 0:
        pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
        logs = cluster.kubectl(
            "logs", "-n", namespace, "-l", f"difftrain.dev/job={name}", "--tail=60", check=False
        )
        status = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "yaml", check=False)
        raise AssertionError(
            f"{kind}/{name} not {condition} in {timeout}s:\n{pods}\n{logs.stdout}{logs.stderr}\n"
            f"{status.stdout[-3000:]}"
        )


def test_tiny_job_trains_in_a_pod_and_its_model_lands_in_minio(
    cluster: Cluster, e2e_namespace: str, store: S3Endpoint, inputs: Path, tmp_path: Path
):
    upload_folder(store, inputs / "base-model", "models/tiny")
    upload_folder(store, inputs / "dataset", "datasets/shapes")
    started = time.monotonic()
    apply(cluster, e2e_namespace, tiny_job(store, "tiny"), tmp_path)
    wait_condition(cluster, "dtj", "tiny", e2e_namespace, "Succeeded", 600)
    seconds = time.monotonic() - started

    status = cluster.get("dtj", "tiny", e2e_namespace)["status"]
    assert status["phase"] == "Succeeded" and status["step"] == 20
    assert status["dataset"]["kept"] == 48
    assert status["gpuHours"] > 0  # one GPU requested, for the pod's running time
    client = store.client()
    by_format = {o["format"]: o for o in status["outputs"]}
    single = by_format["single_file"]
    key = single["uri"].removeprefix(f"s3://{store.bucket}/")
    data = client.get_object(store.bucket, key).read()
    assert hashlib.sha256(data).hexdigest() == single["sha256"]
    names = {o.object_name for o in client.list_objects(store.bucket, "runs/tiny/", recursive=True)}
    assert "runs/tiny/checkpoints/step-00000020/_manifest.json" in names
    assert "runs/tiny/checkpoints/step-00000010/_manifest.json" in names
    assert any(n.startswith("runs/tiny/samples/step-00000020/") for n in names)
    # the pod the operator made ran our trainer image as the restricted profile wants
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", e2e_namespace, "-l", "difftrain.dev/job=tiny", "-o", "json"
        ).stdout
    )["items"]
    assert pods and all(p["spec"]["containers"][0]["image"] == cluster.trainer_image for p in pods)
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    print(f"\ntiny job: apply -> Succeeded in {seconds:.1f} s")
