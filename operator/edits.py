"""Pure: what an edit of a training job's spec does to its existing child Job.

Some fields reach a running Job at once (Kubernetes lets them change): ``suspend``,
``backoffLimit``, ``activeDeadlineSeconds``, ``ttlSecondsAfterFinished`` and ``queueName`` (the
Kueue label; with a queue, ``suspend`` reaches Kueue through the Job's Workload, see ``kueue``).
Every other field shapes the pods (their template is immutable) or the trainer's
ConfigMap (read when a pod starts): those take effect at the next start. The child Job carries
the spec it was built from and the generation it reflects in annotations, so the operator, after
a restart too, knows which fields still wait for that start.
"""

from __future__ import annotations

import json
from typing import Any

from difftrain import api

Obj = dict[str, Any]

SPEC_ANNOTATION = f"{api.GROUP}/spec"
GENERATION_ANNOTATION = f"{api.GROUP}/generation"
PENDING_ANNOTATION = f"{api.GROUP}/pending"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# spec fields applied to an existing Job at once (the Job fields they set are mutable)
LIVE_FIELDS = (
    "suspend",
    "backoffLimit",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
    "queueName",
)
# the Job spec fields they set (suspend is handled on its own: Kueue may own it)
LIVE_JOB_FIELDS = ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished")


def spec_annotation(spec: Obj) -> str:
    """The spec a Job is built from, as its annotation (compact, stable key order)."""
    return json.dumps(spec, separators=(",", ":"), sort_keys=True)


def changed_fields(old: Any, new: Any, prefix: str = "", depth: int = 2) -> list[str]:
    """The dotted paths (at most ``depth`` levels) where ``old`` and ``new`` differ."""
    if old == new:
        return []
    if depth == 0 or not isinstance(old, dict) or not isinstance(new, dict):
        return [prefix] if prefix else ["spec"]
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}.{key}" if prefix else key
        out += changed_fields(old.get(key), new.get(key), path, depth - 1)
    return out


def _annotations(job: Obj) -> dict[str, str]:
    return dict((job.get("metadata") or {}).get("annotations") or {})


def applied_spec(job: Obj) -> Obj | None:
    """The spec an existing Job was built from (None: made by an operator that did not say)."""
    raw = _annotations(job).get(SPEC_ANNOTATION)
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return spec if isinstance(spec, dict) else None


def applied_generation(job: Obj) -> int | None:
    """The resource generation the Job's pods and settings reflect."""
    raw = _annotations(job).get(GENERATION_ANNOTATION)
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def pending_on(job: Obj) -> list[str]:
    """The fields an existing Job says wait for its next start."""
    raw = _annotations(job).get(PENDING_ANNOTATION) or ""
    return [f for f in raw.split(",") if f]


def next_start_fields(existing: Obj, desired: Obj) -> list[str]:
    """The changed fields that only a new Job (the next start of the pods) can apply."""
    old, new = applied_spec(existing), applied_spec(desired)
    if old is None or new is None:
        return []  # nothing to compare with: taken as applied
    return [f for f in changed_fields(old, new) if f.split(".")[0] not in LIVE_FIELDS]


def kueue_managed(job: Obj) -> bool:
    """Whether Kueue decides when the Job runs (it carries a queue label)."""
    return bool(((job.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL))


def stopped(job: Obj, pods: list[Obj]) -> bool:
    """A suspended Job none of whose pods still runs: a new one loses nothing."""
    if not (job.get("spec") or {}).get("suspend"):
        return False
    if (job.get("status") or {}).get("active"):
        return False
    return all((p.get("status") or {}).get("phase") in ("Succeeded", "Failed") for p in pods)


def to_create(job: Obj, suspend: bool) -> Obj:
    """The Job as it is created: while the user has the job suspended it is not handed to Kueue
    (no queue label: Kueue makes no Workload for it and holds no quota); resuming adds the label
    (``live_patch``), and Kueue admits it from then on."""
    labels = (job.get("metadata") or {}).get("labels") or {}
    if not suspend or KUEUE_QUEUE_LABEL not in labels:
        return job
    kept = {k: v for k, v in labels.items() if k != KUEUE_QUEUE_LABEL}
    return {**job, "metadata": {**job["metadata"], "labels": kept}}


def live_patch(
    existing: Obj,
    desired: Obj,
    suspend: bool,
    pending: list[str],
    suspended_by_workload: bool = False,
) -> Obj | None:
    """The merge patch that brings an existing Job's mutable fields to the desired ones.

    ``suspend`` is the resource's: with a Kueue queue the operator never un-suspends the Job
    (Kueue admits and resumes it), and suspends it only where no Workload does that
    (``suspended_by_workload``: the Job's Workload is deactivated instead, see ``kueue``; Kueue
    would un-suspend an admitted Job at once); without a queue, the Job's suspend follows it both
    ways. A Job the user holds suspended that Kueue never had gets its queue label when resumed.
    The Job's annotations say which generation it now reflects (the desired one unless fields
    wait for the next start) and which fields wait. None when nothing differs.
    """
    have, want = existing.get("spec") or {}, desired.get("spec") or {}
    spec: Obj = {k: want.get(k) for k in LIVE_JOB_FIELDS if have.get(k) != want.get(k)}
    if kueue_managed(desired):
        if suspend and not have.get("suspend") and not suspended_by_workload:
            spec["suspend"] = True
    elif bool(have.get("suspend")) != suspend:
        spec["suspend"] = suspend
    meta: Obj = {}
    have_queue = ((existing.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    want_queue = ((desired.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    if suspend and have_queue is None:
        want_queue = None  # held back from Kueue until resumed (``to_create``)
    if have_queue != want_queue:
        meta["labels"] = {KUEUE_QUEUE_LABEL: want_queue}
    annotations: Obj = {}
    if not pending:
        generation = _annotations(desired).get(GENERATION_ANNOTATION)
        if generation and _annotations(existing).get(GENERATION_ANNOTATION) != generation:
            annotations[GENERATION_ANNOTATION] = generation
    wanted_pending = ",".join(pending) or None
    if _annotations(existing).get(PENDING_ANNOTATION) != wanted_pending:
        annotations[PENDING_ANNOTATION] = wanted_pending
    if annotations:
        meta["annotations"] = annotations
    patch: Obj = {}
    if spec:
        patch["spec"] = spec
    if meta:
        patch["metadata"] = meta
    return patch or None
