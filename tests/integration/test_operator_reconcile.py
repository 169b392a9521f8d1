"""The operator, run as `difftrain operator`, against the real API server and controller-manager.

Pods are never scheduled here (no scheduler, no kubelet): the test moves their phases itself
through the status subresource, the way a kubelet would.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest
from kubernetes import client

from difftrain import api
from tests.infra.processes import free_port, start_operator
from tests.integration.resources import (
    create,
    model_merge,
    training_job,
    wait_for,
    wait_for_event,
)

pytestmark = pytest.mark.usefixtures("crds_installed")


@pytest.fixture
def operator(control_plane, namespace, tmp_path):
    port = free_port()
    proc = start_operator(
        control_plane.kubeconfig, namespace, tmp_path / "operator.log", "--metrics-port", str(port)
    )
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    print((tmp_path / "operator.log").read_text()[-6000:])  # shown when the test fails


def status_of(kube_api, namespace, name):
    obj = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, "diffusiontrainingjobs", name
    )
    return obj.get("status") or {}


def set_pod_phase(kube_api, namespace, pod_name, phase, exit_code=None, message=None):
    status = {"phase": phase}
    if exit_code is not None:
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed",
            "startedAt": "2026-11-26T12:00:00Z",
            "finishedAt": "2026-11-26T12:30:00Z",
        }
        if message:
            terminated["message"] = message
        status["containerStatuses"] = [
            {
                "name": "trainer",
                "image": "t",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ]
    client.CoreV1Api(kube_api).patch_namespaced_pod_status(pod_name, namespace, {"status": status})


def test_training_job_lifecycle(kube_api, namespace, operator):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "minio-credentials"},
            "stringData": {"accessKey": "a", "secretKey": "b"},
        },
    )
    create(
        kube_api,
        namespace,
        training_job(
            "pets", storage={"endpoint": "minio:9000", "secretRef": {"name": "minio-credentials"}}
        ),
    )

    batch = client.BatchV1Api(kube_api)
    job = wait_for(
        lambda: next(iter(batch.list_namespaced_job(namespace).items), None), what="the child Job"
    )
    assert job.metadata.owner_references[0].name == "pets"
    assert core.read_namespaced_config_map("pets-config", namespace).data["job.yaml"]
    assert client.RbacAuthorizationV1Api(kube_api).read_namespaced_role("pets-trainer", namespace)
    pods = wait_for(lambda: core.list_namespaced_pod(namespace).items, what="the Job's pod")

    set_pod_phase(kube_api, namespace, pods[0].metadata.name, "Running")
    wait_for(
        lambda: status_of(kube_api, namespace, "pets").get("phase") == "Preparing",
        what="phase Preparing",
    )
    client.CustomObjectsApi(kube_api).patch_namespaced_custom_object_status(
        api.GROUP,
        api.VERSION,
        namespace,
        "diffusiontrainingjobs",
        "pets",
        {"status": {"step": 5, "totalSteps": 1000}},
    )
    wait_for(
        lambda: status_of(kube_api, namespace, "pets").get("phase") == "Running",
        what="phase Running",
    )

    set_pod_phase(kube_api, namespace, pods[0].metadata.name, "Succeeded", exit_code=0)
    final = wait_for(
        lambda: (s := status_of(kube_api, namespace, "pets")).get("phase") == "Succeeded" and s,
        timeout=90,
        what="phase Succeeded",
    )
    conditions = {c["type"]: c["status"] for c in final["conditions"]}
    assert conditions["Succeeded"] == "True"
    assert conditions["Running"] == "False"
    assert final["step"] == 5  # the trainer's fields are kept
    for reason in ("Preparing", "Running", "Succeeded"):
        wait_for_event(kube_api, namespace, reason)

    scraped = urllib.request.urlopen(operator.metrics_url, timeout=5).read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in scraped.splitlines()
        if line and not line.startswith("#")
    }
    kind = '{kind="DiffusionTrainingJob"}'
    assert samples[f"difftrain_operator_resources_created_total{kind}"] == 1
    assert samples[f"difftrain_operator_resources_succeeded_total{kind}"] == 1
    assert samples[f"difftrain_operator_reconcile_duration_seconds_count{kind}"] >= 1
    by_phase = 'difftrain_operator_resources{kind="DiffusionTrainingJob",phase="%s"}'
    assert samples[by_phase % "Succeeded"] == 1
    assert samples[by_phase % "Running"] == 0


def test_missing_secret_gives_a_waiting_condition_and_an_event(kube_api, namespace, operator):
    create(
        kube_api,
        namespace,
        training_job(
            "nosecret", storage={"endpoint": "minio:9000", "secretRef": {"name": "does-not-exist"}}
        ),
    )
    status = wait_for(
        lambda: (s := status_of(kube_api, namespace, "nosecret")).get("conditions") and s,
        what="a condition",
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "SecretMissing"
    assert "does-not-exist" in ready["message"]
    wait_for_event(kube_api, namespace, "SecretMissing")
    assert not client.BatchV1Api(kube_api).list_namespaced_job(namespace).items


def status_of_merge(kube_api, namespace, name):
    obj = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, "modelmerges", name
    )
    return obj.get("status") or {}


def test_model_merge_runs_as_a_job_and_reports_its_result(kube_api, namespace, operator):
    create(kube_api, namespace, model_merge("mix"))
    core = client.CoreV1Api(kube_api)
    job = wait_for(
        lambda: next(iter(client.BatchV1Api(kube_api).list_namespaced_job(namespace).items), None),
        what="the merge Job",
    )
    assert job.spec.template.spec.containers[0].args[0] == "merge"
    pods = wait_for(lambda: core.list_namespaced_pod(namespace).items, what="the merge pod")
    set_pod_phase(kube_api, namespace, pods[0].metadata.name, "Running")
    wait_for(
        lambda: status_of_merge(kube_api, namespace, "mix").get("phase") == "Running",
        what="phase Running",
    )
    report = json.dumps(
        {
            "outputUri": "/m/out.safetensors",
            "sha256": "ab" * 32,
            "shortHash": "ab" * 5,
            "sizeBytes": 2132624110,
            "tensors": 1131,
            "durationSeconds": 7.7,
        }
    )
    set_pod_phase(
        kube_api, namespace, pods[0].metadata.name, "Succeeded", exit_code=0, message=report
    )
    final = wait_for(
        lambda: (
            (s := status_of_merge(kube_api, namespace, "mix")).get("phase") == "Succeeded" and s
        ),
        timeout=90,
        what="phase Succeeded",
    )
    assert final["sha256"] == "ab" * 32
    assert final["shortHash"] == "ababababab"
    assert final["tensors"] == 1131
    assert final["outputUri"] == "/m/out.safetensors"


def _start_job(kube_api, namespace, name):
    client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        {"metadata": {"name": "creds"}, "stringData": {"accessKey": "a", "secretKey": "b"}},
    )
    create(
        kube_api,
        namespace,
        training_job(name, storage={"endpoint": "minio:9000", "secretRef": {"name": "creds"}}),
    )
    return wait_for(
        lambda: next(iter(client.BatchV1Api(kube_api).list_namespaced_job(namespace).items), None),
        what="the child Job",
    )


def test_status_is_only_written_when_what_it_shows_changes(kube_api, namespace, operator):
    _start_job(kube_api, namespace, "quiet")
    core = client.CoreV1Api(kube_api)
    pod = wait_for(lambda: core.list_namespaced_pod(namespace).items, what="a pod")[0]
    wait_for(
        lambda: status_of(kube_api, namespace, "quiet").get("phase") == "Pending", what="Pending"
    )
    objects = client.CustomObjectsApi(kube_api)

    def version() -> str:
        obj = objects.get_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, "diffusiontrainingjobs", "quiet"
        )
        return str(obj["metadata"]["resourceVersion"])

    time.sleep(2)  # the operator's own writes (status, Kopf's annotations) have landed
    before = version()
    # a pod change the status does not show: the operator looks, and writes nothing
    core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"labels": {"x": "y"}}})
    time.sleep(2)
    assert version() == before
    # one it shows: written
    set_pod_phase(kube_api, namespace, pod.metadata.name, "Running")
    wait_for(
        lambda: status_of(kube_api, namespace, "quiet").get("phase") == "Preparing",
        what="Preparing",
    )
    assert version() != before


def test_suspend_and_resume_map_to_the_child_job(kube_api, namespace, operator):
    job = _start_job(kube_api, namespace, "susp")
    objects = client.CustomObjectsApi(kube_api)
    batch = client.BatchV1Api(kube_api)

    def set_suspend(value: bool) -> None:
        objects.patch_namespaced_custom_object(
            api.GROUP,
            api.VERSION,
            namespace,
            "diffusiontrainingjobs",
            "susp",
            {"spec": {"suspend": value}},
        )

    set_suspend(True)
    wait_for(
        lambda: batch.read_namespaced_job(job.metadata.name, namespace).spec.suspend,
        what="the Job to be suspended",
    )
    wait_for(
        lambda: status_of(kube_api, namespace, "susp").get("phase") == "Suspended",
        what="phase Suspended",
    )
    set_suspend(False)
    wait_for(
        lambda: not batch.read_namespaced_job(job.metadata.name, namespace).spec.suspend,
        what="the Job to resume",
    )
    wait_for(
        lambda: status_of(kube_api, namespace, "susp").get("phase") != "Suspended",
        what="phase after resume",
    )


def test_preempted_pod_does_not_fail_the_job(kube_api, namespace, operator):
    job = _start_job(kube_api, namespace, "pre")
    core = client.CoreV1Api(kube_api)
    pod = wait_for(lambda: core.list_namespaced_pod(namespace).items, what="a pod")[0]
    core.patch_namespaced_pod_status(
        pod.metadata.name,
        namespace,
        {
            "status": {
                "phase": "Failed",
                "conditions": [
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "PreemptionByScheduler",
                        "message": "preempted",
                        "lastTransitionTime": "2026-11-26T12:00:00Z",
                    }
                ],
            }
        },
    )
    # the Job replaces the pod without counting a failure, and the resource is not Failed
    wait_for(
        lambda: any(
            p.metadata.name != pod.metadata.name for p in core.list_namespaced_pod(namespace).items
        ),
        what="a replacement pod",
    )
    batch_job = client.BatchV1Api(kube_api).read_namespaced_job(job.metadata.name, namespace)
    assert not batch_job.status.failed
    assert status_of(kube_api, namespace, "pre").get("phase") != "Failed"


def _refused_creates(control_plane) -> int:
    """Creates the API server has refused with 409 Conflict (already exists), all kinds."""
    total = 0
    for line in control_plane.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        counter = line.startswith("apiserver_request_total{")
        if counter and 'code="409"' in line and 'verb="POST"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_operator_restart_creates_no_duplicates(
    kube_api, namespace, control_plane, operator, tmp_path
):
    _start_job(kube_api, namespace, "again")
    operator.terminate()
    operator.wait(timeout=20)
    refused = _refused_creates(control_plane)
    second = start_operator(control_plane.kubeconfig, namespace, tmp_path / "second.log")
    try:
        time.sleep(6)  # the new operator resumes every resource it finds
        # it saw the Job in its index and created nothing again (no create refused as existing)
        assert _refused_creates(control_plane) == refused
        objects = client.CustomObjectsApi(kube_api)
        objects.patch_namespaced_custom_object_status(
            api.GROUP,
            api.VERSION,
            namespace,
            "diffusiontrainingjobs",
            "again",
            {"status": {"step": 3}},
        )
        core = client.CoreV1Api(kube_api)
        pod = wait_for(lambda: core.list_namespaced_pod(namespace).items, what="a pod")[0]
        set_pod_phase(kube_api, namespace, pod.metadata.name, "Running")
        wait_for(
            lambda: status_of(kube_api, namespace, "again").get("phase") == "Running",
            what="the restarted operator to fold status",
        )
        assert len(client.BatchV1Api(kube_api).list_namespaced_job(namespace).items) == 1
        assert (
            len(
                core.list_namespaced_config_map(
                    namespace, label_selector="difftrain.dev/job=again"
                ).items
            )
            == 1
        )
        assert status_of(kube_api, namespace, "again")["step"] == 3
    finally:
        second.terminate()
        second.wait(timeout=20)


def test_ttl_deletion_keeps_the_result_and_runs_nothing_again(kube_api, namespace, operator):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "creds"}, "stringData": {"accessKey": "a", "secretKey": "b"}},
    )
    create(
        kube_api,
        namespace,
        training_job(
            "ttl",
            ttlSecondsAfterFinished=0,
            storage={"endpoint": "minio:9000", "secretRef": {"name": "creds"}},
        ),
    )
    batch = client.BatchV1Api(kube_api)
    job = wait_for(
        lambda: next(iter(batch.list_namespaced_job(namespace).items), None), what="the child Job"
    )
    pod = wait_for(lambda: core.list_namespaced_pod(namespace).items, what="a pod")[0]
    set_pod_phase(kube_api, namespace, pod.metadata.name, "Succeeded", exit_code=0)
    wait_for(
        lambda: status_of(kube_api, namespace, "ttl").get("phase") == "Succeeded",
        timeout=90,
        what="phase Succeeded",
    )
    wait_for(
        lambda: not batch.list_namespaced_job(namespace).items,
        timeout=90,
        what="the TTL controller to delete the Job",
    )
    time.sleep(3)
    assert status_of(kube_api, namespace, "ttl")["phase"] == "Succeeded"
    assert not batch.list_namespaced_job(namespace).items, "the finished job ran again"
    assert job.spec.ttl_seconds_after_finished == 0


def test_a_gpu_count_no_node_offers_gives_a_condition_and_an_event(kube_api, namespace, operator):
    core = client.CoreV1Api(kube_api)
    node = f"gpu-{namespace}"
    core.create_node({"metadata": {"name": node}})
    core.patch_node_status(
        node,
        {"status": {"allocatable": {"nvidia.com/gpu": "4"}, "capacity": {"nvidia.com/gpu": "4"}}},
    )
    try:
        core.create_namespaced_secret(
            namespace,
            {"metadata": {"name": "creds"}, "stringData": {"accessKey": "a", "secretKey": "b"}},
        )
        create(
            kube_api,
            namespace,
            training_job(
                "big",
                resources={"gpusPerWorker": 16},
                storage={"endpoint": "minio:9000", "secretRef": {"name": "creds"}},
            ),
        )
        cond = wait_for(
            lambda: next(
                (
                    c
                    for c in status_of(kube_api, namespace, "big").get("conditions", [])
                    if c["type"] == "Schedulable"
                ),
                None,
            ),
            what="Schedulable",
        )
        assert cond["status"] == "False"
        assert cond["reason"] == "InsufficientGPUs"
        assert "16 nvidia.com/gpu" in cond["message"]
        wait_for_event(kube_api, namespace, "InsufficientGPUs")
        # the Job is still created: an autoscaler needs its pending pods to add a node
        wait_for(
            lambda: client.BatchV1Api(kube_api).list_namespaced_job(namespace).items, what="the Job"
        )
    finally:
        core.delete_node(node)


def test_a_configuration_error_fails_the_job_at_once(kube_api, namespace, operator):
    job = _start_job(kube_api, namespace, "bad")
    core = client.CoreV1Api(kube_api)
    pod = wait_for(lambda: core.list_namespaced_pod(namespace).items, what="a pod")[0]
    set_pod_phase(kube_api, namespace, pod.metadata.name, "Failed", exit_code=3)
    final = wait_for(
        lambda: (s := status_of(kube_api, namespace, "bad")).get("phase") == "Failed" and s,
        timeout=90,
        what="phase Failed",
    )
    failed = next(c for c in final["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "PodFailurePolicy"  # no retry was spent on it
    batch_job = client.BatchV1Api(kube_api).read_namespaced_job(job.metadata.name, namespace)
    assert batch_job.spec.backoff_limit == 3
    assert len(core.list_namespaced_pod(namespace).items) == 1
    wait_for_event(kube_api, namespace, "Failed", type="Warning")


def test_deleting_the_resource_removes_its_children(kube_api, namespace, operator):
    _start_job(kube_api, namespace, "gone")
    client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, "diffusiontrainingjobs", "gone"
    )
    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)
    # the result finalizer is released by the operator, then garbage collection finishes
    wait_for(
        lambda: not batch.list_namespaced_job(namespace).items,
        timeout=120,
        what="the Job to be deleted",
    )
    wait_for(
        lambda: (
            not core.list_namespaced_config_map(
                namespace, label_selector="difftrain.dev/job=gone"
            ).items
        ),
        timeout=120,
        what="the ConfigMap to be deleted",
    )


def _condition(kube_api, namespace, name, kind):
    conditions = status_of(kube_api, namespace, name).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), None)


def test_a_namesake_waits_for_the_deleted_resources_children(kube_api, namespace, operator):
    """Deleted and applied again at once: the old children must not stand in for the new ones."""
    old_job = _start_job(kube_api, namespace, "twice")
    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)
    objects = client.CustomObjectsApi(kube_api)
    selector = "difftrain.dev/job=twice"
    config_map = core.list_namespaced_config_map(namespace, label_selector=selector).items[0]
    hold = {"metadata": {"finalizers": ["test.difftrain.dev/hold"]}}
    core.patch_namespaced_config_map(config_map.metadata.name, namespace, hold)
    objects.delete_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, "diffusiontrainingjobs", "twice"
    )
    wait_for(
        lambda: (
            not objects.list_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, "diffusiontrainingjobs"
            )["items"]
        ),
        what="the first resource to be deleted",
    )

    # what the garbage collector does, without waiting for it (it can take 30 s or more here;
    # when it is quicker, the object is gone already)
    def delete(call, name: str, **kwargs) -> None:
        try:
            call(name, namespace, **kwargs)
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    delete(batch.delete_namespaced_job, old_job.metadata.name, propagation_policy="Background")
    rbac = client.RbacAuthorizationV1Api(kube_api)
    for listing, remove in (
        (core.list_namespaced_service_account, core.delete_namespaced_service_account),
        (rbac.list_namespaced_role, rbac.delete_namespaced_role),
        (rbac.list_namespaced_role_binding, rbac.delete_namespaced_role_binding),
        (core.list_namespaced_config_map, core.delete_namespaced_config_map),  # held: terminating
    ):
        for item in listing(namespace, label_selector=selector).items:
            delete(remove, item.metadata.name)
    created = create(
        kube_api,
        namespace,
        training_job("twice", storage={"endpoint": "minio:9000", "secretRef": {"name": "creds"}}),
    )
    uid = created["metadata"]["uid"]
    # the old ConfigMap is held (terminating, still owned by the deleted resource): wait, say why
    ready = wait_for(
        lambda: (
            (c := _condition(kube_api, namespace, "twice", "Ready"))
            and c["status"] == "False"
            and c
        ),
        what="Ready=False while the old children are deleted",
    )
    assert ready["reason"] == "PreviousChildrenTerminating"
    assert "still belongs to an earlier resource" in ready["message"]  # its Job or ConfigMap
    wait_for_event(kube_api, namespace, "PreviousChildrenTerminating")
    assert not [
        j
        for j in batch.list_namespaced_job(namespace).items
        if j.metadata.owner_references[0].uid == uid
    ]

    core.patch_namespaced_config_map(
        config_map.metadata.name, namespace, {"metadata": {"finalizers": None}}
    )

    def owned(items):
        return [o for o in items if o.metadata.owner_references[0].uid == uid]

    wait_for(
        lambda: owned(batch.list_namespaced_job(namespace).items), timeout=90, what="a new Job"
    )
    assert owned(core.list_namespaced_config_map(namespace, label_selector=selector).items)
    wait_for(
        lambda: (c := _condition(kube_api, namespace, "twice", "Ready")) and c["status"] == "True",
        what="Ready=True once the children exist",
    )
