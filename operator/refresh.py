"""Folding children into the status: one refresh per resource, coalesced, from the indexes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import kopf
from kubernetes.client.exceptions import ApiException

from difftrain import api
from difftrain_operator import accounting, builders, edits, metrics, status
from difftrain_operator.status_writer import StatusWriter
from difftrain_operator.views import Key, Views

logger = logging.getLogger(__name__)

# Status writes wait this long, so that what happens meanwhile (the Job controller starting the
# Job and creating pods, several pod updates) lands in one PATCH: each write of a custom resource
# costs the API server a full decode, validation (CEL included) and encode.
COALESCE_SECONDS = 0.5
MAX_DEFER_SECONDS = 10.0


class StatusRefresher:
    """Refreshes the status of the operator's resources, now or coalesced a moment later."""

    def __init__(
        self,
        writer: StatusWriter,
        settings: builders.OperatorSettings,
        phases: metrics.PhaseTracker,
    ) -> None:
        self.writer = writer
        self.settings = settings
        self.phases = phases
        self._scheduled: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._creating: set[Key] = set()  # reconciles creating children right now

    @contextlib.contextmanager
    def creating(self, key: Key) -> Iterator[None]:
        """Mark a reconcile as creating children: refreshes yield to it for a while."""
        self._creating.add(key)
        try:
            yield
        finally:
            self._creating.discard(key)

    async def now(self, views: Views, key: Key) -> None:
        """Refresh ``key``'s status at once."""
        if key[0] == "dtj":
            await self.training(views, key[1], key[2])
        else:
            await self.merge(views, key[1], key[2])

    def schedule(self, views: Views, key: Key) -> None:
        """Refresh ``key``'s status in COALESCE_SECONDS; requests until then share that refresh."""
        if key in self._scheduled:
            return  # a refresh is already due; it will read the newest state

        async def later() -> None:
            await asyncio.sleep(COALESCE_SECONDS)
            # status writes yield to child creation: during a burst of new resources the API
            # server's time goes to the Jobs first, and the writes that wait merge with later ones
            loop = asyncio.get_running_loop()
            deadline = loop.time() + MAX_DEFER_SECONDS
            while self._creating and loop.time() < deadline:
                await asyncio.sleep(COALESCE_SECONDS)
            self._scheduled.discard(key)  # requests from now on schedule a new refresh
            try:
                await self.now(views, key)
            except ApiException as exc:
                logger.warning("status refresh of %s/%s failed: %s", key[1], key[2], exc.reason)

        self._scheduled.add(key)
        task = asyncio.create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def training(self, views: Views, namespace: str, name: str) -> None:
        """Fold a training job's Job and pods (from the indexes) into its status."""
        key = ("dtj", namespace, name)
        writer = self.writer
        async with writer.lock(key):
            capacity = writer.capacity.get((namespace, name), False)
            body = Views.one(views.training_jobs, (namespace, name))
            if body is None:
                writer.forget(key, "DiffusionTrainingJob")
                return  # deleted; its children go with it (owner references)
            current = writer.owned(body)
            job, pods = views.own_children(body, key, builders.child_name(name, limit=52))
            if job is None and current.get("phase") in status.FINISHED:
                return  # the Job was deleted after finishing (its TTL): keep the result
            if job is None and current.get("phase") not in (None, "Pending"):
                return  # its Job is being made anew (an edit for the next start): no news yet
            try:
                resource = api.parse_resource(body)
            except api.SpecError:
                return  # the reconcile handler has failed it with the reason
            assert isinstance(resource, api.DiffusionTrainingJob)
            spec = resource.spec
            queue = spec.queue_name if job is not None and edits.kueue_managed(job) else None
            folded = status.fold(
                status.Observed(
                    job=job,
                    pods=pods,
                    suspend=spec.suspend,
                    trainer_step=current.get("step"),
                    gpus_per_pod=spec.resources.gpus_per_worker,
                    queue_name=queue,
                    ran_before=status.has_started(current, pods),
                    requeued=status.requeued(current),
                )
            )
            stopped_by = None
            if spec.suspend:
                stopped_by = "Suspended"
            elif job is not None and (job.get("spec") or {}).get("suspend"):
                stopped_by = "Preempted" if queue else "Suspended"
            settled = accounting.settle(
                current,
                pods,
                status.now(),
                gpu_resource_name=spec.resources.gpu_resource_name,
                departed=writer.take_departed(key),
                stopped_by=stopped_by,
            )
            generation = None
            if job is not None:
                generation = edits.applied_generation(job) or body["metadata"].get("generation")
            price = self.settings.price_per_gpu_hour
            patch = status.training_patch(current, generation, folded, price, settled)
            conditions = status.with_ready(patch["conditions"], job is not None)
            conditions = status.with_spec_applied(
                conditions, edits.pending_on(job) if job is not None else None
            )
            patch["conditions"] = status.with_queued(conditions, folded, queue)
            warn_capacity = False
            if capacity is not False:
                problem = capacity if isinstance(capacity, str) else None
                patch["conditions"], warn_capacity = status.with_schedulable(
                    patch["conditions"], problem
                )
            changed = status.changes(current, patch)
            if changed:
                await asyncio.to_thread(writer.write, body, changed)
            if writer.capacity.get((namespace, name), False) is capacity:
                writer.capacity.pop((namespace, name), None)  # written (a newer one waits)
            if warn_capacity:
                kopf.event(body, type="Warning", reason="InsufficientGPUs", message=str(capacity))
            if current.get("phase") != folded.phase:
                kind = "Warning" if folded.phase == "Failed" else "Normal"
                kopf.event(body, type=kind, reason=folded.phase, message=folded.message[:1024])
            self.phases.record("DiffusionTrainingJob", namespace, name, folded.phase, folded.reason)

    async def merge(self, views: Views, namespace: str, name: str) -> None:
        """Fold the merge Job into the ModelMerge status; on success, the merge's own report."""
        key = ("merge", namespace, name)
        writer = self.writer
        async with writer.lock(key):
            body = Views.one(views.model_merges, (namespace, name))
            if body is None:
                writer.forget(key, "ModelMerge")
                return
            current = writer.owned(body)
            job_name = builders.child_name(name, "merge", limit=52)
            job, pods = views.own_children(body, key, job_name)
            if job is None and current.get("phase") in status.FINISHED:
                return
            generation = body["metadata"].get("generation")
            patch, folded = status.merge_patch(current, generation, job, pods)
            changed = status.changes(current, patch)
            if changed:
                await asyncio.to_thread(writer.write, body, changed)
            if current.get("phase") != folded.phase:
                kind = "Warning" if folded.phase == "Failed" else "Normal"
                kopf.event(body, type=kind, reason=folded.phase, message=folded.message[:1024])
            self.phases.record("ModelMerge", namespace, name, folded.phase, folded.reason)
