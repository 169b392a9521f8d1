"""A real Kueue admits suspended batch/v1 Jobs on GPU quota.

The control plane has no nodes: admission is quota only, and admitted Jobs' pods stay Pending."""

from __future__ import annotations

import time
import uuid
from typing import Any

from kubernetes import client

from tests.infra.kueue import GPU, GROUP, QUEUE_LABEL, wait_for, workload_of, workload_state

ADMISSION_TIMEOUT = 60


def gpu_job(name: str, queue: str, suspend: bool = True) -> dict[str, Any]:
    """A Job of one pod asking for one GPU, in Kueue's queue ``queue``."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {QUEUE_LABEL: queue}},
        "spec": {
            "suspend": suspend,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "difftrain-trainer:test",
                            "resources": {"limits": {GPU: "1"}},
                        }
                    ],
                }
            },
        },
    }


def create_job(kube_api, namespace: str, body: dict[str, Any]) -> client.V1Job:
    return client.BatchV1Api(kube_api).create_namespaced_job(namespace, body)


def job_state(kube_api, namespace: str, job: client.V1Job) -> tuple[bool, str]:
    """(the Job's spec.suspend, its Workload's state)."""
    current = client.BatchV1Api(kube_api).read_namespaced_job(job.metadata.name, namespace)
    wl = workload_of(kube_api, namespace, job.metadata.uid)
    return bool(current.spec.suspend), workload_state(wl)


def pods_of(kube_api, namespace: str, job: client.V1Job) -> list[client.V1Pod]:
    selector = f"job-name={job.metadata.name}"
    return list(
        client.CoreV1Api(kube_api).list_namespaced_pod(namespace, label_selector=selector).items
    )


def wait_states(kube_api, namespace, expected: dict[str, tuple[bool, str]], jobs, timeout):
    by_name = {j.metadata.name: j for j in jobs}

    def states():
        return {n: job_state(kube_api, namespace, by_name[n]) for n in expected}

    try:
        wait_for(lambda: states() == expected, timeout, f"jobs {expected}")
    except AssertionError as err:
        raise AssertionError(f"{err}; they are {states()}") from None


def two_queued_jobs(kube_api, namespace, gpu_queue):
    """Two suspended one-GPU Jobs in a queue of one GPU: exactly one is admitted and un-suspended.
    Returns (admitted, pending)."""
    tag = uuid.uuid4().hex[:6]
    jobs = [
        create_job(kube_api, namespace, gpu_job(f"train-{tag}-{i}", gpu_queue.local_queue))
        for i in (1, 2)
    ]
    names = [j.metadata.name for j in jobs]

    def settled():
        states = {j.metadata.name: job_state(kube_api, namespace, j) for j in jobs}
        admitted = [n for n, s in states.items() if s == (False, "admitted")]
        pending = [n for n, s in states.items() if s == (True, "pending")]
        return states if len(admitted) == 1 and len(pending) == 1 else None

    try:
        states = wait_for(settled, ADMISSION_TIMEOUT, "one Job admitted and one pending")
    except AssertionError as err:
        now = {n: job_state(kube_api, namespace, j) for n, j in zip(names, jobs, strict=True)}
        raise AssertionError(f"{err}; they are {now}") from None
    admitted = next(j for j in jobs if states[j.metadata.name][0] is False)
    pending = next(j for j in jobs if j is not admitted)
    # and it stays that way: the second Job is not let in while the first holds the quota
    time.sleep(3)
    wait_states(
        kube_api,
        namespace,
        {admitted.metadata.name: (False, "admitted"), pending.metadata.name: (True, "pending")},
        jobs,
        1,
    )
    wl = workload_of(kube_api, namespace, pending.metadata.uid)
    assert wl is not None
    reserved = next(c for c in wl["status"]["conditions"] if c["type"] == "QuotaReserved")
    assert reserved["status"] == "False" and reserved["reason"] == "Pending", reserved
    assert GPU in reserved["message"], reserved
    return admitted, pending, jobs


def test_deleting_the_admitted_job_admits_the_queued_one(kube_api, namespace, gpu_queue):
    admitted, pending, jobs = two_queued_jobs(kube_api, namespace, gpu_queue)
    # the admitted Job made its pod (it stays Pending: there are no nodes)
    pods = wait_for(lambda: pods_of(kube_api, namespace, admitted), 30, "the admitted Job's pod")
    assert pods[0].spec.containers[0].resources.limits[GPU] == "1"

    client.BatchV1Api(kube_api).delete_namespaced_job(
        admitted.metadata.name, namespace, propagation_policy="Background"
    )
    wait_states(
        kube_api,
        namespace,
        {pending.metadata.name: (False, "admitted")},
        jobs,
        ADMISSION_TIMEOUT,
    )


def test_a_finished_job_frees_its_quota_for_the_queued_one(kube_api, namespace, gpu_queue):
    admitted, pending, jobs = two_queued_jobs(kube_api, namespace, gpu_queue)
    core = client.CoreV1Api(kube_api)
    pod = wait_for(lambda: pods_of(kube_api, namespace, admitted), 30, "the admitted Job's pod")[0]
    # the pod "runs" and exits 0 (no node runs it: its status is written as a kubelet would)
    terminated = {
        "exitCode": 0,
        "reason": "Completed",
        "startedAt": "2026-11-26T12:00:00Z",
        "finishedAt": "2026-11-26T12:30:00Z",
    }
    status = {
        "phase": "Succeeded",
        "containerStatuses": [
            {
                "name": "trainer",
                "image": "difftrain-trainer:test",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }
    core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": status})
    wait_states(
        kube_api,
        namespace,
        {admitted.metadata.name: (False, "finished"), pending.metadata.name: (False, "admitted")},
        jobs,
        ADMISSION_TIMEOUT,
    )


def test_kueue_webhooks_suspend_a_queued_job_created_running_and_convert(
    kube_api, namespace, gpu_queue
):
    """Kueue's webhooks are registered: a Job in a queue is suspended at creation (then admitted
    on the free quota), and its objects read as v1beta1 through its conversion webhook."""
    job = create_job(kube_api, namespace, gpu_job("eager", gpu_queue.local_queue, suspend=False))
    assert job.spec.suspend is True
    wait_states(kube_api, namespace, {"eager": (False, "admitted")}, [job], ADMISSION_TIMEOUT)

    # the LocalQueue's usage is status.flavorsUsage in v1beta2 and status.flavorUsage in v1beta1
    objects = client.CustomObjectsApi(kube_api)

    def local_queue(version: str) -> dict[str, Any]:
        return dict(
            objects.get_namespaced_custom_object(
                GROUP, version, namespace, "localqueues", gpu_queue.local_queue
            )
        )

    usage = wait_for(
        lambda: (local_queue("v1beta2").get("status") or {}).get("flavorsUsage"),
        ADMISSION_TIMEOUT,
        "the LocalQueue's usage",
    )
    old = local_queue("v1beta1")
    assert old["apiVersion"] == f"{GROUP}/v1beta1"
    assert "flavorsUsage" not in old["status"]
    assert old["status"]["flavorUsage"] == usage
