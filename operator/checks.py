"""Checks that read the cluster before children are made: the store Secret and GPU capacity.

The Secret check needs ``get`` on Secrets (never list or watch) in the job's namespace; the chart
grants it there only when it watches given namespaces, cluster-wide otherwise.

Cached for a few seconds, so a burst of new resources that share a Secret and a node pool costs one
read, not one per resource. The calls block (they run in the loop's executor threads).
"""

from __future__ import annotations

import threading
import time

from kubernetes.client.exceptions import ApiException

from difftrain import api
from difftrain_operator.kube import Kube, Obj

CHECK_CACHE_SECONDS = 10.0

# A capacity finding: a problem (str), None when a node fits one worker, False when the nodes
# cannot be seen (a namespaced install).
Capacity = str | bool | None


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


class ClusterChecks:
    """The Secret and node checks of one operator, with their short-lived cache (thread-safe)."""

    def __init__(self, kube: Kube, cache_seconds: float = CHECK_CACHE_SECONDS) -> None:
        self.kube = kube
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._secrets: dict[tuple[str, str], tuple[float, set[str]]] = {}
        self._nodes: tuple[float, list[Obj] | None] | None = None

    def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        """The data keys of a Secret (None if it does not exist); a found Secret is cached."""
        with self._lock:
            cached = self._secrets.get((namespace, name))
            if cached and time.monotonic() - cached[0] < self.cache_seconds:
                return cached[1]
            try:
                secret = self.kube.get("Secret", namespace, name)
            except ApiException as exc:
                if exc.status == 404:
                    self._secrets.pop((namespace, name), None)
                    return None  # not cached: the retry must see it as soon as it is created
                raise
            keys = set(secret.get("data") or {})  # stringData is write-only: never read back
            self._secrets[(namespace, name)] = (time.monotonic(), keys)
            return keys

    def secret_missing(self, namespace: str, ref: api.SecretKeyRefs | None) -> str | None:
        """Why the store Secret cannot be used (None: it can, or none is needed)."""
        if ref is None:
            return None
        try:
            keys = self.secret_keys(namespace, ref.name)
        except ApiException as exc:
            if exc.status != 403:
                raise
            # the chart grants Secret get only in the namespaces it watches
            return (
                f"the operator may not read Secret {ref.name!r} (storage.secretRef) in "
                f"{namespace}: add {namespace} to the chart's watchNamespaces, or grant its "
                "ServiceAccount get on secrets there"
            )
        if keys is None:
            return f"Secret {ref.name!r} (storage.secretRef) does not exist in {namespace}"
        missing = [k for k in (ref.access_key_key, ref.secret_key_key) if k not in keys]
        if missing:
            return f"Secret {ref.name!r} has no key {missing[0]!r} (storage.secretRef)"
        return None

    def node_list(self) -> list[Obj] | None:
        """The nodes (None when this operator may not list them), cached for a few seconds."""
        with self._lock:
            if self._nodes and time.monotonic() - self._nodes[0] < self.cache_seconds:
                return self._nodes[1]
            try:
                nodes: list[Obj] | None = self.kube.nodes()
            except ApiException as exc:
                if exc.status != 403:
                    raise
                nodes = None  # a namespaced install may not see nodes; the scheduler says it later
            self._nodes = (time.monotonic(), nodes)
            return nodes

    def capacity(self, res: api.ResourcesSpec) -> Capacity:
        """A capacity problem, None if a node fits one worker, False if nodes cannot be seen."""
        nodes = self.node_list()
        if nodes is None:
            return False
        return gpu_shortfall(nodes, res.gpu_resource_name, res.gpus_per_worker)
