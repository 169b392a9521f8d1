"""The control plane is real: controllers run, garbage collection follows owner references, and
kwok can stand in for nodes and kubelets."""

from __future__ import annotations

import contextlib
import subprocess

import pytest
from kubernetes import client

from difftrain import api
from tests.infra.processes import ServerProcess
from tests.integration.resources import create, training_job, wait_for


def test_job_controller_creates_pods(kube_api, namespace):
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    batch.create_namespaced_job(
        namespace,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "hello"},
            "spec": {
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "busybox", "command": ["true"]}],
                    }
                }
            },
        },
    )
    pods = wait_for(
        lambda: core.list_namespaced_pod(namespace, label_selector="job-name=hello").items,
        what="the Job's pod",
    )
    assert pods[0].metadata.owner_references[0].kind == "Job"


@pytest.mark.usefixtures("crds_installed")
def test_children_of_a_training_job_are_garbage_collected(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    owner = create(kube_api, namespace, training_job("owner"))
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "owner-config",
                "ownerReferences": [
                    {
                        "apiVersion": api.API_VERSION,
                        "kind": "DiffusionTrainingJob",
                        "name": "owner",
                        "uid": owner["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "data": {"spec.yaml": "{}"},
        },
    )
    client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, "diffusiontrainingjobs", "owner"
    )

    def gone() -> bool:
        names = [c.metadata.name for c in core.list_namespaced_config_map(namespace).items]
        return "owner-config" not in names

    wait_for(gone, what="garbage collection of the owned ConfigMap")


def test_kwok_runs_pods_on_a_fake_node(control_plane, kube_api, namespace, tmp_path):
    core = client.CoreV1Api(kube_api)
    kwok = ServerProcess(
        "kwok",
        [
            str(control_plane.bin_dir / "kwok"),
            f"--kubeconfig={control_plane.kubeconfig}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-label-selector=difftrain.dev/fake-node",
            "--server-address=127.0.0.1:0",
        ],
        tmp_path,
    )
    kwok.start()
    node_name = f"fake-{namespace}"
    try:
        core.create_node(
            {
                "metadata": {"name": node_name, "labels": {"difftrain.dev/fake-node": "true"}},
                "status": {
                    "allocatable": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "4"},
                    "capacity": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "4"},
                },
            }
        )
        wait_for(
            lambda: any(
                c.type == "Ready" and c.status == "True"
                for c in core.read_node(node_name).status.conditions or []
            ),
            what="kwok to make the node Ready",
        )
        core.create_namespaced_pod(
            namespace,
            {
                "metadata": {"name": "on-fake"},
                "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "trainer"}]},
            },
        )
        wait_for(
            lambda: core.read_namespaced_pod("on-fake", namespace).status.phase == "Running",
            what="kwok to run the pod",
        )
    finally:
        kwok.stop()
        with contextlib.suppress(client.ApiException):
            core.delete_node(node_name)


def test_helm_binary_is_the_pinned_release(control_plane):
    from tests.infra.environment import REPO

    pinned = dict(
        line.split("=", 1)
        for line in (REPO / "hack/versions.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    out = subprocess.run(
        [str(control_plane.bin_dir / "helm"), "version", "--short"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith(pinned["HELM_VERSION"])
