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
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from difftrain import api
from difftrain_operator import builders, metrics, status

logger = logging.getLogger(__name__)
PLURAL = "diffusiontrainingjobs"
SETTINGS_KEY = "difftrain_settings"


def operator_settings() -> builders.OperatorSettings:
    """Operator settings from its Deployment's environment (set by the Helm chart)."""
    defaults = builders.OperatorSettings()
    return builders.OperatorSettings(
        trainer_image=os.environ.get("DIFFTRAIN_TRAINER_IMAGE", defaults.trainer_image),
        price_per_gpu_hour=float(os.environ.get("DIFFTRAIN_PRICE_PER_GPU_HOUR", "0") or 0),
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
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
    # sync handlers run in a thread pool; their time is mostly waiting for the API server
    settings.execution.max_workers = 16  # keep <= connection_pool_maxsize of _client()
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    memo[SETTINGS_KEY] = operator_settings()


_shared: dict[str, client.ApiClient] = {}


def _client() -> client.ApiClient:
    """One API client (one connection pool) for every handler, made after login."""
    if "api" not in _shared:
        cfg = client.Configuration.get_default_copy()
        # as many pooled connections as handler threads: an exhausted pool opens a new TLS
        # connection per call, and the handshakes were most of the operator's CPU under load
        cfg.connection_pool_maxsize = 32
        _shared["api"] = client.ApiClient(cfg)
    return _shared["api"]


def _raw(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the API and parse the JSON ourselves: the client's model classes are slow to build."""
    response = call(*args, _preload_content=False, **kwargs)
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()  # back to the pool: no new TLS handshake for the next call


def _apply(obj: dict[str, Any]) -> None:
    """Create a child; if it exists, leave it (Jobs' templates are immutable) but sync suspend."""
    api_client = _client()
    kind = obj["kind"]
    ns = obj["metadata"]["namespace"]
    name = obj["metadata"]["name"]
    creators = {
        "ConfigMap": lambda: client.CoreV1Api(api_client).create_namespaced_config_map(
            ns, obj, _preload_content=False
        ),
        "ServiceAccount": lambda: client.CoreV1Api(api_client).create_namespaced_service_account(
            ns, obj, _preload_content=False
        ),
        "Service": lambda: client.CoreV1Api(api_client).create_namespaced_service(
            ns, obj, _preload_content=False
        ),
        "Role": lambda: client.RbacAuthorizationV1Api(api_client).create_namespaced_role(
            ns, obj, _preload_content=False
        ),
        "RoleBinding": lambda: client.RbacAuthorizationV1Api(
            api_client
        ).create_namespaced_role_binding(ns, obj, _preload_content=False),
        "Job": lambda: client.BatchV1Api(api_client).create_namespaced_job(
            ns, obj, _preload_content=False
        ),
    }
    try:
        response = creators[kind]()
        response.drain_conn()  # the body is not needed, but the connection goes back clean
        response.release_conn()
    except ApiException as exc:
        if exc.status != 409:
            raise
        if kind == "Job":
            client.BatchV1Api(api_client).patch_namespaced_job(
                name, ns, {"spec": {"suspend": obj["spec"]["suspend"]}}
            )


def _secret_missing(namespace: str, spec: api.DiffusionTrainingJobSpec) -> str | None:
    if spec.storage is None or spec.storage.secret_ref is None:
        return None
    ref = spec.storage.secret_ref
    try:
        secret = client.CoreV1Api(_client()).read_namespaced_secret(ref.name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return f"Secret {ref.name!r} (storage.secretRef) does not exist in {namespace}"
        raise
    missing = [k for k in (ref.access_key_key, ref.secret_key_key) if k not in (secret.data or {})]
    if missing:
        return f"Secret {ref.name!r} has no key {missing[0]!r} (storage.secretRef)"
    return None


def _patch_status(namespace: str, name: str, patch: dict[str, Any]) -> None:
    client.CustomObjectsApi(_client()).patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, PLURAL, name, {"status": patch}
    )


@kopf.on.resume(api.GROUP, api.VERSION, PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, PLURAL, field="spec")
def reconcile_training_job(
    body: kopf.Body, name: str, namespace: str, uid: str, memo: kopf.Memo, reason: str, **_: Any
) -> None:
    """Make the children match the spec, then fold their state into the status."""
    if reason == "create":
        metrics.CREATED.labels("DiffusionTrainingJob").inc()
    with metrics.reconcile_timer("DiffusionTrainingJob"):
        _reconcile_training_job(body, name, namespace, uid, memo)


def _reconcile_training_job(
    body: kopf.Body, name: str, namespace: str, uid: str, memo: kopf.Memo
) -> None:
    if (body.get("status") or {}).get("phase") in status.FINISHED:
        return  # finished is final: a Job removed by its TTL is not run again
    try:
        resource = api.parse_resource(dict(body))
    except api.SpecError as exc:
        _fail(body, namespace, name, "InvalidSpec", str(exc))
        raise kopf.PermanentError(str(exc)) from None
    assert isinstance(resource, api.DiffusionTrainingJob)
    problem = _secret_missing(namespace, resource.spec)
    if problem:
        _wait(body, namespace, name, "SecretMissing", problem)
        raise kopf.TemporaryError(problem, delay=30)
    children = builders.build_training_children(resource, uid, memo[SETTINGS_KEY])
    for obj in children.all():
        _apply(obj)
    # advisory, so off the path from apply to Job
    _check_gpu_capacity(body, namespace, name, resource.spec.resources)
    refresh_status(namespace, name)


def gpu_shortfall(nodes: list[Any], resource_name: str, wanted: int) -> str | None:
    """Why no node can ever hold one worker, or None if one can (pure)."""
    if wanted <= 0:
        return None
    best = 0
    for node in nodes:
        allocatable = (node.status.allocatable if node.status else None) or {}
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


def _check_gpu_capacity(body: kopf.Body, namespace: str, name: str, res: api.ResourcesSpec) -> None:
    """Tell the user early when the cluster has no node that fits one worker."""
    try:
        nodes = client.CoreV1Api(_client()).list_node().items
    except ApiException as exc:
        if exc.status == 403:
            return  # a namespaced install may not see nodes; the scheduler will say it later
        raise
    problem = gpu_shortfall(nodes, res.gpu_resource_name, res.gpus_per_worker)
    current = body.get("status") or {}
    conditions = [c for c in current.get("conditions") or [] if c.get("type") != "Schedulable"]
    old: dict[str, Any] = next(
        (c for c in current.get("conditions") or [] if c.get("type") == "Schedulable"), {}
    )
    value = "False" if problem else "True"
    conditions.append(
        {
            "type": "Schedulable",
            "status": value,
            "reason": "InsufficientGPUs" if problem else "CapacityAvailable",
            "message": problem or "",
            "lastTransitionTime": old.get("lastTransitionTime")
            if old.get("status") == value
            else status.rfc3339(status.now()),
        }
    )
    if problem and old.get("status") != "False":
        kopf.event(body, type="Warning", reason="InsufficientGPUs", message=problem)
    _patch_status(namespace, name, {"conditions": conditions})


def _fail(body: kopf.Body, namespace: str, name: str, reason: str, message: str) -> None:
    kopf.event(body, type="Warning", reason=reason, message=message[:1024])
    folded = status.Folded("Failed", reason, message, 0, None, None, 0.0)
    current = body.get("status") or {}
    _patch_status(
        namespace,
        name,
        {
            "phase": "Failed",
            "conditions": status.merge_conditions(
                list(current.get("conditions") or []),
                folded,
                body.get("metadata", {}).get("generation"),
            ),
        },
    )


def _wait(body: kopf.Body, namespace: str, name: str, reason: str, message: str) -> None:
    kopf.event(body, type="Warning", reason=reason, message=message[:1024])
    current = body.get("status") or {}
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
    _patch_status(namespace, name, {"phase": "Pending", "conditions": conditions})


def _read_children(
    namespace: str, job_name: str, pod_selector: str
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The child Job (None when it does not exist) and its pods, as API-shaped dicts."""
    try:
        job = _raw(client.BatchV1Api(_client()).read_namespaced_job, job_name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        job = None
    pods = _raw(
        client.CoreV1Api(_client()).list_namespaced_pod, namespace, label_selector=pod_selector
    )["items"]
    return job, pods


def refresh_status(namespace: str, name: str) -> None:
    """Re-read the resource, its Job and pods, and write the folded status."""
    objects = client.CustomObjectsApi(_client())
    try:
        body = objects.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            metrics.record_phase("DiffusionTrainingJob", namespace, name, None)
            return  # deleted; its children go with it (owner references)
        raise
    resource = api.parse_resource(body)
    assert isinstance(resource, api.DiffusionTrainingJob)
    job, pods = _read_children(
        namespace, builders.child_name(name, limit=52), f"{builders.JOB_LABEL}={name}"
    )
    current = body.get("status") or {}
    if job is None and current.get("phase") in status.FINISHED:
        return  # the Job was deleted after finishing (ttlSecondsAfterFinished): keep the result
    folded = status.fold(
        status.Observed(
            job=job,
            pods=pods,
            suspend=resource.spec.suspend,
            trainer_step=current.get("step"),
            gpus_per_pod=resource.spec.resources.gpus_per_worker,
        )
    )
    price = operator_settings().price_per_gpu_hour
    patch: dict[str, Any] = {
        "phase": folded.phase,
        "restarts": folded.restarts,
        "gpuHours": folded.gpu_hours,
        "estimatedCost": round(folded.gpu_hours * price, 2),
        "observedGeneration": body["metadata"].get("generation"),
        "conditions": status.merge_conditions(
            list(current.get("conditions") or []), folded, body["metadata"].get("generation")
        ),
    }
    if folded.start_time:
        patch["startTime"] = folded.start_time
    if folded.completion_time:
        patch["completionTime"] = folded.completion_time
    if current.get("phase") != folded.phase:
        kind = "Warning" if folded.phase == "Failed" else "Normal"
        kopf.event(body, type=kind, reason=folded.phase, message=folded.message[:1024])
    if any(current.get(k) != v for k, v in patch.items()):  # no write when nothing changed
        _patch_status(namespace, name, patch)
    metrics.record_phase("DiffusionTrainingJob", namespace, name, folded.phase, folded.reason)


_scheduled: dict[tuple[str, str, str], asyncio.Task[None]] = {}
COALESCE_SECONDS = 0.25


async def _child_changed(
    namespace: str, labels: dict[str, str] | None, at_once: bool = False
) -> None:
    """Schedule one status refresh for the owner; events in the next 250 ms share it.

    ``at_once`` refreshes now (a Job about to disappear must be read while it exists).
    """
    labels = labels or {}
    if owner := labels.get(builders.JOB_LABEL):
        key, refresh = ("dtj", namespace, owner), refresh_status
    elif owner := labels.get(builders.MERGE_LABEL):
        key, refresh = ("merge", namespace, owner), refresh_merge_status
    else:
        return
    if at_once:
        await asyncio.to_thread(refresh, namespace, owner)
        return
    if key in _scheduled:
        return  # a refresh is already due; it will read the newest state

    async def later() -> None:
        await asyncio.sleep(COALESCE_SECONDS)
        _scheduled.pop(key, None)  # events from now on schedule a new refresh
        try:
            await asyncio.to_thread(refresh, namespace, owner)
        except ApiException as exc:
            logger.warning("status refresh of %s/%s failed: %s", namespace, owner, exc.reason)

    _scheduled[key] = asyncio.create_task(later())


MANAGED = {"app.kubernetes.io/managed-by": builders.MANAGED_BY}


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_changed(
    namespace: str, name: str, labels: dict[str, str], meta: kopf.Meta, **_: Any
) -> None:
    """A child Job moved: fold it into its resource's status.

    A Job on its way out (its TTL, or its resource deleted) still holds the result finalizer:
    the result is recorded first, then the finalizer is released.
    """
    finalizers = list(meta.get("finalizers") or [])
    leaving = bool(meta.get("deletionTimestamp")) and builders.RESULT_FINALIZER in finalizers
    await _child_changed(namespace, labels, at_once=leaving)
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
                client.BatchV1Api(_client()).patch_namespaced_job, name, namespace, patch
            )
        except ApiException as exc:
            if exc.status not in (404, 422):  # already gone, or released by an earlier event
                raise


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def pod_changed(namespace: str, labels: dict[str, str], **_: Any) -> None:
    """A child pod moved (scheduled, running, preempted, finished)."""
    await _child_changed(namespace, labels)


# ---------------------------------------------------------------------------------------------
# ModelMerge
# ---------------------------------------------------------------------------------------------

MERGE_PLURAL = "modelmerges"


@kopf.on.resume(api.GROUP, api.VERSION, MERGE_PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, MERGE_PLURAL)
def reconcile_merge(
    body: kopf.Body, name: str, namespace: str, uid: str, memo: kopf.Memo, reason: str, **_: Any
) -> None:
    """Run the merge as a Job (once: a merge is not changed after it started)."""
    if reason == "create":
        metrics.CREATED.labels("ModelMerge").inc()
    with metrics.reconcile_timer("ModelMerge"):
        _reconcile_merge(body, name, namespace, uid, memo)


def _reconcile_merge(body: kopf.Body, name: str, namespace: str, uid: str, memo: kopf.Memo) -> None:
    if (body.get("status") or {}).get("phase") in status.FINISHED:
        return
    try:
        resource = api.parse_resource(dict(body))
    except api.SpecError as exc:
        kopf.event(body, type="Warning", reason="InvalidSpec", message=str(exc)[:1024])
        _patch_merge_status(namespace, name, {"phase": "Failed"})
        raise kopf.PermanentError(str(exc)) from None
    assert isinstance(resource, api.ModelMerge)
    ref = resource.spec.storage.secret_ref if resource.spec.storage else None
    if ref is not None:
        try:
            client.CoreV1Api(_client()).read_namespaced_secret(ref.name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            message = f"Secret {ref.name!r} (storage.secretRef) does not exist in {namespace}"
            kopf.event(body, type="Warning", reason="SecretMissing", message=message)
            raise kopf.TemporaryError(message, delay=30) from None
    for obj in builders.build_merge_children(resource, uid, memo[SETTINGS_KEY]):
        _apply(obj)
    refresh_merge_status(namespace, name)


def _patch_merge_status(namespace: str, name: str, patch: dict[str, Any]) -> None:
    client.CustomObjectsApi(_client()).patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, MERGE_PLURAL, name, {"status": patch}
    )


def _termination_message(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            message = (cs.get("state", {}).get("terminated") or {}).get("message")
            if message:
                found: str = message
                return found
    return None


def refresh_merge_status(namespace: str, name: str) -> None:
    """Fold the merge Job into the ModelMerge status; on success, the merge's own report."""
    try:
        body = client.CustomObjectsApi(_client()).get_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, MERGE_PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    job, pods = _read_children(
        namespace, builders.child_name(name, "merge", limit=52), f"{builders.MERGE_LABEL}={name}"
    )
    if job is None and (body.get("status") or {}).get("phase") in status.FINISHED:
        return
    folded = status.fold(status.Observed(job, pods, False, trainer_step=1, gpus_per_pod=0))
    phase = {"Preparing": "Running", "Suspended": "Pending"}.get(folded.phase, folded.phase)
    current = body.get("status") or {}
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
    patch: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": status.merge_conditions(
            list(current.get("conditions") or []), folded, generation
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
        for key in ("outputUri", "sha256", "shortHash", "sizeBytes", "tensors", "durationSeconds"):
            if key in report:
                patch[key] = report[key]
    if current.get("phase") != phase:
        kind = "Warning" if phase == "Failed" else "Normal"
        kopf.event(body, type=kind, reason=phase, message=detail[:1024])
    _patch_merge_status(namespace, name, patch)
    metrics.record_phase("ModelMerge", namespace, name, phase, folded.reason)


@kopf.on.field(api.GROUP, api.VERSION, PLURAL, field="status.step")
async def trainer_reported(namespace: str, name: str, **_: Any) -> None:
    """The trainer's first step report moves Preparing to Running."""
    await asyncio.to_thread(refresh_status, namespace, name)
