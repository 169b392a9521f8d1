"""The built child objects are accepted by the real API server, and their pods pass the
Pod Security admission at the *restricted* level."""

from __future__ import annotations

import pytest
from kubernetes import client, utils

from difftrain import api
from difftrain_operator.builders import (
    OperatorSettings,
    build_merge_children,
    build_training_children,
)
from tests.integration.resources import create, model_merge, training_job

pytestmark = pytest.mark.usefixtures("crds_installed")
SETTINGS = OperatorSettings(trainer_image="difftrain/trainer:test")


@pytest.fixture
def restricted_namespace(kube_api, namespace):
    client.CoreV1Api(kube_api).patch_namespace(
        namespace,
        {
            "metadata": {
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }
            }
        },
    )
    return namespace


def _pod_from_template(job: dict, namespace: str) -> dict:
    template = job["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "probe-",
            "namespace": namespace,
            "labels": template["metadata"]["labels"],
        },
        "spec": template["spec"],
    }


@pytest.mark.parametrize("workers", [1, 3])
def test_training_children_are_accepted_and_pods_are_restricted(
    kube_api, restricted_namespace, workers
):
    ns = restricted_namespace
    body = training_job(
        "pets", resources={"workers": workers, "gpusPerWorker": 1, "memory": "8Gi", "cpu": 2}
    )
    stored = create(kube_api, ns, body)
    resource = api.parse_resource(stored)
    assert isinstance(resource, api.DiffusionTrainingJob)
    children = build_training_children(resource, stored["metadata"]["uid"], SETTINGS)
    utils.create_from_dict(
        kube_api, {"apiVersion": "v1", "kind": "List", "items": children.all()}, namespace=ns
    )
    job = client.BatchV1Api(kube_api).read_namespaced_job(children.job["metadata"]["name"], ns)
    assert job.spec.pod_failure_policy.rules[0].action == "Ignore"
    assert job.metadata.owner_references[0].uid == stored["metadata"]["uid"]
    # the pod template passes Pod Security admission at the restricted level
    client.CoreV1Api(kube_api).create_namespaced_pod(
        ns, _pod_from_template(children.job, ns), dry_run="All"
    )


def test_a_privileged_pod_is_refused_in_the_same_namespace(kube_api, restricted_namespace):
    """The namespace really enforces the restricted profile (the test above means something)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad"},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }
    with pytest.raises(client.ApiException) as info:
        client.CoreV1Api(kube_api).create_namespaced_pod(restricted_namespace, pod, dry_run="All")
    assert "violates PodSecurity" in str(info.value.body)


def test_merge_children_are_accepted_and_pods_are_restricted(kube_api, restricted_namespace):
    ns = restricted_namespace
    stored = create(kube_api, ns, model_merge("mix", resources={"gpu": True}))
    resource = api.parse_resource(stored)
    assert isinstance(resource, api.ModelMerge)
    config_map, job = build_merge_children(resource, stored["metadata"]["uid"], SETTINGS)
    utils.create_from_dict(
        kube_api, {"apiVersion": "v1", "kind": "List", "items": [config_map, job]}, namespace=ns
    )
    client.CoreV1Api(kube_api).create_namespaced_pod(ns, _pod_from_template(job, ns), dry_run="All")
