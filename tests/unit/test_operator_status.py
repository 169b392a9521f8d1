"""Folding a Job and its pods into a resource's phase, conditions and GPU-hours."""

from __future__ import annotations

import datetime as dt

import pytest

from difftrain_operator.status import Folded, Observed, fold, gpu_hours, merge_conditions

T0 = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def job(conditions=(), suspend=False, **status):
    return {
        "spec": {"suspend": suspend},
        "status": {"conditions": [dict(c) for c in conditions], **status},
    }


def pod(
    phase="Running", restarts=0, start="2026-11-26T11:00:00Z", finished=None, unschedulable=None
):
    state = {"terminated": {"finishedAt": finished}} if finished else {"running": {}}
    conditions = []
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "message": unschedulable})
    return {
        "status": {
            "phase": phase,
            "startTime": start,
            "conditions": conditions,
            "containerStatuses": [{"restartCount": restarts, "state": state}],
        }
    }


def observed(j, pods=(), suspend=False, step=None, gpus=1):
    return Observed(job=j, pods=list(pods), suspend=suspend, trainer_step=step, gpus_per_pod=gpus)


@pytest.mark.parametrize(
    ("obs", "phase", "reason"),
    [
        (observed(None), "Pending", "Creating"),
        (observed(job(), []), "Pending", "WaitingForPods"),
        (
            observed(job(), [pod("Pending", start=None, unschedulable="0/3 nodes have GPUs")]),
            "Pending",
            "Unschedulable",
        ),
        (observed(job(), [pod()]), "Preparing", "PreparingData"),
        (observed(job(), [pod()], step=10), "Running", "Training"),
        (observed(job(suspend=True), []), "Suspended", "Suspended"),
        (
            observed(job([{"type": "Complete", "status": "True"}]), [pod("Succeeded")]),
            "Succeeded",
            "Completed",
        ),
        (
            observed(job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])),
            "Failed",
            "BackoffLimitExceeded",
        ),
        (
            observed(job([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}])),
            "Failed",
            "PodFailurePolicy",
        ),
    ],
)
def test_phase_follows_the_job_and_pods(obs, phase, reason):
    folded = fold(obs, at=T0)
    assert (folded.phase, folded.reason) == (phase, reason)


def test_restarts_count_failed_pods_and_container_restarts():
    folded = fold(observed(job(failed=2), [pod(restarts=1), pod(restarts=3)]), at=T0)
    assert folded.restarts == 6


def test_gpu_hours_run_from_pod_start_to_end_or_now():
    pods = [
        pod(start="2026-11-26T10:00:00Z"),  # 2 h so far
        pod(start="2026-11-26T10:00:00Z", finished="2026-11-26T10:30:00Z"),
    ]  # 0.5 h
    assert gpu_hours(pods, gpus_per_pod=4, at=T0) == pytest.approx(10.0)


def test_conditions_keep_their_transition_time_until_they_change():
    running = Folded("Running", "Training", "1 pod", 0, None, None, 0.0)
    first = merge_conditions([], running, generation=1, at=T0)
    by_type = {c["type"]: c for c in first}
    assert by_type["Running"]["status"] == "True"
    assert by_type["Succeeded"]["status"] == "False"
    later = T0 + dt.timedelta(hours=1)
    again = {c["type"]: c for c in merge_conditions(first, running, generation=1, at=later)}
    assert again["Running"]["lastTransitionTime"] == "2026-11-26T12:00:00Z"
    done = Folded("Succeeded", "Completed", "done", 0, None, None, 0.0)
    final = {c["type"]: c for c in merge_conditions(first, done, generation=1, at=later)}
    assert final["Succeeded"]["status"] == "True"
    assert final["Succeeded"]["lastTransitionTime"] == "2026-11-26T13:00:00Z"
    assert final["Running"]["status"] == "False"


def test_conditions_of_other_owners_are_kept():
    trainer = {
        "type": "DatasetReady",
        "status": "True",
        "reason": "Cleaned",
        "message": "",
        "lastTransitionTime": "2026-11-26T11:00:00Z",
    }
    merged = merge_conditions(
        [trainer], Folded("Running", "Training", "", 0, None, None, 0.0), generation=None, at=T0
    )
    assert trainer in merged


