"""Pure: the child Job and its pods -> a resource's phase, conditions and accounting.

The trainer writes its own progress (step, loss, images/s, samples) into the status; the operator
folds in what only the cluster knows: whether pods run, were preempted, failed or finished.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, replace
from typing import Any

Obj = dict[str, Any]

CONDITION_TYPES = ("Running", "Suspended", "Succeeded", "Failed")
FINISHED = ("Succeeded", "Failed")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def _job_condition(job: Obj, kind: str) -> Obj | None:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            found: Obj = cond
            return found
    return None


@dataclass(frozen=True)
class Observed:
    """What the operator saw of one resource's children."""

    job: Obj | None
    pods: list[Obj]
    suspend: bool
    trainer_step: int | None
    gpus_per_pod: int
    # the Kueue queue the Job waits in (None: the operator alone decides when it runs)
    queue_name: str | None = None
    # whether its pods ran before (a Kueue-suspended Job was then preempted, not queued)
    ran_before: bool = False
    # whether it waits for Kueue again after the user resumed it (queued, not preempted)
    requeued: bool = False


@dataclass(frozen=True)
class Folded:
    """The status fields the operator owns, and why the phase is what it is."""

    phase: str
    reason: str
    message: str
    restarts: int
    start_time: str | None
    completion_time: str | None
    gpu_hours: float


def fold(observed: Observed, at: dt.datetime | None = None) -> Folded:
    """Phase and accounting from the Job and pods (level-triggered: no memory of the past)."""
    at = at or now()
    job = observed.job
    pods = observed.pods
    restarts = sum(
        int(cs.get("restartCount", 0))
        for pod in pods
        for cs in pod.get("status", {}).get("containerStatuses") or []
    )
    if job is None:
        return Folded("Pending", "Creating", "creating the child Job", restarts, None, None, 0.0)
    status = job.get("status", {})
    restarts += int(status.get("failed", 0))
    start = first_pod_start(pods)
    completion = status.get("completionTime")
    hours = gpu_hours(pods, observed.gpus_per_pod, at)

    if cond := _job_condition(job, "Complete"):
        return Folded(
            "Succeeded",
            "Completed",
            cond.get("message") or "training finished",
            restarts,
            start,
            completion or cond.get("lastTransitionTime"),
            hours,
        )
    if cond := _job_condition(job, "Failed"):
        reason = cond.get("reason") or "Failed"
        said = _failure_message(pods)
        return Folded(
            "Failed",
            reason,
            said or cond.get("message") or "the Job failed",
            restarts,
            start,
            cond.get("lastTransitionTime"),
            hours,
        )
    if job.get("spec", {}).get("suspend") and observed.queue_name and not observed.suspend:
        # suspended by Kueue, not by the user: waiting for admission, or evicted after it
        if observed.ran_before and not observed.requeued:
            return Folded(
                "Suspended",
                "Preempted",
                f"preempted by Kueue (queue {observed.queue_name}): pods stopped; resumes from "
                "the newest checkpoint when Kueue admits it again",
                restarts,
                start,
                None,
                hours,
            )
        return Folded(
            "Queued",
            "WaitingForAdmission",
            f"waiting for Kueue to admit it (queue {observed.queue_name})",
            restarts,
            start,
            None,
            hours,
        )
    if observed.suspend or job.get("spec", {}).get("suspend"):
        return Folded(
            "Suspended",
            "Suspended",
            "suspended: pods stopped, resumes from the newest checkpoint",
            restarts,
            start,
            None,
            hours,
        )
    running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
    if running:
        if observed.trainer_step:
            return Folded(
                "Running",
                "Training",
                f"{len(running)} worker pod(s) running",
                restarts,
                start,
                None,
                hours,
            )
        return Folded(
            "Preparing",
            "PreparingData",
            "pods running; loading model and data",
            restarts,
            start,
            None,
            hours,
        )
    waiting = _waiting_reason(pods)
    return Folded("Pending", waiting[0], waiting[1], restarts, start, None, hours)


def _failure_message(pods: list[Obj]) -> str:
    """What a failed trainer said last (its termination message: one line naming the field)."""
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            ended = (cs.get("state") or {}).get("terminated") or {}
            if ended.get("exitCode") not in (None, 0) and ended.get("message"):
                return str(ended["message"]).strip().splitlines()[-1][:1000]
    return ""


