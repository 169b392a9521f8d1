"""The product as users run it: our images on a real node, the chart installed with helm.

One cluster for the e2e tests (torn down after them): a control plane and MinIO on the node's
bridge address, the node (containerd, kubelet, kube-proxy, scheduler), the images built from our
Dockerfile and imported, and the chart installed with `helm install`, its operator running as a
pod with the chart's ServiceAccount. Each test gets a namespace with the store Secret and a
bucket of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import S3Endpoint
from tests.infra import images
from tests.infra.environment import REPO, ControlPlane, binary_dir
from tests.infra.node import PAUSE_IMAGE, NodeCluster, missing_prerequisites
from tests.training import prepare_local_inputs

CHART = REPO / "charts" / "difftrain"
# the drills' figures, one line each, for docs/RELIABILITY.md (build/ is not committed)
REPORT = REPO / "build" / "e2e-report.txt"
RELEASE = "difftrain"
RELEASE_NS = "difftrain-system"
SECRET = "minio-credentials"


@dataclass
class Cluster:
    """The running cluster, its images and what setting it up took."""

    nodes: NodeCluster
    operator_image: str
    trainer_image: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def control_plane(self) -> ControlPlane:
        assert self.nodes.control_plane is not None
        return self.nodes.control_plane

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.control_plane.kubectl(*args, check=check, timeout=timeout)

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.control_plane.bin_dir / "helm"), *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "KUBECONFIG": str(self.control_plane.kubeconfig)},
        )
        assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr}"
        return result

    def get(self, kind: str, name: str, namespace: str) -> dict:
        out = self.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
        obj: dict = json.loads(out)
        return obj


def report(line: str) -> None:
    """Print a figure line and keep it in build/e2e-report.txt."""
    print("\n" + line)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


# The first e2e test's setup starts the cluster: on a machine that has not built them yet, the
# images are built, exported and imported into containerd there (tens of minutes for the
# trainer's), which the suite's per-test limit would cut short, failing every e2e test.
CLUSTER_SETUP_TIMEOUT_S = 3600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    e2e = [item for item in items if Path(str(item.fspath)).is_relative_to(Path(__file__).parent)]
    if e2e:
        e2e[0].add_marker(pytest.mark.timeout(CLUSTER_SETUP_TIMEOUT_S))


def _import(nodes: NodeCluster, ref: str) -> float:
    """Put ``ref`` into containerd (once per machine: its store is kept); seconds taken."""
    assert nodes.containerd is not None
    if nodes.containerd.has_image(ref):
        return 0.0
    start = time.monotonic()
    archive = images.export(ref)
    try:
        nodes.containerd.import_archive(archive, ref)
    finally:
        archive.unlink(missing_ok=True)
    return time.monotonic() - start


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = missing_prerequisites()
    if missing:
        pytest.fail("the real node needs " + ", ".join(missing), pytrace=False)
    work = tmp_path_factory.mktemp("node")
    nodes = NodeCluster(binary_dir(), work)
    start = time.monotonic()
    nodes.start()
    try:
        timings = {"control plane": time.monotonic() - start}
        operator, timings["operator image build"] = images.project_image("operator")
        trainer, timings["trainer image build"] = images.project_image("trainer")
        for ref in (images.pause_image(PAUSE_IMAGE), operator, trainer):
            timings[f"import {ref.split('/')[-1].split(':')[0]}"] = _import(nodes, ref)
        node_start = time.monotonic()
        nodes.start_node()
        timings["node"] = time.monotonic() - node_start
        found = Cluster(nodes, operator, trainer, timings)
        install = time.monotonic()
        repo, tag = operator.rsplit(":", 1)
        found.helm(
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            RELEASE_NS,
            "--create-namespace",
            "--set",
            f"image.repository={repo}",
            "--set",
            f"image.tag={tag}",
            "--set",
            f"trainerImage={trainer}",
            "--set",
            "trainerMaxGracePeriodSeconds=60",
            "--wait",
            "--timeout",
            "180s",
        )
        timings["helm install"] = time.monotonic() - install
        shown = json.dumps({k: round(v, 1) for k, v in timings.items()})
        report(f"e2e cluster set-up (s, 0 = reused): {shown}")
        report(
            f"images: operator {images.image_size(operator)}, trainer {images.image_size(trainer)}"
        )
        yield found
    finally:
        if os.environ.get("DIFFTRAIN_KEEP_LOGS"):
            print(f"\nnode cluster logs kept in {work}")
        nodes.stop()


def new_namespace(cluster: Cluster) -> str:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    return name


def new_store(cluster: Cluster, namespace: str, secret_key: str | None = None) -> S3Endpoint:
    """A bucket in the cluster's MinIO and the Secret with its keys in ``namespace``.

    ``secret_key`` replaces the real secret key in the Secret (a wrong one, for the drills).
    """
    minio = cluster.nodes.minio
    assert minio is not None
    ep = S3Endpoint(
        endpoint=minio.endpoint,
        access_key=minio.access_key,
        secret_key=minio.secret_key,
        bucket=f"e2e-{uuid.uuid4().hex[:10]}",
    )
    ep.client().make_bucket(ep.bucket)
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        SECRET,
        "-n",
        namespace,
        f"--from-literal=accessKey={ep.access_key}",
        f"--from-literal=secretKey={secret_key or ep.secret_key}",
    )
    return ep


@pytest.fixture
def e2e_namespace(cluster: Cluster) -> Iterator[str]:
    name = new_namespace(cluster)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def store(cluster: Cluster, e2e_namespace: str) -> S3Endpoint:
    return new_store(cluster, e2e_namespace)


@pytest.fixture(scope="package")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model and the shapes dataset, as `make local` writes them."""
    return prepare_local_inputs(tmp_path_factory.mktemp("inputs"))


