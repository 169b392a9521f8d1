"""The ledger behind gpuHours and restarts: both only grow as pods come and go."""

from __future__ import annotations

import datetime as dt

from difftrain_operator.accounting import restart_reason, settle
from difftrain_operator.edits import changed_fields, live_patch, next_start_fields, spec_annotation

T0 = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
GPU = "nvidia.com/gpu"


def pod(uid, phase="Running", start="2026-11-26T11:00:00Z", gpus=2, **extra):
    status = {"phase": phase, "startTime": start, **extra}
    container = {"name": "trainer", "resources": {"limits": {GPU: str(gpus)}}}
    return {"metadata": {"uid": uid}, "spec": {"containers": [container]}, "status": status}


def exited(uid, code, finished="2026-11-26T11:30:00Z"):
    term = {"exitCode": code, "finishedAt": finished}
    return pod(uid, "Failed", containerStatuses=[{"state": {"terminated": term}}])


def status_of(settled):
    return {
        "accounting": settled.ledger,
        "restarts": settled.restarts,
        "lastRestartReason": settled.last_restart_reason,
        "gpuHours": settled.gpu_hours,
    }


def test_gpu_hours_do_not_fall_when_a_pod_is_replaced():
    one = settle({}, [pod("a")], T0, gpu_resource_name=GPU)
    assert one.gpu_hours == 2.0  # 1 h x 2 GPUs
    later = T0 + dt.timedelta(minutes=30)
    # the pod was deleted while the operator looked away: settled at its last look
    two = settle(
        status_of(one), [pod("b", start="2026-11-26T12:15:00Z")], later, gpu_resource_name=GPU
    )
    assert two.gpu_hours == 2.5  # 2.0 kept + 15 min x 2 GPUs of the new one
    assert two.restarts == 1
    assert [p["uid"] for p in two.ledger["pods"]] == ["b"]


def test_an_exit_75_restart_and_a_preemption_are_counted_with_their_reason():
    one = settle({}, [exited("a", 75)], T0, gpu_resource_name=GPU)
    assert (one.restarts, one.last_restart_reason) == (1, "Interrupted")
    assert one.gpu_hours == 1.0  # 11:00 to 11:30, 2 GPUs
    again = settle(status_of(one), [exited("a", 75)], T0, gpu_resource_name=GPU)
    assert again.restarts == 1  # the same pod is counted once
    preempted = pod("b", start="2026-11-26T11:40:00Z")
    preempted["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    ]
    seen = settle(status_of(again), [preempted], T0, gpu_resource_name=GPU)
    gone = settle(status_of(seen), [], T0, gpu_resource_name=GPU, departed=[preempted])
    assert (gone.restarts, gone.last_restart_reason) == (2, "Preempted")
    assert gone.gpu_hours >= seen.gpu_hours


def test_a_succeeded_pod_is_no_restart_and_a_quiet_ledger_keeps_its_time():
    done = pod("a", "Succeeded")
    done["status"]["containerStatuses"] = [
        {"state": {"terminated": {"exitCode": 0, "finishedAt": "2026-11-26T11:30:00Z"}}}
    ]
    one = settle({}, [done], T0, gpu_resource_name=GPU)
    two = settle(status_of(one), [done], T0 + dt.timedelta(hours=1), gpu_resource_name=GPU)
    assert two.restarts == 0
    assert two.ledger == one.ledger  # nothing moved: no status write


def test_restart_reasons():
    evicted = pod("a", "Failed", reason="Evicted")
    assert restart_reason(evicted) == "Evicted"
    assert restart_reason(exited("a", 1)) == "Failed"
    assert restart_reason(pod("a"), stopped_by="Suspended") == "Suspended"


def _job(spec, **job_spec):
    annotations = {"difftrain.dev/spec": spec_annotation(spec), "difftrain.dev/generation": "1"}
    return {"metadata": {"annotations": annotations, "labels": {}}, "spec": job_spec}


def test_edits_are_told_apart_into_live_ones_and_those_for_the_next_start():
    old = {"backoffLimit": 3, "resources": {"memory": "1Gi"}, "sampling": {"everySteps": 5}}
    new = {"backoffLimit": 7, "resources": {"memory": "2Gi"}, "sampling": {"everySteps": 5}}
    assert changed_fields(old, new) == ["backoffLimit", "resources.memory"]
    existing, desired = _job(old, backoffLimit=3), _job(new, backoffLimit=7)
    desired["metadata"]["annotations"]["difftrain.dev/generation"] = "2"
    pending = next_start_fields(existing, desired)
    assert pending == ["resources.memory"]
    patch = live_patch(existing, desired, suspend=False, pending=pending)
    assert patch == {
        "spec": {"backoffLimit": 7},
        "metadata": {"annotations": {"difftrain.dev/pending": "resources.memory"}},
    }  # the generation stays: the pods do not reflect it yet
    applied = live_patch(existing, desired, suspend=False, pending=[])
    assert applied is not None
    assert applied["metadata"]["annotations"] == {"difftrain.dev/generation": "2"}


def test_with_a_kueue_queue_the_operator_never_unsuspends():
    queued = _job({}, suspend=True)
    queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "q"
    assert live_patch(queued, queued, suspend=False, pending=[]) is None
    admitted = _job({}, suspend=False)
    admitted["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "q"
    assert live_patch(admitted, queued, suspend=True, pending=[]) == {"spec": {"suspend": True}}
