"""The dashboard answers per job, for real: Prometheus (the pinned release) scrapes three tiny
training runs, the operator, and two stand-ins of the DCGM exporter, and every dashboard query,
with its variables set to one job, returns that job's series and no other job's.

What runs for real: the API server and controller-manager (the operator's Jobs make the pods),
the operator (`difftrain operator`), three `difftrain run` trainings serving /metrics, Prometheus
discovering the pods and the operator's Service endpoints through the API server with the
relabelling the Prometheus Operator generates from the chart's PodMonitor and ServiceMonitor.
What cannot run here: no kubelet runs the pods (their processes run on loopback, and each pod's
address is rewritten to its process's port), and no DCGM exporter (it needs NVIDIA's DCGM library
and a GPU): two small servers expose the DCGM exporter's metric names and labels instead, one
scraped as with honorLabels (its pod/namespace labels kept) and one without (Prometheus renames
them exported_pod/exported_namespace), so the GPU panels' join is checked in both layouts — not
the exporter itself.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, utils
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.infra.environment import REPO
from tests.infra.processes import free_port, start_operator
from tests.infra.prometheus import (
    Prometheus,
    finite,
    pod_monitor_scrape_config,
    promtool_check_metrics,
    service_monitor_scrape_config,
    static_scrape_config,
)
from tests.integration.resources import create, training_job, wait_for
from tests.training import prepare_local_inputs, tiny_job, write_job, write_tiny_clip_model

pytestmark = pytest.mark.usefixtures("crds_installed")

CHART = REPO / "charts" / "difftrain"
DASHBOARD = CHART / "dashboards" / "difftrain.json"
KUBE_VERSION = next(
    line.split("=", 1)[1]
    for line in (REPO / "hack" / "versions.env").read_text().splitlines()
    if line.startswith("KUBERNETES_VERSION=")
)
GPU_METRICS = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE")


def grafana_interpolate(expr: str, variables: dict[str, str]) -> str:
    """The query Grafana sends with one value selected for each variable (regex-escaped, since
    the dashboard matches variables with =~)."""
    for name, value in variables.items():
        expr = _substitute(expr, name, re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\1", value))
    return expr


def _substitute(expr: str, name: str, value: str) -> str:
    # a replacement function, so the value's backslashes are not read as group references
    return re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", lambda _m: value, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) for every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def is_gpu_query(expr: str) -> bool:
    return any(name in expr for name in GPU_METRICS)


def is_operator_query(expr: str) -> bool:
    return "difftrain_operator_" in expr and not is_gpu_query(expr)


@dataclass(frozen=True)
class TrainingRun:
    name: str
    namespace: str
    pod: str
    port: int


@dataclass
class MonitoredStack:
    prometheus: Prometheus
    runs: list[TrainingRun]
    operator_metrics: str
    release_namespace: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)


def render(control_plane, namespace: str, *values: str) -> list[dict[str, Any]]:
    args = [str(control_plane.bin_dir / "helm"), "template", "difftrain", str(CHART)]
    args += ["--namespace", namespace, "--kube-version", KUBE_VERSION]
    for value in values:
        args += ["--set", value]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


# A pod's address as a kubelet would report it. The API server refuses loopback addresses in a
# Service's endpoints, so a documentation address (TEST-NET-1) stands in; Prometheus never dials
# it: each target's address is replaced by its process's loopback port, and any other is dropped.
POD_IP = "192.0.2.10"


def pretend_running(core: client.CoreV1Api, pod: str, namespace: str, node: str) -> None:
    """The scheduler's binding to ``node``, then what a kubelet would report for a started,
    ready pod (a Service's endpoints list only pods on a node)."""
    binding = {
        "metadata": {"name": pod},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    }
    core.create_namespaced_binding(namespace, binding, _preload_content=False)
    now = "2026-12-01T12:00:00Z"
    core.patch_namespaced_pod_status(
        pod,
        namespace,
        {
            "status": {
                "phase": "Running",
                "podIP": POD_IP,
                "podIPs": [{"ip": POD_IP}],
                "hostIP": POD_IP,
                "startTime": now,
                "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                ],
            }
        },
    )


def pods_of(core: client.CoreV1Api, namespace: str, selector: str) -> list[str]:
    return [
        p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=selector).items
    ]


