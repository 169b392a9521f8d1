"""Creating a resource's children, idempotently, in waves.

Children that others depend on go first: pods need their ServiceAccount and ConfigMap when the Job
controller creates them, a RoleBinding names its Role. The Job is always created last, so an
existing Job means every other child was created. Each wave is created in parallel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import kopf
from kubernetes.client.exceptions import ApiException

from difftrain_operator.kube import Kube, Obj
from difftrain_operator.status_writer import StatusWriter
from difftrain_operator.views import Views

WAVES = (("RoleBinding",), ("Job",))


class ForeignChildError(Exception):
    """A child's name is taken by an object another resource (a deleted namesake) still owns."""


def check_owner(existing: Obj, desired: Obj) -> None:
    """Raise ForeignChildError unless ``existing`` belongs to the same resource as ``desired``."""
    want = {ref["uid"] for ref in desired["metadata"].get("ownerReferences") or []}
    have = {ref.get("uid") for ref in existing.get("metadata", {}).get("ownerReferences") or []}
    if not want & have:
        meta = desired["metadata"]
        raise ForeignChildError(
            f"{desired['kind']} {meta['name']} still belongs to an earlier resource of this name "
            "(deleted, its children not yet); the children are created once it is gone"
        )


def waves(objects: Iterable[Obj]) -> list[list[Obj]]:
    """The objects in creation order: everything else, then RoleBindings, then the Job."""
    objects = list(objects)
    later = {kind for wave in WAVES for kind in wave}
    out = [[o for o in objects if o["kind"] not in later]]
    out += [[o for o in objects if o["kind"] in wave] for wave in WAVES]
    return out


class ChildCreator:
    """Creates children through one API client; existing ones of the same resource are kept."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def apply(self, obj: Obj) -> None:
        """Create a child; if it exists and is ours, leave it (Jobs' templates are immutable) but
        sync a Job's suspend; if a deleted namesake still owns it, raise ForeignChildError."""
        try:
            self.kube.create(obj)
        except ApiException as exc:
            if exc.status != 409:
                raise
            meta = obj["metadata"]
            existing = self.kube.get(obj["kind"], meta["namespace"], meta["name"])
            check_owner(existing, obj)
            suspend = (obj.get("spec") or {}).get("suspend")
            if obj["kind"] == "Job" and bool(existing["spec"].get("suspend")) != bool(suspend):
                patch = {"spec": {"suspend": suspend}}
                self.kube.patch("Job", meta["namespace"], meta["name"], patch)

    async def apply_all(self, objects: Iterable[Obj]) -> None:
        for wave in waves(objects):
            await asyncio.gather(*(asyncio.to_thread(self.apply, obj) for obj in wave))

    async def ensure(self, views: Views, objects: list[Obj]) -> None:
        """Create the children, unless their Job exists already: then only its suspend is synced.

        After a restart every resource is resumed; with its Job in the index that costs no API
        call.
        """
        job = next(o for o in objects if o["kind"] == "Job")
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        existing = Views.one(views.child_jobs, (namespace, name))
        if existing is None:
            await self.apply_all(objects)
            return
        check_owner(existing, job)
        suspend = bool(job["spec"].get("suspend"))
        if bool((existing.get("spec") or {}).get("suspend")) != suspend:
            patch = {"spec": {"suspend": suspend}}
            await asyncio.to_thread(self.kube.patch, "Job", namespace, name, patch)

    async def ensure_or_wait(
        self, views: Views, writer: StatusWriter, body: Obj, objects: list[Obj]
    ) -> None:
        """The children, or a waiting condition and a retry while a namesake's are deleted."""
        try:
            await self.ensure(views, objects)
        except ForeignChildError as exc:
            await asyncio.to_thread(writer.wait, body, "PreviousChildrenTerminating", str(exc))
            raise kopf.TemporaryError(str(exc), delay=5) from None
