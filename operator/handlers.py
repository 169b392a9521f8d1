"""Kopf registrations, and nothing else: each hands its event to the room that handles it.

Children are created in ``children`` (called from ``reconcile``), the cluster is checked in
``checks``, the status is folded in ``status`` and written by ``refresh`` and ``status_writer``;
the operator-wide state is made in ``startup`` and reaches every handler through ``memo``.
State lives on the objects: deterministic child names and owner references make every handler
safe to run twice and after a restart. Kopf's own bookkeeping is kept in annotations under
``difftrain.dev/`` (the status schema is structural, so a ``status.kopf`` field would be pruned).
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from difftrain import api
from difftrain_operator import builders, edits, kube, reconcile, startup
from difftrain_operator.startup import OperatorState
from difftrain_operator.status_writer import MERGE_PLURAL, PLURAL
from difftrain_operator.views import MANAGED, Views, owner_key, plain


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Kopf's settings and the operator-wide state (into ``memo``)."""
    startup.start(settings, memo)


# Indexes: the operator's view of the cluster (see ``views``).


@kopf.index(api.GROUP, api.VERSION, PLURAL)
async def training_jobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): plain(body)}


@kopf.index(api.GROUP, api.VERSION, MERGE_PLURAL)
async def model_merges(namespace: str, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): plain(body)}


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
async def child_jobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): plain(body)}


@kopf.index("", "v1", "pods", labels=MANAGED)
async def child_pods(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> Any:
    key = owner_key(namespace, labels)
    return {key: plain(body)} if key else None


# The resources.


@kopf.on.resume(api.GROUP, api.VERSION, PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, PLURAL, field="spec")
async def reconcile_training_job(
    body: kopf.Body, name: str, namespace: str, uid: str, memo: kopf.Memo, reason: str, **kw: Any
) -> None:
    """Make the children match the spec, then fold their state into the status."""
    state = OperatorState.of(memo)
    key = ("dtj", namespace, name)
    await reconcile.reconcile(state, Views.of(kw), body, key, uid, reason, kw.get("retry", 0))


@kopf.on.resume(api.GROUP, api.VERSION, MERGE_PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, MERGE_PLURAL)
async def reconcile_merge(
    body: kopf.Body, name: str, namespace: str, uid: str, memo: kopf.Memo, reason: str, **kw: Any
) -> None:
    """Run the merge as a Job (once: a merge is not changed after it started)."""
    state = OperatorState.of(memo)
    await reconcile.reconcile(state, Views.of(kw), body, ("merge", namespace, name), uid, reason)


@kopf.on.field(api.GROUP, api.VERSION, PLURAL, field="status.step")
async def trainer_reported(namespace: str, name: str, memo: kopf.Memo, **kw: Any) -> None:
    """The trainer's first step report moves Preparing to Running."""
    await OperatorState.of(memo).refresher.training(Views.of(kw), namespace, name)


# The children.


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_changed(
    namespace: str, name: str, labels: dict[str, str], meta: kopf.Meta, memo: kopf.Memo, **kw: Any
) -> None:
    """A child Job moved: fold it into its resource's status.

    A Job on its way out (its TTL, or its resource deleted) still holds the result finalizer:
    the result is recorded first (at once, while the Job is still there), then the finalizer is
    released.
    """
    state = OperatorState.of(memo)
    key = owner_key(namespace, labels)
    finalizers = list(meta.get("finalizers") or [])
    leaving = bool(meta.get("deletionTimestamp")) and builders.RESULT_FINALIZER in finalizers
    views = Views.of(kw)
    if key is not None:
        if leaving:
            await state.refresher.now(views, key)
        else:
            state.refresher.schedule(views, key)
    if key is not None and key[0] == "dtj" and not leaving and kw.get("type") != "DELETED":
        await _apply_when_stopped(state, views, key)
    if leaving:
        index = finalizers.index(builders.RESULT_FINALIZER)
        path = f"/metadata/finalizers/{index}"
        # a JSON patch that tests first: only our own finalizer is ever removed
        patch = [
            {"op": "test", "path": path, "value": builders.RESULT_FINALIZER},
            {"op": "remove", "path": path},
        ]
        try:
            await asyncio.to_thread(
                state.kube.patch, "Job", namespace, name, patch, kube.JSON_PATCH
            )
        except ApiException as exc:
            if exc.status not in (404, 422):  # already gone, or released by an earlier event
                raise


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def pod_changed(
    namespace: str, labels: dict[str, str], memo: kopf.Memo, type: str | None, **kw: Any
) -> None:
    """A child pod moved (scheduled, running, preempted, finished, deleted)."""
    if key := owner_key(namespace, labels):
        state = OperatorState.of(memo)
        if type == "DELETED":  # its last state, for the GPU-hours and restarts it accounts for
            state.writer.pod_deleted(key, plain(kw["body"]))
        views = Views.of(kw)
        state.refresher.schedule(views, key)
        if type == "DELETED" and key[0] == "dtj":
            await _apply_when_stopped(state, views, key)


async def _apply_when_stopped(
    state: OperatorState, views: Views, key: tuple[str, str, str]
) -> None:
    """Edits waiting for the next start are applied once the Job is suspended and its pods are
    gone (the user's suspend, or Kueue's)."""
    job = Views.one(views.child_jobs, (key[1], builders.child_name(key[2], limit=52)))
    if job is None or job["metadata"].get("deletionTimestamp") or not edits.pending_on(job):
        return
    if edits.stopped(job, list(views.child_pods.get(key, ()))):
        await reconcile.apply_at_next_start(state, views, job)
