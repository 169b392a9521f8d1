"""Fixtures shared by every test: the real control plane and MinIO, started once per session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.infra.environment import REPO, TestEnvironment, binary_dir


@pytest.fixture(scope="session")
def test_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestEnvironment]:
    """etcd, kube-apiserver, kube-controller-manager and MinIO on loopback; torn down at the end."""
    env = TestEnvironment(bin_dir=binary_dir(), work_dir=tmp_path_factory.mktemp("env"))
    env.start()
    try:
        yield env
    finally:
        env.stop(keep_logs=bool(os.environ.get("DIFFTRAIN_KEEP_LOGS")))


@pytest.fixture(scope="session")
def control_plane(test_env: TestEnvironment):
    assert test_env.control_plane is not None
    return test_env.control_plane


@pytest.fixture(scope="session")
def kube_api(control_plane):
    """A kubernetes ApiClient logged in as cluster admin."""
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(control_plane.kubeconfig), client_configuration=cfg)
    api_client = client.ApiClient(cfg)
    yield api_client
    api_client.close()


@pytest.fixture(scope="session")
def crds_installed(control_plane) -> None:
    """The generated CRDs, applied and established."""
    control_plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    control_plane.wait_established(
        "diffusiontrainingjobs.difftrain.dev", "modelmerges.difftrain.dev"
    )


@pytest.fixture
def namespace(kube_api) -> Iterator[str]:
    """A fresh namespace, deleted after the test."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@dataclass(frozen=True)
class S3Endpoint:
    """Where a test's bucket lives and how to reach it."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    secure: bool = False

    def client(self):
        from minio import Minio

        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=self.secure,
        )

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")


@pytest.fixture
def s3(test_env: TestEnvironment) -> Iterator[S3Endpoint]:
    """The real MinIO with credentials and a fresh, empty bucket (removed after the test)."""
    assert test_env.minio is not None
    ep = S3Endpoint(
        endpoint=test_env.minio.endpoint,
        access_key=test_env.minio.access_key,
        secret_key=test_env.minio.secret_key,
        bucket=f"t-{uuid.uuid4().hex[:12]}",
    )
    mc = ep.client()
    mc.make_bucket(ep.bucket)
    yield ep
    for obj in mc.list_objects(ep.bucket, recursive=True):
        mc.remove_object(ep.bucket, obj.object_name)
    mc.remove_bucket(ep.bucket)


@pytest.fixture
def examples_dir() -> Path:
    return REPO / "examples"
