"""A real Kueue controller manager against the test control plane, and its queue objects.

Kueue is built from its Go module at the version pinned in ``hack/versions.env``
(``hack/build-binaries.sh`` also copies the same module's CRDs and webhook manifests into
``<bin>/kueue-manifests``). It runs out of cluster, as the control plane's admin, with:

- internal certificate management off: its webhook server serves a certificate signed by the test
  CA (valid for 127.0.0.1), and the webhook configurations from its manifests are registered with a
  URL pointing at it, keeping the webhooks of Kueue's own kinds and of the integrations turned on
  (Kueue answers the others' paths with no-op handlers; leaving them out keeps every Pod, Deployment
  and StatefulSet of the session away from Kueue);
- only the ``batch/job`` integration, no leader election, no visibility API server;
- its metrics server's certificate where Kueue reads it without internal certificate management
  (``/etc/kueue/metrics/certs``, a path built into Kueue): in a mount namespace of Kueue's own, over
  an overlay of ``/etc``, so nothing on the machine is written.

The CRDs that Kueue's kustomization gives a conversion webhook (``v1beta1`` <-> ``v1beta2``) get it
too, at the same URL, once Kueue serves it; these helpers use ``v1beta2``, the storage version.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.infra.environment import ControlPlane, http_ok
from tests.infra.processes import ServerProcess, free_port

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
GPU = "nvidia.com/gpu"
# Kueue's integrations that are turned on, with the (API group, resource) their webhooks intercept
FRAMEWORKS = {"batch/job": ("batch", "jobs")}
NAMESPACE = "kueue-system"
# the names Kueue's own kustomization gives the webhook configurations
WEBHOOK_CONFIGURATIONS = {
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}

# Runs in a fresh mount namespace: /etc becomes an overlay whose upper layer (on a tmpfs) holds the
# metrics certificate where Kueue looks for it; then the shell becomes Kueue.
_MOUNT_AND_EXEC = """set -e
mount -t tmpfs -o mode=0700 tmpfs "$KUEUE_OVERLAY"
mkdir -p "$KUEUE_OVERLAY/upper/kueue/metrics/certs" "$KUEUE_OVERLAY/work"
cp "$KUEUE_CERT" "$KUEUE_OVERLAY/upper/kueue/metrics/certs/tls.crt"
cp "$KUEUE_KEY" "$KUEUE_OVERLAY/upper/kueue/metrics/certs/tls.key"
mount -t overlay overlay \
  -o "lowerdir=/etc,upperdir=$KUEUE_OVERLAY/upper,workdir=$KUEUE_OVERLAY/work" /etc
