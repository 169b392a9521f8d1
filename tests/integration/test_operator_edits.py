"""Edits and accounting against the real API server and controller-manager (Kueue's admission
and preemption are tested with the real Kueue in test_operator_kueue.py).

As in test_operator_reconcile, nothing schedules or runs pods here: the tests move pod phases
through the status subresource as a kubelet would, and suspend a Job as a preemption does (upon
which the Job controller deletes its pods).
"""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest
from kubernetes import client

from difftrain import api
from tests.infra.processes import start_operator
from tests.integration.resources import create, training_job, wait_for

pytestmark = pytest.mark.usefixtures("crds_installed")
PLURAL = "diffusiontrainingjobs"
PRICE = 2.5


@pytest.fixture
def operator(control_plane, namespace, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTRAIN_PRICE_PER_GPU_HOUR", str(PRICE))  # the chart's pricePerGpuHour
    proc = start_operator(control_plane.kubeconfig, namespace, tmp_path / "operator.log")
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    print((tmp_path / "operator.log").read_text()[-8000:])  # shown when the test fails


def _resource(kube_api, namespace, name):
    return client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, PLURAL, name
    )


def _status(kube_api, namespace, name):
    return _resource(kube_api, namespace, name).get("status") or {}


def _condition(kube_api, namespace, name, kind):
    conditions = _status(kube_api, namespace, name).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), None)


def _edit(kube_api, namespace, name, spec):
    return client.CustomObjectsApi(kube_api).patch_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, PLURAL, name, {"spec": spec}
    )


def _ago(minutes: float) -> str:
    t = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _start(kube_api, namespace, name, **spec):
    client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        {"metadata": {"name": "creds"}, "stringData": {"accessKey": "a", "secretKey": "b"}},
    )
    return create(
        kube_api,
        namespace,
        training_job(
            name, storage={"endpoint": "minio:9000", "secretRef": {"name": "creds"}}, **spec
        ),
    )


def _job(kube_api, namespace):
    return wait_for(
        lambda: next(iter(client.BatchV1Api(kube_api).list_namespaced_job(namespace).items), None),
        what="the child Job",
    )


def _live_pods(kube_api, namespace, exclude=()):
    return [
        p
        for p in client.CoreV1Api(kube_api).list_namespaced_pod(namespace).items
        if p.metadata.name not in exclude
        and not p.metadata.deletion_timestamp
        and p.status.phase in ("Pending", "Running")
    ]


def _run_pod(kube_api, namespace, pod_name, started_minutes_ago=None):
    status = {"phase": "Running"}
    if started_minutes_ago is not None:
        status["startTime"] = _ago(started_minutes_ago)
    client.CoreV1Api(kube_api).patch_namespaced_pod_status(pod_name, namespace, {"status": status})


def _training(kube_api, namespace, name, step=5):
    client.CustomObjectsApi(kube_api).patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, PLURAL, name, {"status": {"step": step}}
    )
    wait_for(lambda: _status(kube_api, namespace, name).get("phase") == "Running", what="Running")


def test_edits_reach_a_running_job_at_once_or_at_its_next_start(kube_api, namespace, operator):
    _start(kube_api, namespace, "edit")
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    first = _job(kube_api, namespace)
    pod = wait_for(lambda: _live_pods(kube_api, namespace), what="a pod")[0]
    _run_pod(kube_api, namespace, pod.metadata.name)
    _training(kube_api, namespace, "edit")
    assert _status(kube_api, namespace, "edit")["observedGeneration"] == 1

    edited = _edit(
        kube_api,
        namespace,
        "edit",
        {
            "backoffLimit": 7,
            "activeDeadlineSeconds": 86400,
            "ttlSecondsAfterFinished": 600,
            "resources": {"memory": "3Gi"},
            "sampling": {"everySteps": 77},
        },
    )
    generation = edited["metadata"]["generation"]
    # what a running Job can take, it takes at once
    job = wait_for(
        lambda: (
            (j := batch.read_namespaced_job(first.metadata.name, namespace)).spec.backoff_limit == 7
            and j
        ),
        what="backoffLimit on the running Job",
    )
    assert job.spec.active_deadline_seconds == 86400
    assert job.spec.ttl_seconds_after_finished == 600
    assert job.metadata.uid == first.metadata.uid  # the running pods were not touched
    # the rest waits for the next start, and says so
    cond = wait_for(
        lambda: (
            (c := _condition(kube_api, namespace, "edit", "SpecApplied"))
            and c["status"] == "False"
            and c
        ),
        what="SpecApplied=False",
    )
    assert cond["reason"] == "WaitingForNextStart"
    assert "resources.memory" in cond["message"]
    assert "sampling.everySteps" in cond["message"]
    assert "backoffLimit" not in cond["message"]
    status = _status(kube_api, namespace, "edit")
    assert status["observedGeneration"] == 1  # the pods do not reflect the edit yet
    assert status["phase"] == "Running"
    config = core.read_namespaced_config_map("edit-config", namespace).data["job.yaml"]
    assert "everySteps: 77" not in config  # the running trainer's config is left as it started

    # suspend: the pods stop, and the Job is made anew from the new spec while suspended
    _edit(kube_api, namespace, "edit", {"suspend": True})
    second = wait_for(
        lambda: (
            (j := next(iter(batch.list_namespaced_job(namespace).items), None))
            and j.metadata.uid != first.metadata.uid
            and j
        ),
        timeout=90,
        what="a new Job from the edited spec",
    )
    assert second.spec.suspend
    container = second.spec.template.spec.containers[0]
    assert container.resources.requests["memory"] == "3Gi"
    assert second.spec.backoff_limit == 7
    assert second.metadata.name == first.metadata.name  # same pods' names, rendezvous, output
    config = core.read_namespaced_config_map("edit-config", namespace).data["job.yaml"]
    assert "everySteps: 77" in config
    assert "uri: s3://runs/pets" in config  # same output prefix: resumes from its checkpoints
    wait_for(
        lambda: (
            (c := _condition(kube_api, namespace, "edit", "SpecApplied")) and c["status"] == "True"
        ),
        what="SpecApplied=True",
    )
    resumed = _edit(kube_api, namespace, "edit", {"suspend": False})
    wait_for(
        lambda: not batch.read_namespaced_job(second.metadata.name, namespace).spec.suspend,
        what="the new Job to resume",
    )
    wait_for(
        lambda: (
            _status(kube_api, namespace, "edit").get("observedGeneration")
            == resumed["metadata"]["generation"]
        ),
        what="observedGeneration to reach the resumed generation",
    )
    assert resumed["metadata"]["generation"] > generation
    new_pod = wait_for(lambda: _live_pods(kube_api, namespace), what="a pod of the new Job")[0]
    assert new_pod.spec.containers[0].resources.requests["memory"] == "3Gi"
    assert _status(kube_api, namespace, "edit")["phase"] != "Failed"


