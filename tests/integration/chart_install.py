"""The chart rendered with given values, its RBAC and peering objects installed for one test, and
`difftrain operator` run as its Deployment would run it (arguments, environment, ServiceAccount).

Each test renders into a release namespace of its own, so its ServiceAccount holds only what that
rendering grants; cluster-scoped objects get the test's suffix, so tests with different values do
not share (or overwrite) a ClusterRole. Everything is deleted afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, utils

from tests.infra.environment import REPO

CHART = REPO / "charts" / "difftrain"
KUBE_VERSION = next(
    line.split("=", 1)[1]
    for line in (REPO / "hack" / "versions.env").read_text().splitlines()
    if line.startswith("KUBERNETES_VERSION=")
)
INSTALLED_KINDS = {
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "KopfPeering",
    "ClusterKopfPeering",
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
# a missing permission shows in an operator's log even when a test passes
FORBIDDEN = re.compile(r"\b403\b|Forbidden")
# the operator's own ports would clash between replicas on one host; a test does not need them
HOST_ARGS = ("--liveness", "--metrics-port")

Doc = dict[str, Any]


def helm(control_plane: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(control_plane.bin_dir / "helm"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def render(control_plane: Any, release_namespace: str, *values: str) -> list[Doc]:
    """`helm template` of the chart with ``--set`` values, as documents."""
    args = ["template", "difftrain", str(CHART), "--namespace", release_namespace]
    args += ["--kube-version", KUBE_VERSION]
    for value in values:
        args += ["--set", value]
    return [d for d in yaml.safe_load_all(helm(control_plane, *args).stdout) if d]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def install_peering_crds(control_plane: Any) -> None:
    for crd in sorted((CHART / "crds").glob("kopf.dev_*.yaml")):
        control_plane.kubectl("apply", "--server-side", "-f", str(crd))
    control_plane.wait_established("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")


@dataclass
class Installed:
    """One rendering's RBAC and peering objects on the API server, for one test."""

    kube_api: client.ApiClient
    release_namespace: str
    docs: list[Doc]
    created: list[Doc] = field(default_factory=list)

    @property
    def service_account(self) -> str:
        name: str = one(self.docs, "ServiceAccount")["metadata"]["name"]
        return name

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.release_namespace}:{self.service_account}"

    def deployment(self) -> Doc:
        return one(self.docs, "Deployment")

    def kubeconfig(self, control_plane: Any, path: Path) -> Path:
        """A kubeconfig that logs in with the chart's ServiceAccount token."""
        token = (
            client.CoreV1Api(self.kube_api)
            .create_namespaced_service_account_token(
                self.service_account, self.release_namespace, {"spec": {"expirationSeconds": 3600}}
            )
            .status.token
        )
        config = yaml.safe_load(control_plane.kubeconfig.read_text())
        config["users"] = [{"name": "admin", "user": {"token": token}}]
        path.write_text(yaml.safe_dump(config))
        return path

    def may(self, verb: str, resource: str, namespace: str = "", **attrs: str) -> bool:
        """Whether the chart's ServiceAccount may do this (a SubjectAccessReview)."""
        review = {
            "spec": {
                "user": self.user,
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{self.release_namespace}",
                ],
                "resourceAttributes": {
                    "verb": verb,
                    "resource": resource,
                    "namespace": namespace,
                    **attrs,
                },
            }
        }
        result = client.AuthorizationV1Api(self.kube_api).create_subject_access_review(review)
        return bool(result.status.allowed)

    def remove(self) -> None:
        for doc in reversed(self.created):
            meta = doc["metadata"]
            api_version, kind = doc["apiVersion"], doc["kind"]
            group, _, version = api_version.rpartition("/")
            try:
                if kind in ("KopfPeering", "ClusterKopfPeering"):
                    objects = client.CustomObjectsApi(self.kube_api)
                    plural = kind.lower() + "s"
                    if kind == "KopfPeering":
                        objects.delete_namespaced_custom_object(
                            group, version, meta["namespace"], plural, meta["name"]
                        )
                    else:
                        objects.delete_cluster_custom_object(group, version, plural, meta["name"])
                elif kind == "ClusterRole":
                    client.RbacAuthorizationV1Api(self.kube_api).delete_cluster_role(meta["name"])
                elif kind == "ClusterRoleBinding":
                    rbac = client.RbacAuthorizationV1Api(self.kube_api)
                    rbac.delete_cluster_role_binding(meta["name"])
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
        # the rest is namespaced: it goes with the release namespace and the test's namespace
        client.CoreV1Api(self.kube_api).delete_namespace(self.release_namespace)


def install(kube_api: client.ApiClient, docs: list[Doc], suffix: str) -> Installed:
    """Create the rendering's RBAC and peering objects (the release namespace too)."""
    sa = one(docs, "ServiceAccount")
    release_namespace = sa["metadata"]["namespace"]
    client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": release_namespace}})
    installed = Installed(kube_api, release_namespace, docs)
    renamed = {}
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            renamed[doc["metadata"]["name"]] = f"{doc['metadata']['name']}-{suffix}"
    for doc in docs:
        if doc["kind"] not in INSTALLED_KINDS:
            continue
        doc = yaml.safe_load(yaml.safe_dump(doc))  # a copy
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            doc["metadata"]["name"] = renamed[doc["metadata"]["name"]]
        if doc["kind"] == "ClusterRoleBinding":
            doc["roleRef"]["name"] = renamed[doc["roleRef"]["name"]]
        if doc["kind"] == "ClusterKopfPeering":
            # one cluster-wide peering object per name: a test's own is suffixed, and its
            # operators must be told (--peering)
            raise AssertionError("render with watchNamespaces: the ClusterKopfPeering is shared")
        namespace = doc["metadata"].get("namespace", release_namespace)
        if doc["kind"] in ("KopfPeering",):
            group, _, version = doc["apiVersion"].rpartition("/")
            client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
                group, version, namespace, "kopfpeerings", doc
            )
        else:
            utils.create_from_dict(kube_api, doc, namespace=namespace)
        installed.created.append(doc)
    return installed


def operator_process(
    deployment: Doc, kubeconfig: Path, log_path: Path, pod_id: str
) -> subprocess.Popen[bytes]:
    """`difftrain operator` with the Deployment's arguments and environment (values only)."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "operator"
    args = [a for a in container["args"][1:] if not a.startswith(HOST_ARGS)]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env |= {"POD_ID": pod_id, "KUBECONFIG": str(kubeconfig)}
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "difftrain.cli", "operator", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **env),
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM (a clean stop: Kopf leaves the peering), SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