exec "$0" "$@"
"""


@dataclass
class Kueue:
    """Kueue's controller manager, its CRDs and its webhooks on the given control plane."""

    bin_dir: Path
    work_dir: Path
    control_plane: ControlPlane
    webhook_port: int = 0
    health_port: int = 0
    metrics_port: int = 0
    process: ServerProcess | None = None
    registered: list[tuple[str, str]] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    @property
    def manifests(self) -> Path:
        return self.bin_dir / "kueue-manifests"

    def start(self) -> None:
        if not (self.bin_dir / "kueue").exists() or not (self.manifests / "crds").is_dir():
            raise RuntimeError(
                f"no kueue binary or kueue-manifests/ in {self.bin_dir}: run hack/build-binaries.sh"
            )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._install_crds()
        self._apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        self.webhook_port, self.health_port = free_port(), free_port()
        self.metrics_port = free_port()
        config = self._write_config()
        self.process = ServerProcess("kueue", self._argv(config), self.work_dir, env=self._env())
        self.process.start()
        self.process.wait_ready(lambda: http_ok(f"http://127.0.0.1:{self.health_port}/readyz"), 120)
        self._register_webhooks()
        self._enable_conversion()

    def stop(self) -> None:
        # webhooks first: with Kueue gone they would refuse every Job's creation and v1beta1 read
        for crd in self.converted:
            patch = {"spec": {"conversion": {"strategy": "None", "webhook": None}}}
            self.control_plane.kubectl(
                "patch", "crd", crd, "--type=merge", "-p", json.dumps(patch), check=False
            )
        self.converted.clear()
        for kind, name in reversed(self.registered):
            self.control_plane.kubectl(
                "delete", kind.lower(), name, "--ignore-not-found", check=False
            )
        self.registered.clear()
        if self.process is not None:
            self.process.stop()

    # -- set-up steps --------------------------------------------------------------------------

    def _install_crds(self) -> None:
        crds = sorted((self.manifests / "crds").glob("*.yaml"))
        self.control_plane.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", str(self.manifests / "crds")
        )
        names = [yaml.safe_load(p.read_text(encoding="utf-8"))["metadata"]["name"] for p in crds]
        self.control_plane.wait_established(*names)

    def _write_config(self) -> Path:
        pki = self.control_plane.pki
        assert pki is not None
        cert_dir = self.work_dir / "webhook-certs"
        cert_dir.mkdir(exist_ok=True)
        # the API server's serving certificate: signed by the test CA, valid for 127.0.0.1
        shutil.copyfile(pki.server_cert, cert_dir / "tls.crt")
        shutil.copyfile(pki.server_key, cert_dir / "tls.key")
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{self.metrics_port}"},
            "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(cert_dir)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": list(FRAMEWORKS)},
            # the pending-workloads API would need an APIService the API server can reach
            "featureGates": {"VisibilityOnDemand": False},
            "clientConnection": {"qps": 50, "burst": 100},
        }
        path = self.work_dir / "kueue-config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    def _argv(self, config: Path) -> list[str]:
        unshare = shutil.which("unshare")
        if unshare is None:
            raise RuntimeError("Kueue's metrics certificate needs util-linux's unshare")
        # as root a mount namespace is enough; otherwise a user namespace makes us root in it
        ns = ["--mount"] if os.geteuid() == 0 else ["--map-root-user", "--mount"]
        return [
            unshare,
            *ns,
            "sh",
            "-c",
            _MOUNT_AND_EXEC,
            str(self.bin_dir / "kueue"),
            f"--config={config}",
            "--zap-log-level=info",
        ]

    def _env(self) -> dict[str, str]:
        pki = self.control_plane.pki
        assert pki is not None
        overlay = self.work_dir / "etc-overlay"
        overlay.mkdir(exist_ok=True)
        return {
            "KUBECONFIG": str(self.control_plane.kubeconfig),
            "KUEUE_OVERLAY": str(overlay),
            "KUEUE_CERT": str(pki.server_cert),
            "KUEUE_KEY": str(pki.server_key),
        }

    @staticmethod
    def _wanted(hook: dict[str, Any]) -> bool:
        """A webhook of Kueue's own kinds or of an integration that is turned on."""
        wanted = set(FRAMEWORKS.values())
        for rule in hook.get("rules") or []:
            groups, resources = rule.get("apiGroups") or [], rule.get("resources") or []
            if GROUP in groups or any((g, r) in wanted for g in groups for r in resources):
                return True
        return False

    def _register_webhooks(self) -> None:
        pki = self.control_plane.pki
        assert pki is not None
        ca_bundle = base64.b64encode(pki.ca_cert.read_bytes()).decode()
        text = (self.manifests / "webhooks.yaml").read_text(encoding="utf-8")
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            kept = [hook for hook in doc.get("webhooks") or [] if self._wanted(hook)]
            for hook in kept:
                url = f"https://127.0.0.1:{self.webhook_port}{hook['clientConfig']['service']['path']}"
                hook["clientConfig"] = {"url": url, "caBundle": ca_bundle}
            doc["webhooks"] = kept
            doc["metadata"] = {"name": WEBHOOK_CONFIGURATIONS[doc["kind"]]}
            self._apply(doc)
            self.registered.append((doc["kind"], doc["metadata"]["name"]))

    def _enable_conversion(self) -> None:
        """The conversion webhook on the CRDs whose ``webhook_in_<plural>.yaml`` patch Kueue's own
        CRD kustomization applies."""
        pki = self.control_plane.pki
        assert pki is not None
        kustomization = yaml.safe_load(
            (self.manifests / "crd-kustomization.yaml").read_text(encoding="utf-8")
        )
        for entry in kustomization.get("patches") or []:
            match = re.fullmatch(r"patches/webhook_in_(\w+)\.yaml", str(entry.get("path", "")))
            if not match:
                continue
            crd = f"{match.group(1)}.{GROUP}"
            webhook = {
                "clientConfig": {
                    "url": f"https://127.0.0.1:{self.webhook_port}/convert",
                    "caBundle": base64.b64encode(pki.ca_cert.read_bytes()).decode(),
                },
                "conversionReviewVersions": ["v1"],
            }
            patch = {"spec": {"conversion": {"strategy": "Webhook", "webhook": webhook}}}
            self.control_plane.kubectl("patch", "crd", crd, "--type=merge", "-p", json.dumps(patch))
            self.converted.append(crd)

    def _apply(self, obj: dict[str, Any]) -> None:
        path = self.work_dir / f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(obj), encoding="utf-8")
        self.control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))


# -- queue objects ---------------------------------------------------------------------------------