def test_a_training_field_edit_before_any_pod_started_updates_the_config_map(
    kube_api, namespace, operator
):
    _start(kube_api, namespace, "early")
    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)
    first = _job(kube_api, namespace)
    wait_for(lambda: _live_pods(kube_api, namespace), what="a (pending) pod")
    edited = _edit(kube_api, namespace, "early", {"hyperparameters": {"learningRate": 0.0003}})

    def config() -> str:
        return str(core.read_namespaced_config_map("early-config", namespace).data["job.yaml"])

    wait_for(lambda: "learningRate: 0.0003" in config(), what="the new learning rate")
    job = _job(kube_api, namespace)
    assert job.metadata.uid != first.metadata.uid  # no pod had started: made anew at once
    assert not job.spec.suspend
    wait_for(
        lambda: (
            _status(kube_api, namespace, "early").get("observedGeneration")
            == edited["metadata"]["generation"]
        ),
        what="observedGeneration",
    )
    assert len(batch.list_namespaced_job(namespace).items) == 1

    # once a pod runs, a training field is refused by the schema, naming the field
    pod = wait_for(lambda: _live_pods(kube_api, namespace), what="a pod of the new Job")[0]
    _run_pod(kube_api, namespace, pod.metadata.name)
    _training(kube_api, namespace, "early")
    with pytest.raises(client.ApiException) as refused:
        _edit(kube_api, namespace, "early", {"hyperparameters": {"learningRate": 0.001}})
    assert refused.value.status == 422
    assert "spec.hyperparameters cannot change while the job runs" in str(refused.value.body)


def test_gpu_hours_and_restarts_only_grow(kube_api, namespace, operator):
    _start(kube_api, namespace, "ledger", resources={"gpusPerWorker": 2})
    core = client.CoreV1Api(kube_api)
    _job(kube_api, namespace)
    first = wait_for(lambda: _live_pods(kube_api, namespace), what="a pod")[0]
    _run_pod(kube_api, namespace, first.metadata.name, started_minutes_ago=60)
    _training(kube_api, namespace, "ledger")
    status = wait_for(
        lambda: (s := _status(kube_api, namespace, "ledger")).get("gpuHours", 0) >= 1.99 and s,
        what="2 GPU-hours",
    )
    assert status["estimatedCost"] == pytest.approx(status["gpuHours"] * PRICE, abs=0.02)
    assert status["restarts"] == 0

    # the trainer checkpointed and exits 75 to be restarted: replaced without spending a retry
    finished = _ago(0)
    core.patch_namespaced_pod_status(
        first.metadata.name,
        namespace,
        {
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "t",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": 75,
                                "reason": "Error",
                                "startedAt": _ago(60),
                                "finishedAt": finished,
                            }
                        },
                    }
                ],
            }
        },
    )
    status = wait_for(
        lambda: (s := _status(kube_api, namespace, "ledger")).get("restarts") == 1 and s,
        what="the exit-75 restart",
    )
    assert status["lastRestartReason"] == "Interrupted"
    hours = status["gpuHours"]
    assert hours == pytest.approx(2.0, abs=0.05)
    second = wait_for(
        lambda: _live_pods(kube_api, namespace, exclude={first.metadata.name}),
        what="the replacement pod",
    )[0]
    # the failed pod is removed: its hours stay
    core.delete_namespaced_pod(first.metadata.name, namespace)
    _run_pod(kube_api, namespace, second.metadata.name, started_minutes_ago=30)
    status = wait_for(
        lambda: (
            (s := _status(kube_api, namespace, "ledger")).get("gpuHours", 0) >= hours + 0.99 and s
        ),
        what="the second pod's hour on top",
    )
    hours = status["gpuHours"]
    # preempted: marked by the scheduler, stopped by the kubelet, deleted; the Job replaces it
    core.patch_namespaced_pod_status(
        second.metadata.name,
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
                        "lastTransitionTime": _ago(0),
                    }
                ],
            }
        },
    )
    core.delete_namespaced_pod(second.metadata.name, namespace)
    status = wait_for(
        lambda: (s := _status(kube_api, namespace, "ledger")).get("restarts") == 2 and s,
        what="the preemption",
    )
    assert status["lastRestartReason"] == "Preempted"
    assert status["gpuHours"] >= hours
    assert status["estimatedCost"] >= round(hours * PRICE, 2) - 0.01
    assert not status["accounting"]["pods"] or all(
        p["uid"] not in (first.metadata.uid, second.metadata.uid)
        for p in status["accounting"]["pods"]
    )
