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

import pytest

from tests.conftest import S3Endpoint
from tests.infra import images
from tests.infra.environment import REPO, ControlPlane, binary_dir
from tests.infra.node import PAUSE_IMAGE, NodeCluster, missing_prerequisites

CHART = REPO / "charts" / "difftrain"
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

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.control_plane.kubectl(*args, check=check)

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


def _import(nodes: NodeCluster, ref: str) -> float:
    """Put ``ref`` into containerd (once per machine: its store is kept); seconds taken."""
    assert nodes.containerd is not None
    if nodes.containerd.has_image(ref):
        return 0.0
    start = time.monotonic()
    archive = images.export(ref)
    try:
        nodes.containerd.import_archive(archive)
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
            "trainerTerminationGracePeriodSeconds=60",
            "--wait",
            "--timeout",
            "180s",
        )
        timings["helm install"] = time.monotonic() - install
        print("\ne2e cluster set-up (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
        yield found
    finally:
        if os.environ.get("DIFFTRAIN_KEEP_LOGS"):
            print(f"\nnode cluster logs kept in {work}")
        nodes.stop()


@pytest.fixture
def e2e_namespace(cluster: Cluster) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def store(cluster: Cluster, e2e_namespace: str) -> S3Endpoint:
    """A bucket in the cluster's MinIO and the Secret with its keys in the test's namespace."""
    minio = cluster.nodes.minio
    assert minio is not None
    ep = S3Endpoint(
        endpoint=minio.endpoint,
        access_key=minio.access_key,
        secret_key=minio.secret_key,
        bucket=f"e2e-{uuid.uuid4().hex[:10]}",
    )
    client = ep.client()
    client.make_bucket(ep.bucket)
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        SECRET,
        "-n",
        e2e_namespace,
        f"--from-literal=accessKey={ep.access_key}",
        f"--from-literal=secretKey={ep.secret_key}",
    )
    return ep


def upload_folder(ep: S3Endpoint, folder: Path, prefix: str) -> None:
    client = ep.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.fput_object(ep.bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", path)
