"""A real Prometheus server on loopback, and the scrape configurations the tests give it.

The server is the pinned release built by ``hack/build-binaries.sh`` (``prometheus`` and
``promtool``). Its scrape configuration is written by the test: static targets, or Kubernetes
discovery against the test API server with the relabelling the Prometheus Operator generates
from a PodMonitor or a ServiceMonitor (``pod_monitor_scrape_config``,
``service_monitor_scrape_config``), so the chart's monitors are exercised by Prometheus itself.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.infra.environment import ControlPlane, http_ok
from tests.infra.processes import ServerProcess, free_port

Obj = dict[str, Any]


def sanitize_label_name(name: str) -> str:
    """A Kubernetes label key as Prometheus's discovery names it (``app.kubernetes.io/x``)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _kubernetes_sd(control_plane: ControlPlane, role: str, namespaces: list[str] | None) -> Obj:
    pki = control_plane.pki
    assert pki is not None
    sd: Obj = {
        "role": role,
        "api_server": control_plane.server_url,
        "tls_config": {
            "ca_file": str(pki.ca_cert),
            "cert_file": str(pki.admin_cert),
            "key_file": str(pki.admin_key),
        },
    }
    if namespaces is not None:
        sd["namespaces"] = {"names": namespaces}
    return sd


def _selector_rules(selector: Obj, kind: str) -> list[Obj]:
    unsupported = set(selector) - {"matchLabels"}
    assert not unsupported, f"selector fields this harness does not translate: {unsupported}"
    return [
        {
            "action": "keep",
            "source_labels": [
                f"__meta_kubernetes_{kind}_label_{sanitize_label_name(key)}",
                f"__meta_kubernetes_{kind}_labelpresent_{sanitize_label_name(key)}",
            ],
            "regex": f"({value});true",
        }
        for key, value in sorted(selector.get("matchLabels", {}).items())
    ]


def _namespaces(selector: Obj, own: str) -> list[str] | None:
    if selector.get("any"):
        return None
    return list(selector.get("matchNames") or [own])


def _address_rules(addresses: dict[str, str]) -> list[Obj]:
    """Pods here have no network (no kubelet runs them): their processes run on loopback, so
    each discovered pod's address is replaced by where its process listens, and a target left
    with any other address (a pod's reported IP) is dropped, never dialled."""
    assert all(a.startswith("127.0.0.1:") for a in addresses.values()), addresses
    return [
        *(
            {
                "source_labels": ["__meta_kubernetes_pod_name"],
                "regex": re.escape(pod),
                "target_label": "__address__",
                "replacement": address,
            }
            for pod, address in sorted(addresses.items())
        ),
        {"action": "keep", "source_labels": ["__address__"], "regex": r"127\.0\.0\.1:[0-9]+"},
    ]


def pod_monitor_scrape_config(
    monitor: Obj, control_plane: ControlPlane, addresses: dict[str, str], interval: str = "1s"
) -> list[Obj]:
    """The scrape configs the Prometheus Operator (v0.85, pkg/prometheus/promcfg.go,
    generatePodMonitorConfig) makes from ``monitor``: pod discovery, running pods only, the
    selector's labels, the endpoint's port name, then the target labels namespace, container,
    pod, job (``<namespace>/<name>``) and endpoint."""
    meta, spec = monitor["metadata"], monitor["spec"]
    configs = []
    for index, endpoint in enumerate(spec["podMetricsEndpoints"]):
        port = endpoint["port"]
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            {
                "action": "drop",
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
            },
            *_selector_rules(spec["selector"], "pod"),
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": port,
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {
                "source_labels": ["__meta_kubernetes_pod_container_name"],
                "target_label": "container",
            },
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
            {"target_label": "endpoint", "replacement": port},
            *_address_rules(addresses),
        ]
        namespaces = _namespaces(spec.get("namespaceSelector") or {}, meta["namespace"])
        configs.append(
            {
                "job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/{index}",
                "honor_labels": bool(endpoint.get("honorLabels", False)),
                "metrics_path": endpoint.get("path", "/metrics"),
                "scrape_interval": interval,
                "kubernetes_sd_configs": [_kubernetes_sd(control_plane, "pod", namespaces)],
                "relabel_configs": relabel,
            }
        )
    return configs