def _waiting_reason(pods: list[Obj]) -> tuple[str, str]:
    for pod in pods:
        for cond in pod.get("status", {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return "Unschedulable", cond.get("message") or "waiting for a node"
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            waiting = cs.get("state", {}).get("waiting")
            if waiting:
                return waiting.get("reason") or "Waiting", waiting.get("message") or ""
    if not pods:
        return "WaitingForPods", "the Job has not created its pods yet"
    return "PodsPending", "waiting for the pods to start"


def first_pod_start(pods: list[Obj]) -> str | None:
    """When training started: the first worker pod taken by a node.

    Not the Job's own startTime, which only says when the Job controller first saw the Job; a
    Job can wait hours for GPUs after that.
    """
    starts = [t for p in pods if (t := parse_time(p.get("status", {}).get("startTime")))]
    return rfc3339(min(starts)) if starts else None


def gpu_hours(pods: list[Obj], gpus_per_pod: int, at: dt.datetime) -> float:
    """GPU-hours held by the pods: from each pod's start to its end (or now)."""
    total = 0.0
    for pod in pods:
        status = pod.get("status", {})
        start = parse_time(status.get("startTime"))
        if start is None:
            continue
        end = at
        for cs in status.get("containerStatuses") or []:
            finished = parse_time((cs.get("state", {}).get("terminated") or {}).get("finishedAt"))
            if finished is not None:
                end = min(end, finished)
        total += max(0.0, (end - start).total_seconds()) / 3600 * gpus_per_pod
    return round(total, 4)


def merge_conditions(
    existing: list[Obj], folded: Folded, generation: int | None, at: dt.datetime | None = None
) -> list[Obj]:
    """Standard conditions for the folded phase, keeping lastTransitionTime when unchanged."""
    at = at or now()
    by_type = {c.get("type"): c for c in existing}
    wanted = {
        "Running": folded.phase in ("Preparing", "Running"),
        "Suspended": folded.phase == "Suspended",
        "Succeeded": folded.phase == "Succeeded",
        "Failed": folded.phase == "Failed",
    }
    out = []
    for kind in CONDITION_TYPES:
        value = "True" if wanted[kind] else "False"
        old = by_type.get(kind)
        changed = old is None or old.get("status") != value
        out.append(
            {
                "type": kind,
                "status": value,
                "reason": folded.reason if wanted[kind] else f"Not{kind}",
                "message": folded.message if wanted[kind] else "",
                "lastTransitionTime": (
                    rfc3339(at) if changed or old is None else old["lastTransitionTime"]
                ),
                **({"observedGeneration": generation} if generation is not None else {}),
            }
        )
    # conditions other parties own (the trainer's, for instance) are kept as they are
    out += [c for c in existing if c.get("type") not in CONDITION_TYPES]
    return out


def has_started(current: Obj, pods: list[Obj]) -> bool:
    """Whether any pod of the resource ever started (from its status and its pods now)."""
    if current.get("startTime") or current.get("restarts") or current.get("gpuHours"):
        return True
    if (current.get("accounting") or {}).get("pods"):
        return True
    if current.get("phase") in ("Preparing", "Running"):
        return True
    if current.get("phase") == "Suspended" and _reason(current, "Suspended") == "Preempted":
        return True
    for pod in pods:
        pod_status = pod.get("status") or {}
        if pod_status.get("startTime") or pod_status.get("phase") in ("Running", *FINISHED):
            return True
    return False


def _reason(current: Obj, kind: str) -> str | None:
    for cond in current.get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            found: str | None = cond.get("reason")
            return found
    return None


def training_patch(
    current: Obj,
    generation: int | None,
    folded: Folded,
    price: float,
    accounting: Any = None,
) -> Obj:
    """The status fields the operator owns for a DiffusionTrainingJob, from a folded state.

    ``accounting`` (an ``accounting.Settled``) gives the ledger's GPU-hours and restarts, which
    never fall; without it they are the folded ones (summed over the pods that exist now).
    ``generation`` is the one the children reflect (None: not known yet, left as it was).
    """
    hours = accounting.gpu_hours if accounting is not None else folded.gpu_hours
    patch: Obj = {
        "phase": folded.phase,
        "restarts": accounting.restarts if accounting is not None else folded.restarts,
        "gpuHours": hours,
        "estimatedCost": round(hours * price, 2),
        "conditions": merge_conditions(list(current.get("conditions") or []), folded, generation),
    }
    if generation is not None:
        patch["observedGeneration"] = generation
    if accounting is not None:
        patch["accounting"] = accounting.ledger
        if accounting.last_restart_reason:
            patch["lastRestartReason"] = accounting.last_restart_reason
    if folded.start_time:
        patch["startTime"] = folded.start_time
    if folded.completion_time:
        patch["completionTime"] = folded.completion_time
    return patch


def _set_condition(
    conditions: list[Obj], kind: str, value: str, reason: str, message: str, at: dt.datetime | None
) -> list[Obj]:
    """``conditions`` with one condition set, keeping its transition time while its status holds."""
    old: Obj = next((c for c in conditions if c.get("type") == kind), {})
    cond = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old.get("lastTransitionTime")
        if old.get("status") == value and old.get("lastTransitionTime")
        else rfc3339(at or now()),
    }
    if old == cond:
        return conditions
    return [c for c in conditions if c.get("type") != kind] + [cond]


def with_spec_applied(
    conditions: list[Obj], pending: list[str] | None, at: dt.datetime | None = None
) -> list[Obj]:
    """``conditions`` with SpecApplied: False naming the fields that wait for the pods' next start.

    ``pending`` None: no Job yet, the condition is left as it is.
    """
    if pending is None:
        return conditions
    if not pending:
        return _set_condition(conditions, "SpecApplied", "True", "Applied", "", at)
    message = (
        f"{', '.join(pending)} take effect at the next start of the pods (a running Job's pods "
        "cannot change): suspend the job and resume it, or they apply when it is next "
        "suspended (by Kueue too) and started again; training resumes from the newest checkpoint"
    )
    return _set_condition(conditions, "SpecApplied", "False", "WaitingForNextStart", message, at)


def with_queued(
    conditions: list[Obj], folded: Folded, queue_name: str | None, at: dt.datetime | None = None
) -> list[Obj]:
    """``conditions`` with Queued: True while Kueue holds the Job (waiting, or preempted)."""
    if not queue_name:
        return [c for c in conditions if c.get("type") != "Queued"]
    if folded.phase == "Queued" or folded.reason == "Preempted":
        return _set_condition(conditions, "Queued", "True", folded.reason, folded.message, at)
    if folded.phase == "Suspended":  # the user's: Kueue does not admit it until resumed
        return _set_condition(conditions, "Queued", "False", "Suspended", folded.message, at)
    return _set_condition(conditions, "Queued", "False", "Admitted", "", at)


def requeued(current: Obj) -> bool:
    """Whether a job Kueue holds now was last held by the user (suspended) or already queued:
    it waits for admission again, it was not preempted."""
    if current.get("phase") == "Queued":
        return True
    return current.get("phase") == "Suspended" and _reason(current, "Suspended") == "Suspended"


def termination_message(pods: list[Obj]) -> str | None:
    """The first termination message of the pods' containers (a merge's JSON report)."""
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            message = (cs.get("state", {}).get("terminated") or {}).get("message")
            if message:
                found: str = message
                return found
    return None


MERGE_REPORT_FIELDS = (
    "outputUri",
    "sha256",
    "shortHash",
    "sizeBytes",
    "tensors",
    "durationSeconds",
)


def merge_patch(
    current: Obj, generation: int | None, job: Obj | None, pods: list[Obj]
) -> tuple[Obj, Folded]:
    """The status fields the operator owns for a ModelMerge, and the folded state they show.

    A merge is never suspended and has no trainer step: it runs, then reports its result (URI,
    hashes, size) in its container's termination message.
    """
    folded = fold(Observed(job, pods, False, trainer_step=1, gpus_per_pod=0))
    phase = {"Preparing": "Running", "Suspended": "Pending"}.get(folded.phase, folded.phase)
    message = termination_message(pods)
    detail = message if phase == "Failed" and message else folded.message
    folded = replace(folded, phase=phase, message=detail, gpu_hours=0.0)
    patch: Obj = {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": with_ready(
            merge_conditions(list(current.get("conditions") or []), folded, generation),
            job is not None,
        ),
    }
    if folded.start_time:
        patch["startTime"] = folded.start_time
    if folded.completion_time:
        patch["completionTime"] = folded.completion_time
    if phase == "Succeeded" and message:
        try:
            report = json.loads(message)
        except json.JSONDecodeError:
            report = {}
        if isinstance(report, dict):
            patch.update({f: report[f] for f in MERGE_REPORT_FIELDS if f in report})
    return patch, folded