def dcgm_stand_in(gpus: list[dict[str, str]], servers: list[Any]) -> int:
    """A /metrics endpoint with the DCGM exporter's GPU metrics and labels for ``gpus``."""
    registry = CollectorRegistry()
    labels = ["gpu", "UUID", "device", "modelName", "Hostname", "container", "namespace", "pod"]
    gauges = [
        Gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels, registry=registry),
        Gauge(
            "DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels, registry=registry
        ),
        Gauge("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", labels, registry=registry),
    ]
    for gpu in gpus:
        values = {
            "gpu": gpu["gpu"],
            "UUID": f"GPU-{uuid.uuid4()}",
            "device": f"nvidia{gpu['gpu']}",
            "modelName": "NVIDIA H100 80GB HBM3",
            "Hostname": "gpu-node-1",
            # an idle GPU has empty pod labels (the exporter leaves them out)
            "container": "trainer" if gpu.get("pod") else "",
            "namespace": gpu.get("namespace", ""),
            "pod": gpu.get("pod", ""),
        }
        for gauge, value in zip(gauges, (87.0, 40_000.0, 512.0), strict=True):
            gauge.labels(**values).set(value)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    servers.append(server)
    return port


def start_training(job: dict[str, Any], work: Path, run: TrainingRun) -> subprocess.Popen[str]:
    path = write_job(work / f"{run.namespace}-{run.name}.yaml", job)
    env = {
        **os.environ,
        # what the operator's pod gives the trainer (builders.py), minus the cluster
        "DIFFTRAIN_JOB_NAME": run.name,
        "DIFFTRAIN_NAMESPACE": run.namespace,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "difftrain", "run", str(path), "--local", "--work-dir"]
    argv.append(str(work / f"work-{run.namespace}-{run.name}"))  # one each: scratch is not shared
    with (work / f"{run.namespace}-{run.name}.log").open("w") as log:  # the child keeps a copy
        return subprocess.Popen(
            [*argv, "--metrics-port", str(run.port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )


@pytest.fixture(scope="module")
def stack(control_plane, kube_api, tmp_path_factory) -> Iterator[MonitoredStack]:
    work = tmp_path_factory.mktemp("prometheus-stack")
    core = client.CoreV1Api(kube_api)
    suffix = uuid.uuid4().hex[:6]
    release_ns, ns1, ns2 = f"mon-{suffix}", f"jobs-a-{suffix}", f"jobs-b-{suffix}"
    for ns in (release_ns, ns1, ns2):
        core.create_namespace({"metadata": {"name": ns}})
    node = f"gpu-node-{suffix}"  # a Node object only: no kubelet
    core.create_node({"metadata": {"name": node}})
    processes: list[subprocess.Popen[str]] = []
    servers: list[Any] = []
    prometheus = Prometheus(control_plane.bin_dir, work / "prometheus")
    operator = None
    try:
        for ns in (ns1, ns2):
            core.create_namespaced_secret(
                ns,
                {
                    "metadata": {"name": "minio-credentials"},
                    "stringData": {"accessKey": "a", "secretKey": "b"},
                },
            )
        docs = render(
            control_plane,
            release_ns,
            "monitoring.podMonitor.enabled=true",
            "monitoring.serviceMonitor.enabled=true",
            f"watchNamespaces={{{ns1},{ns2}}}",
        )
        by_kind = {d["kind"]: d for d in docs if d["kind"] != "ConfigMap"}
        # The chart's operator Deployment, Service and ServiceAccount: the controller-manager
        # makes the operator's pod and, once it is ready, the Service's endpoints.
        for kind in ("ServiceAccount", "Service", "Deployment"):
            utils.create_from_dict(kube_api, by_kind[kind], namespace=release_ns)
        selector = ",".join(
            f"{k}={v}" for k, v in by_kind["Deployment"]["spec"]["selector"]["matchLabels"].items()
        )
        (operator_pod,) = wait_for(
            lambda: pods_of(core, release_ns, selector), what="the operator's pod"
        )
        pretend_running(core, operator_pod, release_ns, node)

        operator_port = free_port()
        operator = start_operator(
            control_plane.kubeconfig,
            ns1,
            work / "operator.log",
            "--namespace",
            ns2,
            "--metrics-port",
            str(operator_port),
        )
        operator_metrics = f"http://127.0.0.1:{operator_port}/metrics"
        wait_for(lambda: _reachable(operator_metrics), timeout=60, what="the operator's /metrics")
        monitors = {
            "service": service_monitor_scrape_config(
                by_kind["ServiceMonitor"],
                control_plane,
                {operator_pod: f"127.0.0.1:{operator_port}"},
            )
        }
        # before the resources exist, so Prometheus sees the operator reconcile them
        prometheus.scrape_configs = monitors["service"]
        prometheus.start()

        names = [("alpha", ns1), ("beta", ns1), ("alpha", ns2), ("finished", ns1)]
        for name, ns in names:
            create(kube_api, ns, training_job(name))
        pods: dict[tuple[str, str], str] = {}
        for name, ns in names:
            selector = f"difftrain.dev/job={name}"
            (pods[name, ns],) = wait_for(
                functools.partial(pods_of, core, ns, selector), what=f"the pod of {ns}/{name}"
            )
            pretend_running(core, pods[name, ns], ns, node)
        # a finished job: its pod is no longer scraped, and the operator counts it Succeeded
        core.patch_namespaced_pod_status(
            pods["finished", ns1],
            ns1,
            {
                "status": {
                    "phase": "Succeeded",
                    "containerStatuses": [
                        {
                            "name": "trainer",
                            "image": "t",
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "state": {
                                "terminated": {
                                    "exitCode": 0,
                                    "reason": "Completed",
                                    "startedAt": "2026-12-01T12:00:00Z",
                                    "finishedAt": "2026-12-01T12:30:00Z",
                                }
                            },
                        }
                    ],
                }
            },
        )
        runs = [TrainingRun(name, ns, pods[name, ns], free_port()) for name, ns in names[:3]]

        inputs = prepare_local_inputs(work / "inputs", images=16)
        clip = write_tiny_clip_model(work / "clip")
        for run in runs:
            job = tiny_job(
                inputs,
                work / f"out-{run.namespace}-{run.name}",
                hyperparameters={
                    "batchSize": 2,
                    "learningRate": 1e-4,
                    "maxSteps": 100000,
                    "warmupSteps": 1,
                    "mixedPrecision": "no",
                },
                checkpointing={"everySteps": 3, "keepLast": 1},
                # the validation loss panel: a quarter of the images held out, evaluated often
                validation={"fraction": 0.25, "everySteps": 2, "maxImages": 2},
                # the CLIP score panel: samples scored every few steps
                sampling={
                    "everySteps": 4,
                    "numInferenceSteps": 1,
                    "prompts": ["a red circle"],
                    "clipModelUri": str(clip),
                },
            )
            processes.append(start_training(job, work, run))

        honoured = dcgm_stand_in(
            [
                {"gpu": "0", "namespace": ns1, "pod": runs[0].pod},
                {"gpu": "0", "namespace": ns2, "pod": runs[2].pod},
                {"gpu": "7"},
            ],
            servers,
        )
        exported = dcgm_stand_in(
            [
                {"gpu": "1", "namespace": ns1, "pod": runs[0].pod},
                {"gpu": "0", "namespace": ns1, "pod": runs[1].pod},
                {"gpu": "6"},
            ],
            servers,
        )
        exporter_labels = {
            "namespace": "gpu-operator",
            "pod": "nvidia-dcgm-exporter-x7k2p",
            "container": "nvidia-dcgm-exporter",
            "endpoint": "gpu-metrics",
        }
        prometheus.scrape_configs = [
            *monitors["service"],
            *pod_monitor_scrape_config(
                by_kind["PodMonitor"],
                control_plane,
                {run.pod: f"127.0.0.1:{run.port}" for run in runs},
            ),
            static_scrape_config(
                "dcgm-honor-labels",
                f"127.0.0.1:{honoured}",
                {**exporter_labels, "job": "nvidia-dcgm-exporter"},
                honor_labels=True,
            ),
            static_scrape_config(
                "dcgm",
                f"127.0.0.1:{exported}",
                {**exporter_labels, "job": "nvidia-dcgm-exporter"},
                honor_labels=False,
            ),
        ]
        prometheus.reload()
        yield MonitoredStack(prometheus, runs, operator_metrics, release_ns, processes)
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                operator.kill()
        prometheus.stop()
        for server in servers:
            server.shutdown()
        for log in sorted(work.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")  # shown when a test fails
        for ns in (release_ns, ns1, ns2):
            core.delete_namespace(ns)
        core.delete_node(node)


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text: str = resp.read().decode()
        return text


def _per_job_results(prometheus: Prometheus, run: TrainingRun) -> dict[str, list[dict[str, Any]]]:
    variables = {"namespace": run.namespace, "job": run.name}
    return {
        f"{title}: {expr}": prometheus.query(grafana_interpolate(expr, variables))
        for title, expr in dashboard_queries()
        if not is_operator_query(expr)
    }


def _waiting_for(prometheus: Prometheus, runs: list[TrainingRun]) -> list[str]:
    """The training panels' queries that have no number yet for some run (a rate needs two
    scrapes, the checkpoint quantile a checkpoint between them); the GPU panels' data are there
    from the start and are checked once, after."""
    return [
        f"{run.namespace}/{run.name}: {query}"
        for run in runs
        for query, series in _per_job_results(prometheus, run).items()
        if not is_gpu_query(query) and (not series or not finite(series))
    ]


def test_every_dashboard_query_answers_for_its_job_and_no_other(stack: MonitoredStack):
    prom, runs = stack.prometheus, stack.runs
    started = time.monotonic()

    deadline = time.monotonic() + 240
    while True:
        targets = prom.targets()
        if len([t for t in targets if t["health"] == "up"]) == 6:
            break
        for proc in stack.processes:
            assert proc.poll() is None, f"a training run ended ({proc.returncode}): see its log"
        assert time.monotonic() < deadline, (
            "not 6 targets up (operator, 3 trainers, 2 DCGM): "
            + str([(t["scrapePool"], t["health"], t["lastError"]) for t in targets])
        )
        time.sleep(1)
    # The PodMonitor found exactly the three running training pods (not the finished job's
    # pod, nor the operator's), with the target labels the Prometheus Operator gives them.
    trainer_targets = [
        t["labels"] for t in prom.targets() if t["scrapePool"].startswith("podMonitor/")
    ]
    assert sorted((t["namespace"], t["pod"]) for t in trainer_targets) == sorted(
        (r.namespace, r.pod) for r in runs
    )
    assert {t["job"] for t in trainer_targets} == {
        f"{stack.release_namespace}/difftrain-operator-trainers"
    }
    assert {t["container"] for t in trainer_targets} == {"trainer"}
    deadline = time.monotonic() + 300
    while missing := _waiting_for(prom, runs):
        assert time.monotonic() < deadline, f"no numbers after 300 s for {missing}"
        time.sleep(1)
    print(f"all per-job queries answered {time.monotonic() - started:.0f}s after start")

    # Our labels survive the scrape: Prometheus's own job/namespace did not rename them.
    for renamed in ("exported_job", "exported_namespace"):
        assert prom.query(f'{{__name__=~"difftrain_.+", {renamed}!=""}}') == []
    loss = prom.query(
        f'difftrain_loss{{training_job="alpha",training_namespace="{runs[0].namespace}"}}'
    )
    assert [s["metric"]["job"] for s in loss] == [trainer_targets[0]["job"]]

    # The variables offer what Grafana will list.
    ns1, ns2 = runs[0].namespace, runs[2].namespace
    assert {ns1, ns2} <= set(prom.label_values("training_namespace", "difftrain_step"))
    jobs_in_ns1 = prom.label_values(
        "training_job", f'difftrain_step{{training_namespace=~"{ns1}"}}'
    )
    assert sorted(jobs_in_ns1) == ["alpha", "beta"]

    expected_gpus = {runs[0]: {"0", "1"}, runs[1]: {"0"}, runs[2]: {"0"}}
    for run in runs:
        for query, series in _per_job_results(prom, run).items():
            assert series, f"{run.namespace}/{run.name}: no series for {query}"
            # per job: only this job's series, and none merged from another job
            found = {
                (s["metric"].get("training_namespace"), s["metric"].get("training_job"))
                for s in series
            }
            assert found == {(run.namespace, run.name)}, (query, found)
            if is_gpu_query(query):
                # both DCGM layouts join, the idle GPUs and other jobs' GPUs do not
                assert {s["metric"]["pod"] for s in series} == {run.pod}, query
                assert {s["metric"]["gpu"] for s in series} == expected_gpus[run], query
            if "Progress" in query:
                assert all(0 < s["value"] < 1 for s in series), series

    # The operator's panels (not per job) answer too (a panel: any of its queries).
    operator_panels: dict[str, list[dict[str, Any]]] = {}
    for title, expr in dashboard_queries():
        if is_operator_query(expr):
            operator_panels.setdefault(title, []).extend(prom.query(expr))
    assert operator_panels and all(operator_panels.values()), operator_panels
    finished = prom.query(
        'difftrain_operator_resources{kind="DiffusionTrainingJob",phase="Succeeded"}'
    )
    assert [s["value"] for s in finished] == [1.0]
    print(f"test took {time.monotonic() - started:.0f}s after the stack was up")


def test_promtool_check_metrics_passes_on_the_trainers_and_the_operators_output(
    stack: MonitoredStack, control_plane
):
    run = stack.runs[0]
    outputs = {
        "trainer": _scrape(f"http://127.0.0.1:{run.port}/metrics"),
        "operator": _scrape(stack.operator_metrics),
    }
    assert "difftrain_step{" in outputs["trainer"]
    assert "difftrain_operator_resources{" in outputs["operator"]
    for name, text in outputs.items():
        result = promtool_check_metrics(control_plane.bin_dir, text)
        assert result.returncode == 0, f"{name}:\n{result.stdout}{result.stderr}"
