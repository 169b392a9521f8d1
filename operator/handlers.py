"""Kopf handlers: thin, idempotent, level-triggered.

Each handler reads the resource, asks a pure function for the desired objects (``builders``) or
status (``status``), applies the result and returns. State lives on the objects: deterministic
child names and owner references make every handler safe to run twice and after a restart.
Kopf's own bookkeeping is kept in annotations under ``difftrain.dev/`` (the status schema is
structural, so a ``status.kopf`` field would be pruned).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from difftrain import api
from difftrain_operator import builders, kube, metrics, status
from difftrain_operator.kube import Kube, Obj

logger = logging.getLogger(__name__)
PLURAL = "diffusiontrainingjobs"
MERGE_PLURAL = "modelmerges"
SETTINGS_KEY = "difftrain_settings"


def operator_settings() -> builders.OperatorSettings:
    """Operator settings from its Deployment's environment (set by the Helm chart)."""
    defaults = builders.OperatorSettings()
    max_grace = int(os.environ.get("DIFFTRAIN_TRAINER_MAX_GRACE_SECONDS") or 0)  # 0: no cap
    return builders.OperatorSettings(
        trainer_image=os.environ.get("DIFFTRAIN_TRAINER_IMAGE", defaults.trainer_image),
        price_per_gpu_hour=float(os.environ.get("DIFFTRAIN_PRICE_PER_GPU_HOUR", "0") or 0),
        trainer_max_grace_seconds=max_grace or None,
        hub_cache_claim=os.environ.get("DIFFTRAIN_HUB_CACHE_CLAIM", defaults.hub_cache_claim),
    )


THREADS = 32  # blocking API calls in flight at most; also the size of the connection pool


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Annotation storage under our prefix, watch timeouts, peering."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    # a stalled watch stream is dropped and re-established instead of hanging forever
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    # Events for warnings only: the handlers post their own Events on every phase change, and
    # an Event per handler run would double the API writes of a burst of new resources
    settings.posting.level = logging.WARNING
    # The handlers are async; their blocking API calls run in the loop's default executor (6
    # threads on 2 cores unless set), and mostly wait for the API server.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(THREADS, thread_name_prefix="difftrain-api")
    )
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    memo[SETTINGS_KEY] = operator_settings()


_shared: dict[str, Kube] = {}


def _kube() -> Kube:
    """One API client (one connection pool) for every handler, made after login."""
    if "api" not in _shared:
        cfg = client.Configuration.get_default_copy()
        # as many pooled connections as handler threads: an exhausted pool opens a new TLS
        # connection per call, and the handshakes were most of the operator's CPU under load
        cfg.connection_pool_maxsize = THREADS
        _shared["api"] = Kube(client.ApiClient(cfg))
    return _shared["api"]


class ForeignChildError(Exception):
    """A child's name is taken by an object another resource (a deleted namesake) still owns."""


def _check_owner(existing: Obj, desired: Obj) -> None:
    """Raise ForeignChildError unless ``existing`` belongs to the same resource as ``desired``."""
    want = {ref["uid"] for ref in desired["metadata"].get("ownerReferences") or []}
    have = {ref.get("uid") for ref in existing.get("metadata", {}).get("ownerReferences") or []}
    if not want & have:
        meta = desired["metadata"]
        raise ForeignChildError(
            f"{desired['kind']} {meta['name']} still belongs to an earlier resource of this name "
            "(deleted, its children not yet); the children are created once it is gone"
        )


def _apply(obj: Obj) -> None:
    """Create a child; if it exists and is ours, leave it (Jobs' templates are immutable) but
    sync a Job's suspend; if a deleted namesake still owns it, raise ForeignChildError."""
    try:
        _kube().create(obj)
    except ApiException as exc:
        if exc.status != 409:
            raise
        meta = obj["metadata"]
        existing = _kube().get(obj["kind"], meta["namespace"], meta["name"])
        _check_owner(existing, obj)
        suspend = (obj.get("spec") or {}).get("suspend")
        if obj["kind"] == "Job" and bool(existing["spec"].get("suspend")) != bool(suspend):
            _kube().patch("Job", meta["namespace"], meta["name"], {"spec": {"suspend": suspend}})


# Children that others depend on go first: pods need their ServiceAccount and ConfigMap when the
# Job controller creates them, a RoleBinding names its Role. The Job is always created last, so
# an existing Job means every other child was created. Each wave is created in parallel.
WAVES = (("RoleBinding",), ("Job",))