def with_waiting(
    conditions: list[Obj], reason: str, message: str, at: dt.datetime | None = None
) -> list[Obj]:
    """``conditions`` with Ready=False for ``reason`` (a missing Secret, a namesake's children)."""
    waiting = {
        "type": "Ready",
        "status": "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": rfc3339(at or now()),
    }
    return [c for c in conditions if c.get("type") != "Ready"] + [waiting]


def with_schedulable(
    conditions: list[Obj], problem: str | None, at: dt.datetime | None = None
) -> tuple[list[Obj], bool]:
    """``conditions`` with the Schedulable condition set from a capacity ``problem`` (None: fits).

    Also says whether the condition has just turned False (the moment to post a Warning).
    """
    old: Obj = next((c for c in conditions if c.get("type") == "Schedulable"), {})
    value = "False" if problem else "True"
    updated = [c for c in conditions if c.get("type") != "Schedulable"]
    updated.append(
        {
            "type": "Schedulable",
            "status": value,
            "reason": "InsufficientGPUs" if problem else "CapacityAvailable",
            "message": problem or "",
            "lastTransitionTime": old.get("lastTransitionTime")
            if old.get("status") == value
            else rfc3339(at or now()),
        }
    )
    return updated, bool(problem) and old.get("status") != "False"


def changes(current: Obj, patch: Obj) -> Obj:
    """The part of ``patch`` that differs from ``current`` (empty: nothing to write)."""
    return {k: v for k, v in patch.items() if current.get(k) != v}


def with_ready(conditions: list[Obj], job_exists: bool, at: dt.datetime | None = None) -> list[Obj]:
    """Ready=True once the children exist, replacing a waiting Ready=False (SecretMissing, ...).

    Before the Job exists the condition is left as the reconcile handler set it.
    """
    if not job_exists:
        return conditions
    old: Obj = next((c for c in conditions if c.get("type") == "Ready"), {})
    if old.get("status") == "True":
        return conditions
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "ChildrenCreated",
        "message": "",
        "lastTransitionTime": rfc3339(at or now()),
    }
    return [c for c in conditions if c.get("type") != "Ready"] + [ready]