def test_start_time_is_when_the_first_worker_pod_started_not_when_the_job_was_created():
    waiting = job(startTime="2026-11-26T08:00:00Z")
    assert fold(observed(waiting, [pod(phase="Pending", start=None)]), T0).start_time is None
    started = [pod(start="2026-11-26T11:30:00Z"), pod(start="2026-11-26T11:00:00Z")]
    assert fold(observed(waiting, started), T0).start_time == "2026-11-26T11:00:00Z"


def test_the_operators_last_write_overlays_a_status_the_watch_has_not_delivered_yet():
    from difftrain_operator.metrics import PhaseTracker
    from difftrain_operator.status_writer import StatusWriter

    def body(uid):
        meta = {"namespace": "ns", "name": "a", "uid": uid}
        status = {"phase": "Pending", "step": 7}
        return {"kind": "DiffusionTrainingJob", "metadata": meta, "status": status}

    writer = StatusWriter(kube=None, phases=PhaseTracker())  # type: ignore[arg-type]
    writer.remember(body("u1"), {"phase": "Preparing"})
    # the operator's own field is its newer write; the trainer's field is the index's
    assert writer.owned(body("u1")) == {"phase": "Preparing", "step": 7}
    # a resource deleted and created again under the same name starts from its own status
    assert writer.owned(body("u2")) == {"phase": "Pending", "step": 7}


def test_ready_turns_true_once_the_children_exist_and_keeps_its_time():
    from difftrain_operator.status import with_ready

    waiting = [{"type": "Ready", "status": "False", "reason": "SecretMissing", "message": "x"}]
    assert with_ready(waiting, job_exists=False) == waiting  # still waiting: left as set
    ready = with_ready(waiting, job_exists=True, at=T0)
    assert ready == [
        {
            "type": "Ready",
            "status": "True",
            "reason": "ChildrenCreated",
            "message": "",
            "lastTransitionTime": "2026-11-26T12:00:00Z",
        }
    ]
    assert with_ready(ready, job_exists=True) is ready  # no new transition time, no write


def test_a_failed_job_says_what_the_trainer_said():
    failed = pod(phase="Failed", finished="2026-11-26T11:10:00Z")
    failed["status"]["containerStatuses"][0]["state"]["terminated"].update(
        exitCode=3, message="difftrain run: storage.secretRef: the store refused the keys\n"
    )
    cond = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "rule 2"}
    folded = fold(observed(job([cond]), [failed]), at=T0)
    assert (folded.phase, folded.reason) == ("Failed", "PodFailurePolicy")
    assert folded.message == "difftrain run: storage.secretRef: the store refused the keys"
    # without a message from the pod, the Job's own
    assert fold(observed(job([cond]), [pod(phase="Failed")]), at=T0).message == "rule 2"


def test_a_job_kueue_holds_is_queued_until_it_ran_and_preempted_after():
    held = job(suspend=True)
    queued = fold(Observed(held, [], False, None, 1, queue_name="team-a"), at=T0)
    assert (queued.phase, queued.reason) == ("Queued", "WaitingForAdmission")
    preempted = fold(Observed(held, [], False, 5, 1, queue_name="team-a", ran_before=True), T0)
    assert (preempted.phase, preempted.reason) == ("Suspended", "Preempted")
    # the user's own suspend is a suspend, queue or not
    mine = fold(Observed(held, [], True, 5, 1, queue_name="team-a", ran_before=True), T0)
    assert (mine.phase, mine.reason) == ("Suspended", "Suspended")


def test_spec_applied_names_the_fields_that_wait_for_the_next_start():
    from difftrain_operator.status import with_spec_applied

    waiting = with_spec_applied([], ["resources.memory"], at=T0)
    assert waiting[0]["status"] == "False"
    assert waiting[0]["reason"] == "WaitingForNextStart"
    assert waiting[0]["message"].startswith("resources.memory take effect at the next start")
    applied = with_spec_applied(waiting, [], at=T0)
    assert [c["status"] for c in applied] == ["True"]
    assert with_spec_applied(applied, [], at=T0) is applied  # unchanged: no write