def resource_flavor(name: str) -> dict[str, Any]:
    """A ResourceFlavor without node labels (any node, or none: admission is quota only)."""
    return {"apiVersion": API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": name}}


def cluster_queue(
    name: str,
    flavor: str,
    gpus: int | str = 1,
    quotas: dict[str, int | str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A ClusterQueue open to every namespace with ``gpus`` of ``nvidia.com/gpu`` quota.

    CPU, memory and ephemeral storage are covered too, with room to spare: Kueue finds a Job that
    requests a resource its ClusterQueue does not cover inadmissible. ``quotas`` adds or changes
    resources' nominal quotas; ``spec`` adds or replaces fields (``preemption``, ``cohortName``...).
    """
    nominal: dict[str, int | str] = {
        "cpu": 64,
        "memory": "512Gi",
        "ephemeral-storage": "4Ti",
        GPU: gpus,
        **(quotas or {}),
    }
    body: dict[str, Any] = {
        "namespaceSelector": {},
        "resourceGroups": [
            {
                "coveredResources": list(nominal),
                "flavors": [
                    {
                        "name": flavor,
                        "resources": [
                            {"name": res, "nominalQuota": str(q)} for res, q in nominal.items()
                        ],
                    }
                ],
            }
        ],
    }
    body.update(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": body,
    }


def local_queue(name: str, cluster_queue_name: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "LocalQueue",
        "metadata": {"name": name},
        "spec": {"clusterQueue": cluster_queue_name},
    }


def workload_priority_class(name: str, value: int) -> dict[str, Any]:
    """A WorkloadPriorityClass; a Job takes it with the ``kueue.x-k8s.io/priority-class`` label."""
    return {
        "apiVersion": API_VERSION,
        "kind": "WorkloadPriorityClass",
        "metadata": {"name": name},
        "value": value,
    }


_PLURALS = {
    "WorkloadPriorityClass": "workloadpriorityclasses",
    "ResourceFlavor": "resourceflavors",
    "ClusterQueue": "clusterqueues",
    "LocalQueue": "localqueues",
    "Workload": "workloads",
}


def create(kube_api, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    """Create a Kueue object (cluster-scoped unless ``namespace`` is given)."""
    from kubernetes import client

    api = client.CustomObjectsApi(kube_api)
    plural = _PLURALS[body["kind"]]
    if namespace is None:
        result = api.create_cluster_custom_object(GROUP, VERSION, plural, body)
    else:
        result = api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
    assert isinstance(result, dict)
    return result


def delete(kube_api, kind: str, name: str, namespace: str | None = None) -> None:
    """Delete a Kueue object if it is there (Kueue's finalizers may keep it a while)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(kube_api)
    try:
        if namespace is None:
            api.delete_cluster_custom_object(GROUP, VERSION, _PLURALS[kind], name)
        else:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, _PLURALS[kind], name)
    except ApiException as err:
        if err.status != 404:
            raise


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def is_true(obj: dict[str, Any] | None, kind: str) -> bool:
    cond = condition(obj or {}, kind)
    return bool(cond and cond.get("status") == "True")


@dataclass
class GpuQueue:
    """A ResourceFlavor, a ClusterQueue with GPU quota and a LocalQueue in one namespace."""

    flavor: str
    cluster_queue: str
    local_queue: str
    namespace: str


def create_gpu_queue(
    kube_api, namespace: str, gpus: int = 1, timeout: float = 60, **cluster_queue_spec: Any
) -> GpuQueue:
    """Create the three queue objects (unique names) and wait until both queues are active.

    ``cluster_queue_spec`` goes to :func:`cluster_queue` (``quotas=``, ``preemption=``, ...)."""
    suffix = uuid.uuid4().hex[:8]
    queue = GpuQueue(f"gpu-{suffix}", f"gpu-{suffix}", "gpus", namespace)
    create(kube_api, resource_flavor(queue.flavor))
    create(kube_api, cluster_queue(queue.cluster_queue, queue.flavor, gpus, **cluster_queue_spec))
    create(kube_api, local_queue(queue.local_queue, queue.cluster_queue), namespace)

    def active() -> bool:
        return is_true(get(kube_api, "ClusterQueue", queue.cluster_queue), "Active") and is_true(
            get(kube_api, "LocalQueue", queue.local_queue, namespace), "Active"
        )

    wait_for(
        active,
        timeout,
        f"ClusterQueue {queue.cluster_queue} and LocalQueue {queue.local_queue} active",
    )
    return queue


def delete_gpu_queue(kube_api, queue: GpuQueue) -> None:
    delete(kube_api, "LocalQueue", queue.local_queue, queue.namespace)
    delete(kube_api, "ClusterQueue", queue.cluster_queue)
    delete(kube_api, "ResourceFlavor", queue.flavor)


def get(kube_api, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(kube_api)
    try:
        if namespace is None:
            obj = api.get_cluster_custom_object(GROUP, VERSION, _PLURALS[kind], name)
        else:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, _PLURALS[kind], name)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    assert isinstance(obj, dict)
    return obj


def workload_of(kube_api, namespace: str, owner_uid: str) -> dict[str, Any] | None:
    """The Workload Kueue made for the object with this uid (a Job's), if there is one yet."""
    from kubernetes import client

    items = client.CustomObjectsApi(kube_api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, "workloads"
    )["items"]
    for wl in items:
        if any(ref.get("uid") == owner_uid for ref in wl["metadata"].get("ownerReferences") or []):
            return dict(wl)
    return None


def workload_state(wl: dict[str, Any] | None) -> str:
    """``none`` (not made yet), ``finished``, ``admitted``, ``evicted`` or ``pending``."""
    if wl is None:
        return "none"
    for kind in ("Finished", "Admitted", "Evicted"):
        if is_true(wl, kind):
            return kind.lower()
    return "pending"


def wait_for(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
