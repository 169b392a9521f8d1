"""With a Kueue queue, the user's suspend and resume go through the Job's Workload; a job created
suspended is not handed to Kueue until resumed; a WorkloadPriorityClass label is passed on."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from difftrain import api
from difftrain_operator.builders import (
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    OperatorSettings,
    build_training_children,
)
from difftrain_operator.edits import live_patch, to_create
from difftrain_operator.kueue import DEACTIVATED_ANNOTATION, Outcome, Workloads, activation_patch
from difftrain_operator.status import Folded, Observed, fold, requeued, with_queued

MARK = {"metadata": {"annotations": {DEACTIVATED_ANNOTATION: "true"}}, "spec": {"active": False}}
UNMARK = {"metadata": {"annotations": {DEACTIVATED_ANNOTATION: None}}}


def workload(active: bool | None = None, mine: bool = False, finished: bool = False) -> dict:
    wl: dict[str, Any] = {"metadata": {"name": "job-x", "namespace": "ml"}, "spec": {}}
    if active is not None:
        wl["spec"]["active"] = active
    if mine:
        wl["metadata"]["annotations"] = {DEACTIVATED_ANNOTATION: "true"}
    if finished:
        wl["status"] = {"conditions": [{"type": "Finished", "status": "True"}]}
    return wl


def test_the_users_suspend_deactivates_and_resume_reactivates_only_its_own():
    assert activation_patch(workload(), suspend=True) == MARK
    assert activation_patch(workload(active=True), suspend=True) == MARK
    assert activation_patch(workload(active=False, mine=True), suspend=True) is None
    # Kueue deactivated it (its requeuing limit, a maximum execution time): left as it is
    assert activation_patch(workload(active=False), suspend=True) is None
    assert activation_patch(workload(active=False), suspend=False) is None
    assert activation_patch(workload(active=False, mine=True), suspend=False) == {
        **UNMARK,
        "spec": {"active": True},
    }
    assert activation_patch(workload(active=True, mine=True), suspend=False) == UNMARK
    assert activation_patch(workload(active=True), suspend=False) is None
    assert activation_patch(workload(finished=True), suspend=True) is None


class FakeKube:
    """Serves Workloads of one version (or none: Kueue not installed)."""

    def __init__(self, served: str | None, items: list[dict]) -> None:
        self.served = served
        self.items = items
        self.calls: list[tuple] = []

    def list_custom(self, group, version, namespace, plural, label_selector):
        self.calls.append(("list", version, label_selector))
        if version != self.served:
            raise ApiException(status=404)
        return self.items

    def patch_custom(self, group, version, namespace, plural, name, patch):
        self.calls.append(("patch", version, name, patch))


JOB = {"metadata": {"name": "pets", "namespace": "ml", "uid": "u-1"}}


def owned(wl: dict, uid: str = "u-1") -> dict:
    wl["metadata"]["ownerReferences"] = [{"uid": uid}]
    return wl


@pytest.mark.parametrize("served", ["v1beta2", "v1beta1"])
def test_the_jobs_workload_is_found_by_its_uid_label_in_the_version_served(served):
    fake = FakeKube(served, [owned(workload()), owned(workload(), uid="other")])
    workloads = Workloads(fake)  # type: ignore[arg-type]
    assert workloads.sync(JOB, suspend=True) is Outcome.SET
    assert fake.calls[-1] == ("patch", served, "job-x", MARK)
    assert all(c[2] == "kueue.x-k8s.io/job-uid=u-1" for c in fake.calls if c[0] == "list")
    fake.calls.clear()
    assert workloads.sync(JOB, suspend=False) is Outcome.SET  # nothing to undo
    assert fake.calls == [("list", served, "kueue.x-k8s.io/job-uid=u-1")]  # version remembered


def test_no_workload_yet_and_no_kueue_are_told_apart():
    assert Workloads(FakeKube("v1beta2", [])).sync(JOB, True) is Outcome.NOT_YET  # type: ignore[arg-type]
    assert Workloads(FakeKube(None, [])).sync(JOB, True) is Outcome.NO_KUEUE  # type: ignore[arg-type]


def _job(suspend: bool, queue: str | None) -> dict:
    labels = {KUEUE_QUEUE_LABEL: queue} if queue else {}
    return {"metadata": {"labels": labels, "annotations": {}}, "spec": {"suspend": suspend}}


def test_a_job_created_suspended_is_not_handed_to_kueue_until_resumed():
    desired = _job(True, "q")
    created = to_create(desired, suspend=True)
    assert KUEUE_QUEUE_LABEL not in created["metadata"]["labels"]
    assert KUEUE_QUEUE_LABEL in desired["metadata"]["labels"]  # not changed in place
    assert to_create(desired, suspend=False) is desired
    # still suspended: no label yet; resumed: the label, and Kueue (not the operator) un-suspends
    assert live_patch(created, desired, suspend=True, pending=[]) is None
    assert live_patch(created, desired, suspend=False, pending=[]) == {
        "metadata": {"labels": {KUEUE_QUEUE_LABEL: "q"}}
    }


def test_a_workload_suspends_the_job_where_there_is_one():
    admitted, desired = _job(False, "q"), _job(True, "q")
    assert live_patch(admitted, desired, True, [], suspended_by_workload=True) is None
    # no Workload (Kueue not installed, or not made yet): the Job is suspended directly
    assert live_patch(admitted, desired, True, []) == {"spec": {"suspend": True}}
    # a Job Kueue had keeps its label while suspended
    assert live_patch(_job(True, "q"), desired, True, [], suspended_by_workload=True) is None


def test_the_resources_workload_priority_class_is_passed_on_to_the_job():
    def job_labels(labels: dict[str, str]) -> dict[str, str]:
        res = api.parse_resource(
            {
                "apiVersion": api.API_VERSION,
                "kind": "DiffusionTrainingJob",
                "metadata": {"name": "pets", "namespace": "ml", "labels": labels},
                "spec": {
                    "baseModel": {"uri": "s3://models/sd15"},
                    "dataset": {"uri": "s3://data/pets"},
                    "output": {"uri": "s3://runs/pets"},
                    "storage": {"endpoint": "minio:9000", "secretRef": {"name": "creds"}},
                    "queueName": "q",
                },
            }
        )
        assert isinstance(res, api.DiffusionTrainingJob)
        job = build_training_children(res, "u-1", OperatorSettings()).job
        out: dict[str, str] = job["metadata"]["labels"]
        return out

    assert job_labels({KUEUE_PRIORITY_LABEL: "high"})[KUEUE_PRIORITY_LABEL] == "high"
    assert KUEUE_PRIORITY_LABEL not in job_labels({"team": "a"})


def test_after_the_users_suspend_kueue_holding_it_is_queueing_not_preemption():
    held = {"metadata": {}, "spec": {"suspend": True}, "status": {}}

    def observed(current: dict) -> Folded:
        return fold(
            Observed(held, [], False, 5, 1, "q", ran_before=True, requeued=requeued(current))
        )

    user = {"phase": "Suspended", "conditions": [_true("Suspended", "Suspended")]}
    assert observed(user).phase == "Queued"
    assert observed({"phase": "Queued"}).phase == "Queued"
    assert (observed({"phase": "Running"}).phase, observed({"phase": "Running"}).reason) == (
        "Suspended",
        "Preempted",
    )
    preempted = {"phase": "Suspended", "conditions": [_true("Suspended", "Preempted")]}
    assert observed(preempted).reason == "Preempted"


def _true(kind: str, reason: str) -> dict:
    return {"type": kind, "status": "True", "reason": reason}


def test_queued_condition_says_suspended_while_the_user_holds_it():
    folded = Folded("Suspended", "Suspended", "suspended", 0, None, None, 0.0)
    (cond,) = with_queued([], folded, "q")
    assert (cond["type"], cond["status"], cond["reason"]) == ("Queued", "False", "Suspended")
    running = Folded("Running", "Training", "1 pod", 0, None, None, 0.0)
    assert with_queued([], running, "q")[0]["reason"] == "Admitted"
    assert with_queued([cond], running, None) == []