async def _apply_all(objects: Iterable[Obj]) -> None:
    objects = list(objects)
    later = {kind for wave in WAVES for kind in wave}
    waves = [[o for o in objects if o["kind"] not in later]]
    waves += [[o for o in objects if o["kind"] in wave] for wave in WAVES]
    for wave in waves:
        await asyncio.gather(*(asyncio.to_thread(_apply, obj) for obj in wave))


async def _ensure_children(views: Views, objects: list[Obj]) -> None:
    """Create the children, unless their Job exists already: then only its suspend is synced.

    After a restart every resource is resumed; with its Job in the index that costs no API call.
    """
    job = next(o for o in objects if o["kind"] == "Job")
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    existing = Views.one(views.child_jobs, (namespace, name))
    if existing is None:
        await _apply_all(objects)
        return
    _check_owner(existing, job)
    suspend = bool(job["spec"].get("suspend"))
    if bool((existing.get("spec") or {}).get("suspend")) != suspend:
        patch = {"spec": {"suspend": suspend}}
        await asyncio.to_thread(_kube().patch, "Job", namespace, name, patch)


async def _ensure_children_or_wait(views: Views, body: Obj, objects: list[Obj]) -> None:
    """The children, or a waiting condition and a retry while a namesake's are being deleted."""
    try:
        await _ensure_children(views, objects)
    except ForeignChildError as exc:
        await asyncio.to_thread(_wait, body, "PreviousChildrenTerminating", str(exc))
        raise kopf.TemporaryError(str(exc), delay=5) from None


# ---------------------------------------------------------------------------------------------
# What the operator knows of the cluster: Kopf indexes, fed by its own watch streams.
#
# Status refreshes read the resource, its Job and its pods from these instead of the API server,
# so a refresh costs one PATCH (or nothing when nothing changed). Kopf fills every index before it
# runs any other handler, after a restart as well, and updates it before the handlers of the same
# event run. The indexes are only ever read on the event loop: Kopf writes them there.
# ---------------------------------------------------------------------------------------------

MANAGED = {"app.kubernetes.io/managed-by": builders.MANAGED_BY}


def _plain(body: kopf.Body) -> Obj:
    return {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}


@kopf.index(api.GROUP, api.VERSION, PLURAL)
async def training_jobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): _plain(body)}


@kopf.index(api.GROUP, api.VERSION, MERGE_PLURAL)
async def model_merges(namespace: str, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): _plain(body)}


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
async def child_jobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): _plain(body)}


