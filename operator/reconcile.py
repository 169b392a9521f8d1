"""Reconciling a resource: check it, make its children match its spec, schedule a status refresh."""

from __future__ import annotations

import asyncio

import kopf

from difftrain import api
from difftrain_operator import builders, metrics, status
from difftrain_operator.kube import Obj
from difftrain_operator.startup import OperatorState
from difftrain_operator.views import Key, Views, owned_by, plain


async def reconcile(
    state: OperatorState,
    views: Views,
    body: kopf.Body,
    key: Key,
    uid: str,
    reason: str,
    retry: int = 0,
) -> None:
    """Run one reconcile: counted, timed, and known to be creating children while it runs.

    ``retry``: how many times Kopf retried this handler (its delays grow with it)."""
    kind = "DiffusionTrainingJob" if key[0] == "dtj" else "ModelMerge"
    if reason == "create":
        metrics.CREATED.labels(kind).inc()
    with state.refresher.creating(key), metrics.reconcile_timer(kind):
        if key[0] == "dtj":
            await reconcile_training_job(state, views, body, key, uid, retry)
        else:
            await reconcile_merge(state, views, body, key, uid)


async def checked(
    state: OperatorState, body: kopf.Body | Obj, resource_body: Obj, namespace: str
) -> api.DiffusionTrainingJob | api.ModelMerge:
    """The parsed resource; a bad spec fails it for good, a missing Secret waits and retries."""
    try:
        resource = api.parse_resource(dict(body))
    except api.SpecError as exc:
        await asyncio.to_thread(state.writer.fail, resource_body, "InvalidSpec", str(exc))
        raise kopf.PermanentError(str(exc)) from None
    ref = resource.spec.storage.secret_ref if resource.spec.storage else None
    problem = await asyncio.to_thread(state.checks.secret_missing, namespace, ref)
    if problem:
        await asyncio.to_thread(state.writer.wait, resource_body, "SecretMissing", problem)
        raise kopf.TemporaryError(problem, delay=30)
    return resource


async def reconcile_training_job(
    state: OperatorState, views: Views, body: kopf.Body | Obj, key: Key, uid: str, retry: int = 0
) -> None:
    """Make a training job's children match its spec."""
    if (body.get("status") or {}).get("phase") in status.FINISHED:
        return  # finished is final: a Job removed by its TTL is not run again
    _, namespace, name = key
    resource_body = plain(body)
    resource = await checked(state, body, resource_body, namespace)
    assert isinstance(resource, api.DiffusionTrainingJob)
    # advisory: the children are created all the same (an autoscaler needs the pending pods to
    # add a node); known before the Job exists, so the first status write carries it
    state.writer.capacity[(namespace, name)] = await asyncio.to_thread(
        state.checks.capacity, resource.spec.resources
    )
    children = builders.build_training_children(resource, uid, state.settings)
    pods = list(views.child_pods.get(key, ()))
    started = status.has_started(state.writer.owned(resource_body), pods)
    async with state.writer.lock(("children", namespace, name)):
        await state.children.ensure_training(
            views,
            state.writer,
            resource_body,
            children,
            suspend=resource.spec.suspend,
            started=started,
            retry=retry,
        )
    # the status follows shortly, in one write with what the Job controller does meanwhile
    state.refresher.schedule(views, key)


async def apply_at_next_start(state: OperatorState, views: Views, job: Obj) -> None:
    """A Job with edits waiting for the next start of its pods has stopped: apply them now."""
    key = ("dtj", job["metadata"]["namespace"], job["metadata"]["labels"][builders.JOB_LABEL])
    body = Views.one(views.training_jobs, (key[1], key[2]))
    if body is None or not owned_by(job, body["metadata"]["uid"]):
        return
    with state.refresher.creating(key), metrics.reconcile_timer("DiffusionTrainingJob"):
        await reconcile_training_job(state, views, body, key, body["metadata"]["uid"])


async def reconcile_merge(
    state: OperatorState, views: Views, body: kopf.Body, key: Key, uid: str
) -> None:
    """Run the merge as a Job (once: a merge is not changed after it started)."""
    if (body.get("status") or {}).get("phase") in status.FINISHED:
        return
    resource_body = plain(body)
    resource = await checked(state, body, resource_body, key[1])
    assert isinstance(resource, api.ModelMerge)
    children = builders.build_merge_children(resource, uid, state.settings)
    await state.children.ensure_or_wait(views, state.writer, resource_body, list(children))
    state.refresher.schedule(views, key)
