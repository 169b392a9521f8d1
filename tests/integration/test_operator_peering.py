"""Several replicas: the chart's peering objects and RBAC let two `difftrain operator` processes,
run as its Deployment runs them, agree that exactly one acts; the other takes over when it stops."""

from __future__ import annotations

import subprocess
import time

import pytest
from kubernetes import client

from tests.integration.chart_install import (
    FORBIDDEN,
    install,
    install_peering_crds,
    one,
    operator_process,
    render,
    stop,
)
from tests.integration.resources import create, training_job, wait_for

pytestmark = pytest.mark.usefixtures("crds_installed")
HANDLED = "Handler 'reconcile_training_job' succeeded"


def peers(kube_api, namespace: str) -> dict:
    peering = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        "kopf.dev", "v1", namespace, "kopfpeerings", "difftrain"
    )
    return peering.get("status") or {}


def job_exists(kube_api, namespace: str, name: str) -> bool:
    try:
        client.BatchV1Api(kube_api).read_namespaced_job(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


@pytest.fixture
def two_replicas(control_plane, kube_api, namespace, tmp_path):
    install_peering_crds(control_plane)
    docs = render(
        control_plane, f"{namespace}-op", "replicas=2", f"watchNamespaces={{{namespace}}}"
    )
    installed = install(kube_api, docs, suffix=namespace)
    kubeconfig = installed.kubeconfig(control_plane, tmp_path / "kubeconfig")
    logs = {pod: tmp_path / f"{pod}.log" for pod in ("replica-a", "replica-b")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield installed, kubeconfig, logs, procs
    finally:
        for proc in procs.values():
            stop(proc)
        for pod, log in logs.items():
            if log.exists():
                print(f"--- {pod}\n{log.read_text()[-4000:]}")
        installed.remove()
    for log in logs.values():
        text = log.read_text() if log.exists() else ""
        assert not FORBIDDEN.search(text), text[-3000:]


def test_two_replicas_one_acts_then_the_other_takes_over(kube_api, namespace, two_replicas):
    installed, kubeconfig, logs, procs = two_replicas
    deployment = installed.deployment()
    assert deployment["spec"]["replicas"] == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" not in args and "--peering=difftrain" in args
    peering = one(installed.docs, "KopfPeering")
    assert peering["metadata"] == {
        **peering["metadata"],
        "name": "difftrain",
        "namespace": namespace,
    }
    # least privilege: list and watch peerings, patch only the operator's own, only here
    may = installed.may
    assert may("list", "kopfpeerings", namespace, group="kopf.dev")
    assert may("patch", "kopfpeerings", namespace, group="kopf.dev", name="difftrain")
    assert not may("patch", "kopfpeerings", namespace, group="kopf.dev", name="other")
    assert not may("create", "kopfpeerings", namespace, group="kopf.dev")
    assert not may("patch", "kopfpeerings", "default", group="kopf.dev", name="difftrain")
    assert not may("patch", "clusterkopfpeerings", group="kopf.dev", name="difftrain")
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "minio-credentials"},
            "stringData": {"accessKey": "a", "secretKey": "b"},
        },
    )

    procs["a"] = operator_process(deployment, kubeconfig, logs["replica-a"], "replica-a")
    wait_for(lambda: "replica-a" in peers(kube_api, namespace), what="replica-a in the peering")
    wait_for(
        lambda: "Resuming operations" in logs["replica-a"].read_text(), what="replica-a acting"
    )
    procs["b"] = operator_process(deployment, kubeconfig, logs["replica-b"], "replica-b")
    status = wait_for(
        lambda: (s := peers(kube_api, namespace)) and "replica-b" in s and s,
        what="replica-b in the peering",
    )
    # the older replica has the higher priority: it keeps acting, the newer one waits
    assert status["replica-a"]["priority"] > status["replica-b"]["priority"]

    create(kube_api, namespace, training_job("first"))
    wait_for(lambda: job_exists(kube_api, namespace, "first"), what="the first job's Job")
    time.sleep(3)  # time for a second replica to act too, if it did
    assert HANDLED in logs["replica-a"].read_text()
    b_log = logs["replica-b"].read_text()
    assert HANDLED not in b_log and "Resuming operations" not in b_log, b_log[-3000:]
    assert procs["b"].poll() is None

    stop(procs["a"])  # a clean stop: replica-a leaves the peering, replica-b resumes at once
    assert "replica-a" not in peers(kube_api, namespace)
    wait_for(
        lambda: "Resuming operations" in logs["replica-b"].read_text(),
        timeout=30,
        what="replica-b taking over",
    )
    create(kube_api, namespace, training_job("second"))
    wait_for(lambda: job_exists(kube_api, namespace, "second"), what="the second job's Job")
    assert HANDLED in logs["replica-b"].read_text()
