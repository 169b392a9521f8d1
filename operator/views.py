"""What the operator knows of the cluster: Kopf indexes, fed by its own watch streams.

Status refreshes read the resource, its Job and its pods from these instead of the API server, so
a refresh costs one PATCH (or nothing when nothing changed). Kopf fills every index before it runs
any other handler, after a restart as well, and updates it before the handlers of the same event
run. The indexes are only ever read on the event loop: Kopf writes them there.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import kopf

from difftrain_operator import builders
from difftrain_operator.kube import Obj

MANAGED = MappingProxyType({"app.kubernetes.io/managed-by": builders.MANAGED_BY})
# (kind, namespace, name): kind "dtj" or "merge"
Key = tuple[str, str, str]


def plain(body: kopf.Body | Obj) -> Obj:
    """The object as a plain dict (what an index keeps and a pure function reads)."""
    return {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}


def key_of(body: Obj) -> Key:
    """The key of a resource's status and refreshes."""
    kind = "dtj" if body.get("kind") == "DiffusionTrainingJob" else "merge"
    return kind, body["metadata"]["namespace"], body["metadata"]["name"]


def owner_key(namespace: str, labels: dict[str, str] | None) -> Key | None:
    """The key of the resource a labelled child belongs to (None: not a child)."""
    labels = labels or {}
    if owner := labels.get(builders.JOB_LABEL):
        return "dtj", namespace, owner
    if owner := labels.get(builders.MERGE_LABEL):
        return "merge", namespace, owner
    return None


def owned_by(obj: Obj, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


@dataclass(frozen=True)
class Views:
    """The live indexes, as Kopf passes them to every handler."""

    training_jobs: kopf.Index[tuple[str, str], Obj]
    model_merges: kopf.Index[tuple[str, str], Obj]
    child_jobs: kopf.Index[tuple[str, str], Obj]
    child_pods: kopf.Index[Key, Obj]

    @classmethod
    def of(cls, kwargs: dict[str, Any]) -> Views:
        return cls(
            kwargs["training_jobs"],
            kwargs["model_merges"],
            kwargs["child_jobs"],
            kwargs["child_pods"],
        )

    @staticmethod
    def one(index: kopf.Index[Any, Obj], key: Any) -> Obj | None:
        for value in index.get(key, ()):
            found: Obj = value
            return found
        return None

    def own_children(self, body: Obj, key: Key, job_name: str) -> tuple[Obj | None, list[Obj]]:
        """The resource's Job and its pods; a deleted namesake's leftovers are not its own."""
        job = Views.one(self.child_jobs, (key[1], job_name))
        if job is None or not owned_by(job, body["metadata"]["uid"]):
            return None, []
        pods = [p for p in self.child_pods.get(key, ()) if owned_by(p, job["metadata"]["uid"])]
        return job, pods