@kopf.index("", "v1", "pods", labels=MANAGED)
async def child_pods(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> Any:
    if owner := labels.get(builders.JOB_LABEL):
        return {("dtj", namespace, owner): _plain(body)}
    if owner := labels.get(builders.MERGE_LABEL):
        return {("merge", namespace, owner): _plain(body)}
    return None


@dataclass(frozen=True)
class Views:
    """The live indexes, as Kopf passes them to every handler."""

    training_jobs: kopf.Index[tuple[str, str], Obj]
    model_merges: kopf.Index[tuple[str, str], Obj]
    child_jobs: kopf.Index[tuple[str, str], Obj]
    child_pods: kopf.Index[tuple[str, str, str], Obj]

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


# The status fields the operator owns (phase, conditions, accounting), as it last wrote them, by
# resource (and its uid). The watch may not have delivered a write yet when the next refresh runs:
# these values are newer than the index's then. Nobody else writes these fields (the trainer
# writes its progress, the user the spec), so the overlay is never older than the index. Empty
# after a restart, when the index, listed afresh, is current.
_written: dict[tuple[str, str, str], tuple[str, Obj]] = {}  # key -> (uid, fields)
_locks: dict[tuple[str, str, str], asyncio.Lock] = {}


def _key(body: Obj) -> tuple[str, str, str]:
    kind = "dtj" if body.get("kind") == "DiffusionTrainingJob" else "merge"
    return kind, body["metadata"]["namespace"], body["metadata"]["name"]


def _owned(body: Obj) -> Obj:
    """The status, with the operator's own fields as it last wrote them."""
    current = dict(body.get("status") or {})
    uid, fields = _written.get(_key(body), ("", {}))
    if uid == body["metadata"]["uid"]:  # not a deleted namesake's
        current.update(fields)
    return current


def _lock(key: tuple[str, str, str]) -> asyncio.Lock:
    return _locks.setdefault(key, asyncio.Lock())


def _forget(key: tuple[str, str, str], kind: str) -> None:
    _locks.pop(key, None)
    _written.pop(key, None)
    _capacity.pop((key[1], key[2]), None)
    metrics.record_phase(kind, key[1], key[2], None)


def _write_status(body: Obj, plural: str, patch: Obj) -> None:
    """Patch the status subresource and remember what the operator wrote (blocking)."""
    meta = body["metadata"]
    try:
        _kube().patch_status(api.GROUP, api.VERSION, meta["namespace"], plural, meta["name"], patch)
    except ApiException as exc:
        if exc.status == 404:
            return  # deleted meanwhile; its children go with it
        raise
    uid, fields = _written.get(_key(body), ("", {}))
    if uid != meta["uid"]:
        fields = {}
    _written[_key(body)] = (meta["uid"], {**fields, **patch})


# ---------------------------------------------------------------------------------------------
# Checks that read the cluster: cached for a few seconds, so a burst of new resources that share
# a Secret and a node pool costs one read, not one per resource.
# ---------------------------------------------------------------------------------------------

CHECK_CACHE_SECONDS = 10.0
_check_lock = threading.Lock()
_secrets: dict[tuple[str, str], tuple[float, set[str]]] = {}
_nodes: list[tuple[float, list[Obj] | None]] = []


def _secret_keys(namespace: str, name: str) -> set[str] | None:
    """The data keys of a Secret (None if it does not exist); a found Secret is cached."""
    with _check_lock:
        cached = _secrets.get((namespace, name))
        if cached and time.monotonic() - cached[0] < CHECK_CACHE_SECONDS:
            return cached[1]
        try:
            secret = _kube().get("Secret", namespace, name)
        except ApiException as exc:
            if exc.status == 404:
                _secrets.pop((namespace, name), None)
                return None  # not cached: the retry must see it as soon as it is created
            raise
        keys = set(secret.get("data") or {})  # stringData is write-only: never read back
        _secrets[(namespace, name)] = (time.monotonic(), keys)
        return keys


def _secret_missing(namespace: str, ref: api.SecretKeyRefs | None) -> str | None:
    if ref is None:
        return None
    keys = _secret_keys(namespace, ref.name)
    if keys is None:
        return f"Secret {ref.name!r} (storage.secretRef) does not exist in {namespace}"
    missing = [k for k in (ref.access_key_key, ref.secret_key_key) if k not in keys]
    if missing:
        return f"Secret {ref.name!r} has no key {missing[0]!r} (storage.secretRef)"
    return None


def _node_list() -> list[Obj] | None:
    """The nodes (None when this operator may not list them), cached for a few seconds."""
    with _check_lock:
        if _nodes and time.monotonic() - _nodes[0][0] < CHECK_CACHE_SECONDS:
            return _nodes[0][1]
        try:
            nodes: list[Obj] | None = _kube().nodes()
        except ApiException as exc:
            if exc.status != 403:
                raise
            nodes = None  # a namespaced install may not see nodes; the scheduler says it later
        _nodes[:] = [(time.monotonic(), nodes)]
        return nodes


def gpu_shortfall(nodes: list[Obj], resource_name: str, wanted: int) -> str | None:
    """Why no node can ever hold one worker, or None if one can (pure)."""
    if wanted <= 0:
        return None
    best = 0
    for node in nodes:
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        try:
            best = max(best, int(allocatable.get(resource_name, 0)))
        except ValueError:
            continue
    if best >= wanted:
        return None
    return (
        f"no node offers {wanted} {resource_name} per worker (the largest offers {best}); "
        "the pods wait until such a node joins (e.g. through an autoscaler), or lower "
        "resources.gpusPerWorker"
    )


def _capacity_problem(res: api.ResourcesSpec) -> str | bool | None:
    """A capacity problem, None if a node fits one worker, False if nodes cannot be seen."""
    nodes = _node_list()
    if nodes is None:
        return False
    return gpu_shortfall(nodes, res.gpu_resource_name, res.gpus_per_worker)


# ---------------------------------------------------------------------------------------------
# DiffusionTrainingJob
# ---------------------------------------------------------------------------------------------


@kopf.on.resume(api.GROUP, api.VERSION, PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, PLURAL, field="spec")
async def reconcile_training_job(
    body: kopf.Body, name: str, namespace: str, uid: str, memo: kopf.Memo, reason: str, **kw: Any
) -> None:
    """Make the children match the spec, then fold their state into the status."""
    key = ("dtj", namespace, name)
    work = _reconcile_training_job(Views.of(kw), body, name, namespace, uid, memo)
    await _reconcile_one(key, "DiffusionTrainingJob", reason, work)


async def _reconcile_one(
    key: tuple[str, str, str], kind: str, reason: str, work: Coroutine[Any, Any, None]
) -> None:
    """Run one reconcile: counted, timed, and known to be creating children while it runs."""
    if reason == "create":
        metrics.CREATED.labels(kind).inc()
    _reconciling.add(key)
    try:
        with metrics.reconcile_timer(kind):
            await work
    finally:
        _reconciling.discard(key)


async def _checked(
    body: kopf.Body, plain: Obj, namespace: str
) -> api.DiffusionTrainingJob | api.ModelMerge:
    """The parsed resource; a bad spec fails it for good, a missing Secret waits and retries."""
    try:
        resource = api.parse_resource(dict(body))
    except api.SpecError as exc:
        await asyncio.to_thread(_fail, plain, "InvalidSpec", str(exc))
        raise kopf.PermanentError(str(exc)) from None
    ref = resource.spec.storage.secret_ref if resource.spec.storage else None
    problem = await asyncio.to_thread(_secret_missing, namespace, ref)
    if problem:
        await asyncio.to_thread(_wait, plain, "SecretMissing", problem)
        raise kopf.TemporaryError(problem, delay=30)
    return resource


async def _reconcile_training_job(
    views: Views, body: kopf.Body, name: str, namespace: str, uid: str, memo: kopf.Memo
) -> None:
    if (body.get("status") or {}).get("phase") in status.FINISHED:
        return  # finished is final: a Job removed by its TTL is not run again
    plain = _plain(body)
    resource = await _checked(body, plain, namespace)
    assert isinstance(resource, api.DiffusionTrainingJob)
    # advisory: the children are created all the same (an autoscaler needs the pending pods to
    # add a node); known before the Job exists, so the first status write carries it
    _capacity[(namespace, name)] = await asyncio.to_thread(
        _capacity_problem, resource.spec.resources
    )
    children = builders.build_training_children(resource, uid, memo[SETTINGS_KEY])
    await _ensure_children_or_wait(views, plain, children.all())
    # the status follows shortly, in one write with what the Job controller does meanwhile
    _schedule(views, ("dtj", namespace, name))


def _fail(body: Obj, reason: str, message: str) -> None:
    kopf.event(body, type="Warning", reason=reason, message=message[:1024])
    folded = status.Folded("Failed", reason, message, 0, None, None, 0.0)
    current = _owned(body)
    generation = body["metadata"].get("generation")
    conditions = status.merge_conditions(list(current.get("conditions") or []), folded, generation)
    plural = PLURAL if body.get("kind") == "DiffusionTrainingJob" else MERGE_PLURAL
    _write_status(body, plural, {"phase": "Failed", "conditions": conditions})


def _wait(body: Obj, reason: str, message: str) -> None:
    kopf.event(body, type="Warning", reason=reason, message=message[:1024])
    current = _owned(body)
    conditions = [c for c in current.get("conditions") or [] if c.get("type") != "Ready"]
    conditions.append(
        {
            "type": "Ready",
            "status": "False",
            "reason": reason,
            "message": message,
            "lastTransitionTime": status.rfc3339(status.now()),
        }
    )
    plural = PLURAL if body.get("kind") == "DiffusionTrainingJob" else MERGE_PLURAL
    _write_status(body, plural, {"phase": "Pending", "conditions": conditions})


def _owned_by(obj: Obj, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _own_children(
    views: Views, body: Obj, key: tuple[str, str, str], job_name: str
) -> tuple[Obj | None, list[Obj]]:
    """The resource's Job and that Job's pods; a deleted namesake's leftovers are not its own."""
    job = Views.one(views.child_jobs, (key[1], job_name))
    if job is None or not _owned_by(job, body["metadata"]["uid"]):
        return None, []
    pods = [p for p in views.child_pods.get(key, ()) if _owned_by(p, job["metadata"]["uid"])]
    return job, pods


# GPU capacity found by the reconcile handler, for the next status write: a problem (str), None
# when a node fits one worker, False when the nodes cannot be seen
_capacity: dict[tuple[str, str], str | bool | None] = {}


async def refresh_status(views: Views, namespace: str, name: str) -> None:
    """Fold the resource's Job and pods (from the indexes) into its status; write what changed."""
    key = ("dtj", namespace, name)
    async with _lock(key):
        capacity = _capacity.get((namespace, name), False)
        body = Views.one(views.training_jobs, (namespace, name))
        if body is None:
            _forget(key, "DiffusionTrainingJob")
            return  # deleted; its children go with it (owner references)
        current = _owned(body)
        job_name = builders.child_name(name, limit=52)
        job, pods = _own_children(views, body, key, job_name)
        if job is None and current.get("phase") in status.FINISHED:
            return  # the Job was deleted after finishing (ttlSecondsAfterFinished): keep the result
        try:
            resource = api.parse_resource(body)
        except api.SpecError:
            return  # the reconcile handler has failed it with the reason
        assert isinstance(resource, api.DiffusionTrainingJob)
        folded = status.fold(
            status.Observed(
                job=job,
                pods=pods,
                suspend=resource.spec.suspend,
                trainer_step=current.get("step"),
                gpus_per_pod=resource.spec.resources.gpus_per_worker,
            )
        )
        generation = body["metadata"].get("generation")
        price = operator_settings().price_per_gpu_hour
        patch = status.training_patch(current, generation, folded, price)
        patch["conditions"] = status.with_ready(patch["conditions"], job is not None)
        warn_capacity = False
        if capacity is not False:
            problem = capacity if isinstance(capacity, str) else None
            patch["conditions"], warn_capacity = status.with_schedulable(
                patch["conditions"], problem
            )
        changed = status.changes(current, patch)
        if changed:
            await asyncio.to_thread(_write_status, body, PLURAL, changed)
        if _capacity.get((namespace, name), False) is capacity:
            _capacity.pop((namespace, name), None)  # written (a newer finding waits its turn)
        if warn_capacity:
            kopf.event(body, type="Warning", reason="InsufficientGPUs", message=str(capacity))
        if current.get("phase") != folded.phase:
            kind = "Warning" if folded.phase == "Failed" else "Normal"
            kopf.event(body, type=kind, reason=folded.phase, message=folded.message[:1024])
        metrics.record_phase("DiffusionTrainingJob", namespace, name, folded.phase, folded.reason)


_scheduled: set[tuple[str, str, str]] = set()
_tasks: set[asyncio.Task[None]] = set()
# Status writes wait this long, so that what happens meanwhile (the Job controller starting the
# Job and creating pods, several pod updates) lands in one PATCH: each write of a custom resource
# costs the API server a full decode, validation (CEL included) and encode.
COALESCE_SECONDS = 0.5
MAX_DEFER_SECONDS = 10.0
# reconciles creating children right now (their keys)
_reconciling: set[tuple[str, str, str]] = set()


def _schedule(views: Views, key: tuple[str, str, str]) -> None:
    """Refresh ``key``'s status in COALESCE_SECONDS; requests until then share that refresh."""
    if key in _scheduled:
        return  # a refresh is already due; it will read the newest state
    refresh = refresh_status if key[0] == "dtj" else refresh_merge_status

    async def later() -> None:
        await asyncio.sleep(COALESCE_SECONDS)
        # status writes yield to child creation: during a burst of new resources the API server's
        # time goes to the Jobs first, and the writes that wait merge with later changes
        deadline = asyncio.get_running_loop().time() + MAX_DEFER_SECONDS
        while _reconciling and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(COALESCE_SECONDS)
        _scheduled.discard(key)  # requests from now on schedule a new refresh
        try:
            await refresh(views, key[1], key[2])
        except ApiException as exc:
            logger.warning("status refresh of %s/%s failed: %s", key[1], key[2], exc.reason)

    _scheduled.add(key)
    task = asyncio.create_task(later())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _child_changed(
    views: Views, namespace: str, labels: dict[str, str] | None, at_once: bool = False
) -> None:
    """Schedule a status refresh for the child's owner.

    ``at_once`` refreshes now (a Job about to disappear must be seen while it exists).
    """
    labels = labels or {}
    if owner := labels.get(builders.JOB_LABEL):
        key = ("dtj", namespace, owner)
    elif owner := labels.get(builders.MERGE_LABEL):
        key = ("merge", namespace, owner)
    else:
        return
    if at_once:
        await (refresh_status if key[0] == "dtj" else refresh_merge_status)(views, namespace, owner)
    else:
        _schedule(views, key)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_changed(
    namespace: str, name: str, labels: dict[str, str], meta: kopf.Meta, **kw: Any
) -> None:
    """A child Job moved: fold it into its resource's status.

    A Job on its way out (its TTL, or its resource deleted) still holds the result finalizer:
    the result is recorded first, then the finalizer is released.
    """
    finalizers = list(meta.get("finalizers") or [])
    leaving = bool(meta.get("deletionTimestamp")) and builders.RESULT_FINALIZER in finalizers
    await _child_changed(Views.of(kw), namespace, labels, at_once=leaving)
    if leaving:
        index = finalizers.index(builders.RESULT_FINALIZER)
        path = f"/metadata/finalizers/{index}"
        # a JSON patch that tests first: only our own finalizer is ever removed
        patch = [
            {"op": "test", "path": path, "value": builders.RESULT_FINALIZER},
            {"op": "remove", "path": path},
        ]
        try:
            await asyncio.to_thread(_kube().patch, "Job", namespace, name, patch, kube.JSON_PATCH)
        except ApiException as exc:
            if exc.status not in (404, 422):  # already gone, or released by an earlier event
                raise


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def pod_changed(namespace: str, labels: dict[str, str], **kw: Any) -> None:
    """A child pod moved (scheduled, running, preempted, finished)."""
    await _child_changed(Views.of(kw), namespace, labels)


# ---------------------------------------------------------------------------------------------
# ModelMerge
# ---------------------------------------------------------------------------------------------


@kopf.on.resume(api.GROUP, api.VERSION, MERGE_PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, MERGE_PLURAL)
async def reconcile_merge(
    body: kopf.Body, name: str, namespace: str, uid: str, memo: kopf.Memo, reason: str, **kw: Any
) -> None:
    """Run the merge as a Job (once: a merge is not changed after it started)."""
    key = ("merge", namespace, name)
    work = _reconcile_merge(Views.of(kw), body, name, namespace, uid, memo)
    await _reconcile_one(key, "ModelMerge", reason, work)


async def _reconcile_merge(
    views: Views, body: kopf.Body, name: str, namespace: str, uid: str, memo: kopf.Memo
) -> None:
    if (body.get("status") or {}).get("phase") in status.FINISHED:
        return
    plain = _plain(body)
    resource = await _checked(body, plain, namespace)
    assert isinstance(resource, api.ModelMerge)
    children = builders.build_merge_children(resource, uid, memo[SETTINGS_KEY])
    await _ensure_children_or_wait(views, plain, list(children))
    _schedule(views, ("merge", namespace, name))


def _termination_message(pods: list[Obj]) -> str | None:
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            message = (cs.get("state", {}).get("terminated") or {}).get("message")
            if message:
                found: str = message
                return found
    return None


async def refresh_merge_status(views: Views, namespace: str, name: str) -> None:
    """Fold the merge Job into the ModelMerge status; on success, the merge's own report."""
    key = ("merge", namespace, name)
    async with _lock(key):
        body = Views.one(views.model_merges, (namespace, name))
        if body is None:
            _forget(key, "ModelMerge")
            return
        current = _owned(body)
        job_name = builders.child_name(name, "merge", limit=52)
        job, pods = _own_children(views, body, key, job_name)
        if job is None and current.get("phase") in status.FINISHED:
            return
        folded = status.fold(status.Observed(job, pods, False, trainer_step=1, gpus_per_pod=0))
        phase = {"Preparing": "Running", "Suspended": "Pending"}.get(folded.phase, folded.phase)
        generation = body["metadata"].get("generation")
        message = _termination_message(pods)
        detail = message if phase == "Failed" and message else folded.message
        folded = status.Folded(
            phase,
            folded.reason,
            detail,
            folded.restarts,
            folded.start_time,
            folded.completion_time,
            0.0,
        )
        patch: Obj = {
            "phase": phase,
            "observedGeneration": generation,
            "conditions": status.with_ready(
                status.merge_conditions(list(current.get("conditions") or []), folded, generation),
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
            for field in ("outputUri", "sha256", "shortHash", "sizeBytes", "tensors"):
                if field in report:
                    patch[field] = report[field]
            if "durationSeconds" in report:
                patch["durationSeconds"] = report["durationSeconds"]
        changed = status.changes(current, patch)
        if changed:
            await asyncio.to_thread(_write_status, body, MERGE_PLURAL, changed)
        if current.get("phase") != phase:
            kind = "Warning" if phase == "Failed" else "Normal"
            kopf.event(body, type=kind, reason=phase, message=detail[:1024])
        metrics.record_phase("ModelMerge", namespace, name, phase, folded.reason)


@kopf.on.field(api.GROUP, api.VERSION, PLURAL, field="status.step")
async def trainer_reported(namespace: str, name: str, **kw: Any) -> None:
    """The trainer's first step report moves Preparing to Running."""
    await refresh_status(Views.of(kw), namespace, name)
