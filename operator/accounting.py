"""Pure: the ledger behind ``gpuHours`` and ``restarts``, so that both only ever grow.

Pods come and go (replaced after a failure, preempted, deleted with a suspended or recreated Job),
so GPU-hours summed over the pods that exist now would fall. The ledger, kept in the status, holds
every worker pod the operator has seen start and not yet settled: its GPUs, start and end. A pod
that ends other than by succeeding is one restart, with its reason. A pod that is gone is settled:
its GPU-hours move to ``closedGpuHours`` and it leaves the ledger. A pod that vanished unseen (the
operator was not watching) is settled at the ledger's last observation: nothing is invented.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

from difftrain_operator.status import Obj, parse_time, rfc3339

TERMINAL = ("Succeeded", "Failed")
# DisruptionTarget reasons (core/v1) -> restart reasons
DISRUPTIONS = MappingProxyType(
    {
        "PreemptionByScheduler": "Preempted",
        "PreemptionByKubeScheduler": "Preempted",
        "EvictionByEvictionAPI": "Evicted",
        "TerminationByKubelet": "Evicted",
        "DeletionByTaintManager": "NodeLost",
        "DeletionByPodGC": "NodeLost",
    }
)
EXIT_INTERRUPTED = 75  # the trainer checkpointed and asked to be restarted (api.EXIT_INTERRUPTED)


@dataclass(frozen=True)
class Settled:
    """The accounting fields of a status: the ledger and what it adds up to."""

    ledger: Obj
    gpu_hours: float
    restarts: int
    last_restart_reason: str | None


def pod_gpus(pod: Obj, resource_name: str) -> int:
    """GPUs a pod's containers hold (their limits of ``resource_name``)."""
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        try:
            total += int(limits.get(resource_name, 0))
        except (TypeError, ValueError):
            continue
    return total


def _terminated(pod: Obj) -> list[Obj]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return [t for cs in statuses if (t := (cs.get("state") or {}).get("terminated"))]


def pod_end(pod: Obj) -> dt.datetime | None:
    """When a pod's containers ended (the earliest finish), if they did."""
    ends = [t for term in _terminated(pod) if (t := parse_time(term.get("finishedAt")))]
    return min(ends) if ends else None


def restart_reason(pod: Obj, stopped_by: str | None = None) -> str:
    """Why a worker pod that did not succeed ended.

    ``stopped_by`` ("Suspended" or "Preempted") says why its Job was stopped, for a pod deleted
    without a reason of its own.
    """
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return DISRUPTIONS.get(cond.get("reason") or "", "Preempted")
    if status.get("reason") == "Evicted":
        return "Evicted"
    if status.get("reason") == "NodeLost":
        return "NodeLost"
    codes = {term.get("exitCode") for term in _terminated(pod)}
    if EXIT_INTERRUPTED in codes:
        return "Interrupted"
    if status.get("phase") == "Failed":
        return "Failed"
    return stopped_by or "Failed"


def _hours(entry: Obj, at: dt.datetime) -> float:
    start = parse_time(entry.get("startTime"))
    if start is None:
        return 0.0
    end = parse_time(entry.get("endTime")) or at
    return max(0.0, (end - start).total_seconds()) / 3600 * int(entry.get("gpus") or 0)


def settle(
    status: Obj,
    pods: list[Obj],
    at: dt.datetime,
    *,
    gpu_resource_name: str,
    departed: Sequence[Obj] = (),
    stopped_by: str | None = None,
) -> Settled:
    """The ledger brought up to ``at`` from the pods that exist and those just deleted.

    ``status`` is the resource's current status (its ``accounting``, ``restarts``, reason);
    ``departed`` are the last states of pods deleted since (from their watch events);
    ``stopped_by`` why the Job was stopped, if it was (see ``restart_reason``).
    """
    previous = status.get("accounting") or {}
    observed = parse_time(previous.get("observedAt"))
    at = max(at, observed) if observed else at
    closed = float(previous.get("closedGpuHours") or 0.0)
    restarts = int(status.get("restarts") or 0)
    reason = status.get("lastRestartReason")
    ledger = {e["uid"]: dict(e) for e in previous.get("pods") or [] if e.get("uid")}
    known = set(ledger)  # counted up to ``observed`` already: their hours may not fall
    seen = {p["metadata"]["uid"]: p for p in pods if p.get("metadata", {}).get("uid")}
    last = {p["metadata"]["uid"]: p for p in departed if p.get("metadata", {}).get("uid")}

    def end_of(entry: Obj, pod: Obj, fallback: dt.datetime) -> None:
        nonlocal restarts, reason
        end = pod_end(pod) or fallback
        if observed and entry["uid"] in known:
            end = max(end, observed)
        start = parse_time(entry["startTime"])
        entry["endTime"] = rfc3339(max(end, start) if start else end)
        if (pod.get("status") or {}).get("phase") != "Succeeded":
            restarts += 1
            reason = restart_reason(pod, stopped_by)

    for uid, pod in seen.items():
        pod_status = pod.get("status") or {}
        entry = ledger.get(uid)
        if entry is None:
            start = parse_time(pod_status.get("startTime"))
            if start is None:
                continue  # never started: held no GPU, is no restart
            entry = {
                "uid": uid,
                "gpus": pod_gpus(pod, gpu_resource_name),
                "startTime": rfc3339(start),
            }
            ledger[uid] = entry
        if entry.get("endTime") is None and pod_status.get("phase") in TERMINAL:
            end_of(entry, pod, at)

    for uid in [u for u in ledger if u not in seen]:
        entry = ledger.pop(uid)
        if entry.get("endTime") is None:
            # deleted while it ran: settled when its deletion was seen, else at the last look
            end_of(entry, last.get(uid, {}), at if uid in last else (observed or at))
        closed += _hours(entry, at)

    gpu_hours = closed + sum(_hours(e, at) for e in ledger.values())
    book: Obj = {
        "closedGpuHours": round(closed, 6),
        "pods": sorted(ledger.values(), key=lambda e: (e["startTime"], e["uid"])),
    }
    running = any(e.get("endTime") is None for e in ledger.values())
    unchanged = {k: previous.get(k, 0.0 if k == "closedGpuHours" else []) for k in book} == book
    if running or not unchanged or observed is None:
        book["observedAt"] = rfc3339(at)
    else:  # nothing moved: the ledger (and so the status) stays as it is
        book["observedAt"] = previous["observedAt"]
    return Settled(book, round(gpu_hours, 4), restarts, reason)
