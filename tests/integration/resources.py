"""Helpers to create difftrain resources through the real API server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kubernetes import client

from difftrain import api

PLURALS = {"DiffusionTrainingJob": "diffusiontrainingjobs", "ModelMerge": "modelmerges"}


def training_job(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/sd15"},
        "dataset": {"uri": "s3://datasets/pets"},
        "output": {"uri": "s3://runs/pets"},
        "storage": {"endpoint": "minio:9000", "secretRef": {"name": "minio-credentials"}},
    }
    body.update(spec)
    return {
        "apiVersion": api.API_VERSION,
        "kind": "DiffusionTrainingJob",
        "metadata": {"name": name},
        "spec": body,
    }


def model_merge(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "models": [{"uri": "/m/a.safetensors"}, {"uri": "/m/b.safetensors"}],
        "output": {"uri": "/m/out.safetensors"},
    }
    body.update(spec)
    return {
        "apiVersion": api.API_VERSION,
        "kind": "ModelMerge",
        "metadata": {"name": name},
        "spec": body,
    }


def create(kube_api, namespace: str, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    """Create a resource with strict field validation, as kubectl does."""
    from kubernetes import client

    kwargs: dict[str, Any] = {"field_validation": "Strict"}
    if dry_run:
        kwargs["dry_run"] = "All"
    result = client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, PLURALS[body["kind"]], body, **kwargs
    )
    assert isinstance(result, dict)
    return result


def refusal(kube_api, namespace: str, body: dict[str, Any]) -> str:
    """The API server's message for a body it must refuse."""
    from kubernetes.client.exceptions import ApiException

    try:
        create(kube_api, namespace, body)
    except ApiException as exc:
        assert exc.status in (400, 422), exc
        return str(exc.body)
    raise AssertionError(f"the API server accepted {body}")


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})")


def wait_for_event(
    kube_api, namespace: str, reason: str, type: str | None = None, timeout: float = 60.0
) -> Any:
    """Wait for an Event with ``reason`` (and ``type``) in ``namespace``: Kopf posts its events
    from a queue of its own, after the handler's status patch, so a test that has seen the status
    may not see the event yet."""
    core = client.CoreV1Api(kube_api)
    return wait_for(
        lambda: next(
            (
                e
                for e in core.list_namespaced_event(namespace).items
                if e.reason == reason and (type is None or e.type == type)
            ),
            None,
        ),
        timeout=timeout,
        what=f"an Event {reason}" + (f" of type {type}" if type else ""),
    )
