"""Writing the status the operator owns (phase, conditions, accounting), and remembering it.

The watch may not have delivered the operator's last write when the next refresh runs: the values
remembered here are newer than the index's then. Nobody else writes these fields (the trainer
writes its progress, the user the spec), so the overlay is never older than the index. Empty after
a restart, when the index, listed afresh, is current.
"""

from __future__ import annotations

import asyncio

import kopf
from kubernetes.client.exceptions import ApiException

from difftrain import api
from difftrain_operator import metrics, status
from difftrain_operator.checks import Capacity
from difftrain_operator.kube import Kube, Obj
from difftrain_operator.views import Key, key_of

PLURAL = "diffusiontrainingjobs"
DEPARTED_KEPT = 4096
MERGE_PLURAL = "modelmerges"


def plural_of(body: Obj) -> str:
    return PLURAL if body.get("kind") == "DiffusionTrainingJob" else MERGE_PLURAL


class StatusWriter:
    """Status patches of one operator, with its last writes overlaid on the index's status."""

    def __init__(self, kube: Kube, phases: metrics.PhaseTracker) -> None:
        self.kube = kube
        self.phases = phases
        self._written: dict[Key, tuple[str, Obj]] = {}  # key -> (uid, fields)
        self._locks: dict[Key, asyncio.Lock] = {}
        # GPU capacity found by the reconcile handler, for the next status write
        self.capacity: dict[tuple[str, str], Capacity] = {}
        # the last states of deleted pods, for the next refresh's accounting
        self.departed: dict[Key, list[Obj]] = {}

    def pod_deleted(self, key: Key, pod: Obj) -> None:
        """Keep a deleted pod's last state until the next refresh settles it."""
        self.departed.setdefault(key, []).append(pod)
        del self.departed[key][:-DEPARTED_KEPT]

    def take_departed(self, key: Key) -> list[Obj]:
        return self.departed.pop(key, [])

    def owned(self, body: Obj) -> Obj:
        """The status, with the operator's own fields as it last wrote them."""
        current = dict(body.get("status") or {})
        uid, fields = self._written.get(key_of(body), ("", {}))
        if uid == body["metadata"]["uid"]:  # not a deleted namesake's
            current.update(fields)
        return current

    def remember(self, body: Obj, patch: Obj) -> None:
        """Record ``patch`` as the operator's newest write of ``body``'s status."""
        key, uid = key_of(body), body["metadata"]["uid"]
        old_uid, fields = self._written.get(key, ("", {}))
        if old_uid != uid:
            fields = {}
        self._written[key] = (uid, {**fields, **patch})

    def lock(self, key: Key) -> asyncio.Lock:
        """One refresh of a resource at a time (only ever used on the event loop)."""
        return self._locks.setdefault(key, asyncio.Lock())

    def forget(self, key: Key, kind: str) -> None:
        """Drop what is kept for a deleted resource."""
        self._locks.pop(key, None)
        self._locks.pop(("children", key[1], key[2]), None)
        self._written.pop(key, None)
        self.departed.pop(key, None)
        self.capacity.pop((key[1], key[2]), None)
        self.phases.record(kind, key[1], key[2], None)

    def write(self, body: Obj, patch: Obj) -> None:
        """Patch the status subresource and remember what the operator wrote (blocking)."""
        meta = body["metadata"]
        try:
            self.kube.patch_status(
                api.GROUP, api.VERSION, meta["namespace"], plural_of(body), meta["name"], patch
            )
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile; its children go with it
            raise
        self.remember(body, patch)

    def fail(self, body: Obj, reason: str, message: str) -> None:
        """Failed for good, with an Event (blocking)."""
        kopf.event(body, type="Warning", reason=reason, message=message[:1024])
        folded = status.Folded("Failed", reason, message, 0, None, None, 0.0)
        current = self.owned(body)
        generation = body["metadata"].get("generation")
        conditions = status.merge_conditions(
            list(current.get("conditions") or []), folded, generation
        )
        self.write(body, {"phase": "Failed", "conditions": conditions})

    def wait(self, body: Obj, reason: str, message: str) -> None:
        """Pending with Ready=False and the reason, with an Event (blocking)."""
        kopf.event(body, type="Warning", reason=reason, message=message[:1024])
        current = self.owned(body)
        conditions = status.with_waiting(list(current.get("conditions") or []), reason, message)
        self.write(body, {"phase": "Pending", "conditions": conditions})