def service_monitor_scrape_config(
    monitor: Obj, control_plane: ControlPlane, addresses: dict[str, str], interval: str = "1s"
) -> list[Obj]:
    """The scrape configs the Prometheus Operator (v0.85, generateServiceMonitorConfig, role
    endpoints) makes from ``monitor``: the Service's labels, the endpoint's port name, the
    target labels pod, namespace, service, container, running pods only, job (the Service's
    name) and endpoint."""
    meta, spec = monitor["metadata"], monitor["spec"]
    target = ["__meta_kubernetes_endpoint_address_target_kind"]
    target.append("__meta_kubernetes_endpoint_address_target_name")
    configs = []
    for index, endpoint in enumerate(spec["endpoints"]):
        port = endpoint["port"]
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            *_selector_rules(spec["selector"], "service"),
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_endpoint_port_name"],
                "regex": port,
            },
            {
                "source_labels": target,
                "separator": ";",
                "regex": "Node;(.*)",
                "replacement": "${1}",
                "target_label": "node",
            },
            {
                "source_labels": target,
                "separator": ";",
                "regex": "Pod;(.*)",
                "replacement": "${1}",
                "target_label": "pod",
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {
                "source_labels": ["__meta_kubernetes_pod_container_name"],
                "target_label": "container",
            },
            {
                "action": "drop",
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
            },
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
            {"target_label": "endpoint", "replacement": port},
            *_address_rules(addresses),
        ]
        namespaces = _namespaces(spec.get("namespaceSelector") or {}, meta["namespace"])
        configs.append(
            {
                "job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/{index}",
                "honor_labels": bool(endpoint.get("honorLabels", False)),
                "metrics_path": endpoint.get("path", "/metrics"),
                "scrape_interval": interval,
                "kubernetes_sd_configs": [_kubernetes_sd(control_plane, "endpoints", namespaces)],
                "relabel_configs": relabel,
            }
        )
    return configs


def static_scrape_config(
    name: str, address: str, labels: dict[str, str], honor_labels: bool, interval: str = "1s"
) -> Obj:
    """One static target with the given target labels."""
    return {
        "job_name": name,
        "honor_labels": honor_labels,
        "scrape_interval": interval,
        "static_configs": [{"targets": [address], "labels": labels}],
    }


class PrometheusQueryError(AssertionError):
    """Prometheus refused a query (its message says why: a parse error, a bad matcher...)."""


@dataclass
class Prometheus:
    """The pinned Prometheus server on a loopback port, with a TSDB in ``work_dir``."""

    bin_dir: Path
    work_dir: Path
    scrape_configs: list[Obj] = field(default_factory=list)
    port: int = 0
    process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        path = self.work_dir / "prometheus.yml"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": self.scrape_configs,
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        check = subprocess.run(
            [str(self.bin_dir / "promtool"), "check", "config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, f"promtool check config:\n{check.stdout}{check.stderr}"
        return path

    def start(self) -> None:
        binary = self.bin_dir / "prometheus"
        if not binary.exists():
            raise FileNotFoundError(
                f"{binary} is missing: hack/build-binaries.sh builds it (PROMETHEUS_VERSION in "
                "hack/versions.env), or put a ready one in DIFFTRAIN_TEST_ASSETS"
            )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        self.port = self.port or free_port()
        self.process = ServerProcess(
            "prometheus",
            [
                str(binary),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.work_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            self.work_dir,
        )
        self.process.start()
        self.process.wait_ready(lambda: http_ok(f"{self.url}/-/ready"), 60)

    def reload(self) -> None:
        """Apply ``scrape_configs`` as they are now (the server's /-/reload)."""
        self._write_config()
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200, resp.status

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise PrometheusQueryError(
                f"{path} {params}: {exc.code} {body.get('errorType')}: {body.get('error')}"
            ) from exc
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[Obj]:
        """An instant query's series: ``[{"metric": {labels}, "value": float}]``."""
        data = self._get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", f"{expr} gave a {data['resultType']}"
        return [{"metric": s["metric"], "value": float(s["value"][1])} for s in data["result"]]

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` offers."""
        values: list[str] = self._get(f"/api/v1/label/{label}/values", **{"match[]": match})
        return values

    def targets(self) -> list[Obj]:
        """The active targets with their labels, health and last error."""
        active: list[Obj] = self._get("/api/v1/targets", state="active")["activeTargets"]
        return active


def finite(series: list[Obj]) -> bool:
    """Every series has a number (a quantile over no observations, or 0/0, is NaN)."""
    return all(not math.isnan(s["value"]) for s in series)


def promtool_check_metrics(bin_dir: Path, exposition: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on an exposition text (the linter Prometheus ships)."""
    return subprocess.run(
        [str(bin_dir / "promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
    )
