"""Kueue's Workloads: the user's suspend and resume of a Job that Kueue admits.

With a queue, a Job's ``spec.suspend`` is Kueue's: Kueue un-suspends a suspended Job whose
Workload is admitted, so suspending the Job would be undone at once. The user's suspend
deactivates the Job's Workload instead (``spec.active: false``): Kueue evicts it, suspends the Job
(its pods stop, their quota is freed) and does not admit it again. Resuming re-activates it: Kueue
queues it and admits it when its quota allows. The operator marks the Workloads it deactivated and
re-activates only those: one Kueue deactivated itself (its requeuing limit, a maximum execution
time) stays as Kueue left it.

A job created suspended is not handed to Kueue at all until it is resumed: its Job carries no
queue label until then (``edits``), so Kueue makes no Workload for it and holds no quota.

Kueue finds a Job's Workload by the ``kueue.x-k8s.io/job-uid`` label it puts on it. Its storage
version is ``v1beta2`` (Kueue 0.15 on); ``v1beta1`` is asked when that is not served.
"""

from __future__ import annotations

import enum
from typing import Any

from kubernetes.client.exceptions import ApiException

from difftrain import api
from difftrain_operator.kube import Kube

Obj = dict[str, Any]

GROUP = "kueue.x-k8s.io"
VERSIONS = ("v1beta2", "v1beta1")
PLURAL = "workloads"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
# on a Workload the operator deactivated for the user's suspend
DEACTIVATED_ANNOTATION = f"{api.GROUP}/deactivated-for-suspend"


class Outcome(enum.Enum):
    """What became of a Job's Workload."""

    SET = "set"  # the Workload is active or not as the resource's suspend asks
    NOT_YET = "not-yet"  # Kueue has not made the Job's Workload (yet)
    NO_KUEUE = "no-kueue"  # Kueue's Workload kind is not served: nobody else suspends the Job


def is_active(workload: Obj) -> bool:
    return (workload.get("spec") or {}).get("active", True) is not False


def is_finished(workload: Obj) -> bool:
    for cond in (workload.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Finished" and cond.get("status") == "True":
            return True
    return False


def activation_patch(workload: Obj, suspend: bool) -> Obj | None:
    """The merge patch that brings a Workload to the resource's ``suspend`` (None: none needed).

    Suspended: an active Workload is deactivated and marked. Resumed: a Workload the operator
    deactivated is re-activated; the mark is dropped once it is active again.
    """
    if is_finished(workload):
        return None
    annotations = (workload.get("metadata") or {}).get("annotations") or {}
    mine = DEACTIVATED_ANNOTATION in annotations
    active = is_active(workload)
    if suspend:
        if not active:
            return None  # already inactive (Kueue's, or ours)
        return {
            "metadata": {"annotations": {DEACTIVATED_ANNOTATION: "true"}},
            "spec": {"active": False},
        }
    if not mine:
        return None
    unmark: Obj = {"metadata": {"annotations": {DEACTIVATED_ANNOTATION: None}}}
    return unmark if active else {**unmark, "spec": {"active": True}}


class Workloads:
    """Kueue's Workloads through the operator's API client (thread-safe)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._version: str | None = None  # the served version, once found

    def of_job(self, job: Obj) -> list[Obj] | None:
        """The Workloads Kueue made for a Job (None: Kueue's Workload kind is not served)."""
        meta = job["metadata"]
        selector = f"{JOB_UID_LABEL}={meta['uid']}"
        versions = (self._version,) if self._version else VERSIONS
        for version in versions:
            try:
                items = self.kube.list_custom(GROUP, version, meta["namespace"], PLURAL, selector)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            self._version = version
            return [
                wl
                for wl in items
                if any(
                    ref.get("uid") == meta["uid"]
                    for ref in (wl.get("metadata") or {}).get("ownerReferences") or []
                )
            ]
        self._version = None  # looked for again next time: Kueue may be installed later
        return None

    def sync(self, job: Obj, suspend: bool) -> Outcome:
        """Bring the Job's Workload to the resource's ``suspend`` (blocking)."""
        found = self.of_job(job)
        if found is None:
            return Outcome.NO_KUEUE
        if not found:
            return Outcome.NOT_YET
        assert self._version is not None
        for workload in found:
            patch = activation_patch(workload, suspend)
            if patch is None:
                continue
            meta = workload["metadata"]
            try:
                self.kube.patch_custom(
                    GROUP, self._version, meta["namespace"], PLURAL, meta["name"], patch
                )
            except ApiException as exc:
                if exc.status != 404:  # gone meanwhile (its Job replaced or deleted)
                    raise
        return Outcome.SET
