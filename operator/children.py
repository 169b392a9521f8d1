"""Creating a resource's children, idempotently, in waves, and bringing them to its edits.

Children that others depend on go first: pods need their ServiceAccount and ConfigMap when the Job
controller creates them, a RoleBinding names its Role. The Job is always created last, so an
existing Job means every other child was created. Each wave is created in parallel.

An edit reaches an existing Job at once where Kubernetes lets the field change (``edits``); the
rest waits for the next start of the pods, which the operator makes by replacing the Job (and
rewriting the ConfigMap) as soon as that loses nothing: before any pod started, or once the Job
is suspended (by the user, or by Kueue) and its pods are gone. The Job keeps its name, so its
pods keep their rendezvous address and the trainer its output prefix and checkpoints: training
resumes from the newest checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable

import kopf
from kubernetes.client.exceptions import ApiException

from difftrain_operator import builders, edits, kube, kueue
from difftrain_operator.kube import Kube, Obj
from difftrain_operator.status_writer import StatusWriter
from difftrain_operator.views import Views

logger = logging.getLogger(__name__)
WAVES = (("RoleBinding",), ("Job",))
REPLACE_WAIT_SECONDS = 30.0


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
        self.workloads = kueue.Workloads(kube)

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
            # a Job in a Kueue queue: its suspend is Kueue's
            kueues = obj["kind"] == "Job" and edits.kueue_managed(existing)
            if (
                obj["kind"] == "Job"
                and not kueues
                and bool(existing["spec"].get("suspend")) != bool(suspend)
            ):
                patch = {"spec": {"suspend": suspend}}
                self.kube.patch("Job", meta["namespace"], meta["name"], patch)
            if obj["kind"] == "ConfigMap" and existing.get("data") != obj.get("data"):
                # the spec changed before the Job (re)started: its pods read the new one
                self.kube.patch("ConfigMap", meta["namespace"], meta["name"], {"data": obj["data"]})

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

    async def ensure_training(
        self,
        views: Views,
        writer: StatusWriter,
        body: Obj,
        children: builders.TrainingChildren,
        *,
        suspend: bool,
        started: bool,
        retry: int = 0,
    ) -> None:
        """A training job's children, brought to its spec (see the module's docstring).

        ``suspend`` is the resource's own; ``started`` whether any of its pods ever started;
        ``retry`` how many times this was tried before (a retry's delay grows with it).
        """
        # while the user holds it suspended, a new Job is not handed to Kueue (``edits.to_create``)
        created = dataclasses.replace(children, job=edits.to_create(children.job, suspend))
        job = children.job
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        existing = Views.one(views.child_jobs, (namespace, name))
        if existing is None:
            await self.ensure_or_wait(views, writer, body, created.all())
            return
        try:
            check_owner(existing, job)
        except ForeignChildError as exc:
            await asyncio.to_thread(writer.wait, body, "PreviousChildrenTerminating", str(exc))
            raise kopf.TemporaryError(str(exc), delay=5) from None
        if existing["metadata"].get("deletionTimestamp"):
            raise kopf.TemporaryError(f"Job {name} is being deleted; made anew once gone", delay=3)
        pending = edits.next_start_fields(existing, job)
        pods = [p for p in views.child_pods.get(("dtj", namespace, body["metadata"]["name"]), ())]
        if pending and (not started or edits.stopped(existing, pods)):
            logger.info("replacing Job %s/%s for %s", namespace, name, ", ".join(pending))
            await asyncio.to_thread(self.remove_job, existing)
            await self.apply_all(created.all())
            return
        outcome = None
        if edits.kueue_managed(existing) and (suspend or existing["spec"].get("suspend")):
            # the user's suspend and resume reach Kueue through the Job's Workload
            outcome = await asyncio.to_thread(self.workloads.sync, existing, suspend)
        by_workload = outcome is kueue.Outcome.SET
        patch = edits.live_patch(existing, job, suspend, pending, suspended_by_workload=by_workload)
        if patch:
            await asyncio.to_thread(self.kube.patch, "Job", namespace, name, patch)
        if suspend and outcome is kueue.Outcome.NOT_YET:
            # suspended just after its queue label came: Kueue, making its Workload now, would
            # admit it; that Workload is deactivated on a retry
            delay = min(2.0 * 2**retry, 60.0)
            raise kopf.TemporaryError(f"Job {name} has no Kueue Workload yet", delay=delay)

    def remove_job(self, job: Obj) -> None:
        """Delete a Job of ours that is to be made anew, and wait until its name is free."""
        meta = job["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        finalizers = list(meta.get("finalizers") or [])
        if builders.RESULT_FINALIZER in finalizers:
            # it has no result to record: it is replaced, not finished
            path = f"/metadata/finalizers/{finalizers.index(builders.RESULT_FINALIZER)}"
            patch = [
                {"op": "test", "path": path, "value": builders.RESULT_FINALIZER},
                {"op": "remove", "path": path},
            ]
            try:
                self.kube.patch("Job", namespace, name, patch, kube.JSON_PATCH)
            except ApiException as exc:
                if exc.status not in (404, 422):
                    raise
        options = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
        try:
            self.kube.delete("Job", namespace, name, options)
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone, or already another Job
                raise
        deadline = time.monotonic() + REPLACE_WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                current = self.kube.get("Job", namespace, name)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            if current["metadata"].get("uid") != uid:
                return
            time.sleep(0.2)
        raise kopf.TemporaryError(f"Job {name} is still being deleted", delay=3)
