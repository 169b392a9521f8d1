"""The few REST calls the operator makes, with API-shaped dicts in and out.

The generated client validates every request body into its pydantic models and builds those
validators on first use; for the operator's burst of creates that was most of its CPU. This layer
keeps the client's configuration (kubeconfig or in-cluster login, TLS, token refresh) and its
connection pool, and sends JSON itself. Errors are the client's ``ApiException``, so callers handle
them the same way.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from kubernetes import client
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]

# kind -> (API prefix, plural) for every kind the operator writes
PATHS = MappingProxyType(
    {
        "ConfigMap": ("/api/v1", "configmaps"),
        "Secret": ("/api/v1", "secrets"),
        "Service": ("/api/v1", "services"),
        "ServiceAccount": ("/api/v1", "serviceaccounts"),
        "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
        "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
        "Job": ("/apis/batch/v1", "jobs"),
        "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    }
)

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def collection(kind: str, namespace: str) -> str:
    """The URL path of a namespaced collection of a built-in kind."""
    prefix, plural = PATHS[kind]
    return f"{prefix}/namespaces/{quote(namespace)}/{plural}"


def custom(group: str, version: str, namespace: str, plural: str, name: str) -> str:
    """The URL path of a custom resource."""
    return f"/apis/{group}/{version}/namespaces/{quote(namespace)}/{plural}/{quote(name)}"


class Kube:
    """JSON over the generated client's authenticated connection pool (thread-safe)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        parse: bool = True,
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        """One call; the parsed JSON response (None when ``parse`` is false)."""
        headers: dict[str, str] = {"Accept": "application/json"}
        # URL, default headers and authentication (a refreshed token in a pod) as the client does
        method, url, headers, _, _ = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query or ()),
            header_params=headers,
            auth_settings=["BearerToken"],
        )
        payload = None
        if body is not None:
            headers["Content-Type"] = content_type
            payload = json.dumps(body, separators=(",", ":")).encode()
        response = self.api_client.rest_client.pool_manager.request(
            method, url, body=payload, headers=headers, preload_content=True
        )
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)  # status, reason and the server's message
        return json.loads(response.data) if parse else None

    def create(self, obj: Obj) -> None:
        """POST a built-in object into its namespace (409 when it exists)."""
        meta = obj["metadata"]
        self.request("POST", collection(obj["kind"], meta["namespace"]), obj, parse=False)

    def get(self, kind: str, namespace: str, name: str) -> Obj:
        found: Obj = self.request("GET", f"{collection(kind, namespace)}/{quote(name)}")
        return found

    def patch(
        self, kind: str, namespace: str, name: str, patch: Any, content_type: str = MERGE_PATCH
    ) -> None:
        path = f"{collection(kind, namespace)}/{quote(name)}"
        self.request("PATCH", path, patch, content_type=content_type, parse=False)

    def delete(self, kind: str, namespace: str, name: str, options: Obj | None = None) -> None:
        """DELETE an object, with DeleteOptions (propagation policy, preconditions)."""
        path = f"{collection(kind, namespace)}/{quote(name)}"
        self.request("DELETE", path, options, parse=False)

    def patch_status(
        self, group: str, version: str, namespace: str, plural: str, name: str, status: Obj
    ) -> None:
        """Merge-patch a custom resource's status subresource."""
        path = custom(group, version, namespace, plural, name) + "/status"
        self.request("PATCH", path, {"status": status}, content_type=MERGE_PATCH, parse=False)

    def list_custom(
        self, group: str, version: str, namespace: str, plural: str, label_selector: str
    ) -> list[Obj]:
        """The custom objects of a namespace that match a label selector."""
        path = f"/apis/{group}/{version}/namespaces/{quote(namespace)}/{plural}"
        items: list[Obj] = self.request("GET", path, query=[("labelSelector", label_selector)])[
            "items"
        ]
        return items

    def patch_custom(
        self, group: str, version: str, namespace: str, plural: str, name: str, patch: Obj
    ) -> None:
        """Merge-patch a custom resource."""
        path = custom(group, version, namespace, plural, name)
        self.request("PATCH", path, patch, content_type=MERGE_PATCH, parse=False)

    def nodes(self) -> list[Obj]:
        items: list[Obj] = self.request("GET", "/api/v1/nodes")["items"]
        return items
