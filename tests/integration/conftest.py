"""Integration tests: each talks to the real API server and/or MinIO from tests/infra."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.infra.environment import TestEnvironment
from tests.infra.kueue import GpuQueue, Kueue, create_gpu_queue, delete_gpu_queue


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kueue(test_env: TestEnvironment) -> Iterator[Kueue]:
    """A real Kueue controller manager (CRDs, webhooks, batch/job integration) on the test
    control plane; started by the first test that asks for it, stopped at the end of the session."""
    assert test_env.control_plane is not None
    server = Kueue(test_env.bin_dir, test_env.work_dir / "kueue", test_env.control_plane)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def gpu_queue(
    request: pytest.FixtureRequest, kueue: Kueue, kube_api, namespace: str
) -> Iterator[GpuQueue]:
    """A ClusterQueue with 1 nvidia.com/gpu of quota and a LocalQueue for it in ``namespace``
    (label a Job ``kueue.x-k8s.io/queue-name: <gpu_queue.local_queue>``). Its quota can be set
    with ``@pytest.mark.parametrize("gpu_queue", [2], indirect=True)``."""
    queue = create_gpu_queue(kube_api, namespace, gpus=getattr(request, "param", 1))
    yield queue
    delete_gpu_queue(kube_api, queue)