def tiny_job(store: S3Endpoint, name: str, **hyperparameters: Any) -> dict[str, Any]:
    """examples/tiny-job.yaml, pointed at a test's bucket and the cluster's MinIO."""
    job: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-job.yaml").read_text())
    spec = job["spec"]
    job["metadata"]["name"] = name
    spec["baseModel"]["uri"] = store.uri("models/tiny")
    spec["dataset"]["uri"] = store.uri("datasets/shapes")
    spec["output"]["uri"] = store.uri(f"runs/{name}")
    spec["storage"]["endpoint"] = store.endpoint
    spec["hyperparameters"].update(hyperparameters)
    return job


def upload_inputs(store: S3Endpoint, inputs: Path) -> None:
    upload_folder(store, inputs / "base-model", "models/tiny")
    upload_folder(store, inputs / "dataset", "datasets/shapes")


def apply(cluster: Cluster, namespace: str, obj: dict[str, Any], folder: Path) -> None:
    path = folder / f"{obj['kind']}-{obj['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(obj))
    cluster.kubectl("apply", "-n", namespace, "-f", str(path))


def describe(cluster: Cluster, kind: str, name: str, namespace: str) -> str:
    """Pods, the trainer's log and the resource, for a failure's message."""
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    logs = cluster.kubectl(
        "logs", "-n", namespace, "-l", f"difftrain.dev/job={name}", "--tail=40", check=False
    )
    status = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "yaml", check=False)
    return f"{pods}\n{logs.stdout}{logs.stderr}\n{status.stdout[-3000:]}"


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
        timeout=timeout + 30,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{kind}/{name} not {condition} in {timeout}s:\n"
            + describe(cluster, kind, name, namespace)
        )


def wait_for(
    cluster: Cluster, kind: str, name: str, namespace: str, what: str, test: Any, timeout: float
) -> dict[str, Any]:
    """Poll the resource until ``test(obj)`` holds; the object then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if got.returncode == 0:
            obj: dict[str, Any] = json.loads(got.stdout)
            if test(obj):
                return obj
        time.sleep(0.5)
    raise AssertionError(
        f"{kind}/{name}: not {what} in {timeout}s:\n" + describe(cluster, kind, name, namespace)
    )


def pods_of(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", namespace, "-l", f"difftrain.dev/job={name}", "-o", "json"
    ).stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def worker_pods(cluster: Cluster, namespace: str, name: str) -> dict[int, dict[str, Any]]:
    """The newest pod of each worker index of a multi-worker job."""
    found: dict[int, dict[str, Any]] = {}
    pods = pods_of(cluster, namespace, name)
    for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"]):
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        found[int(index)] = pod
    return found


def two_worker_job(store: S3Endpoint, name: str, **hyperparameters: Any) -> dict[str, Any]:
    """The tiny job on two workers with one (advertised) GPU and half a core each."""
    job = tiny_job(store, name, **hyperparameters)
    job["spec"]["resources"].update({"workers": 2, "gpusPerWorker": 1, "cpu": "500m"})
    return job


def upload_folder(ep: S3Endpoint, folder: Path, prefix: str) -> None:
    client = ep.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.fput_object(ep.bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", path)
