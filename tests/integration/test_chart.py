"""The Helm chart: it lints, renders, installs its RBAC, and the operator works with exactly
the permissions the chart grants (it runs with the chart's ServiceAccount token)."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from kubernetes import client, utils

from tests.infra.environment import REPO
from tests.infra.processes import start_operator
from tests.integration.resources import create, model_merge, training_job, wait_for

CHART = REPO / "charts" / "difftrain"
RELEASE_NS = "difftrain-system"
KUBE_VERSION = next(
    line.split("=", 1)[1]
    for line in (REPO / "hack" / "versions.env").read_text().splitlines()
    if line.startswith("KUBERNETES_VERSION=")
)
pytestmark = pytest.mark.usefixtures("crds_installed")


def helm(control_plane, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(control_plane.bin_dir / "helm"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def render_chart(control_plane, *values: str) -> str:
    """`helm template` of the chart for the pinned Kubernetes version (``values``: --set)."""
    args = ["template", "difftrain", str(CHART), "--namespace", RELEASE_NS]
    args += ["--kube-version", KUBE_VERSION]
    for value in values:
        args += ["--set", value]
    return helm(control_plane, *args).stdout


def rendered(control_plane, *values: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_chart(control_plane, *values)) if d]


def test_chart_lints_and_refuses_bad_values(control_plane):
    assert "0 chart(s) failed" in helm(control_plane, "lint", str(CHART)).stdout
    bad = helm(control_plane, "lint", str(CHART), "--set", "replicas=0", check=False)
    assert bad.returncode != 0
    assert "replicas" in bad.stdout + bad.stderr


def test_chart_passes_the_grace_period_cap_to_the_operator_and_refuses_a_short_one(control_plane):
    def operator_env(*values: str) -> dict[str, str]:
        args = ["template", "difftrain", str(CHART), "--namespace", RELEASE_NS]
        args += ["--kube-version", KUBE_VERSION]
        for value in values:
            args += ["--set", value]
        docs = [d for d in yaml.safe_load_all(helm(control_plane, *args).stdout) if d]
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        return {e["name"]: e.get("value") for e in env}

    assert operator_env()["DIFFTRAIN_TRAINER_MAX_GRACE_SECONDS"] == "0"  # no cap
    capped = operator_env("trainerMaxGracePeriodSeconds=120")
    assert capped["DIFFTRAIN_TRAINER_MAX_GRACE_SECONDS"] == "120"
    bad = helm(
        control_plane, "lint", str(CHART), "--set", "trainerMaxGracePeriodSeconds=10", check=False
    )
    assert bad.returncode != 0
    assert "trainerMaxGracePeriodSeconds" in bad.stdout + bad.stderr


def test_chart_renders_crds_identical_to_the_generated_ones(control_plane):
    for crd_file in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd_file.name).read_text() == crd_file.read_text()


@pytest.fixture
def chart_operator(control_plane, kube_api, namespace, tmp_path):
    """The chart's RBAC installed; `difftrain operator` running with the chart's SA token."""
    core = client.CoreV1Api(kube_api)
    try:
        core.create_namespace({"metadata": {"name": RELEASE_NS}})
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    rendered = render_chart(control_plane)
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    rbac = [d for d in docs if d["kind"] in {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}]
    assert len(rbac) == 3
    for doc in rbac:
        try:
            utils.create_from_dict(kube_api, doc, namespace=RELEASE_NS)
        except utils.FailToCreateError as exc:
            if not all(e.status == 409 for e in exc.api_exceptions):
                raise
    sa = rbac[0]["metadata"]["name"]
    token = core.create_namespaced_service_account_token(
        sa, RELEASE_NS, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    kubeconfig = yaml.safe_load(control_plane.kubeconfig.read_text())
    kubeconfig["users"] = [{"name": "admin", "user": {"token": token}}]
    path = tmp_path / "operator-kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    log_path = tmp_path / "operator.log"
    proc = start_operator(path, namespace, log_path)
    yield proc
    proc.terminate()
    proc.wait(timeout=20)
    log = log_path.read_text()
    print(log[-6000:])
    # a missing permission shows up as a 403 in the operator's log even when a test passes (not
    # just "403": a log line's milliseconds may read so, as 21:07:18,403 did in CI)
    assert "(403)" not in log and "Forbidden" not in log, log[-3000:]


def test_operator_works_with_exactly_the_charts_rbac(kube_api, namespace, chart_operator):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "creds"}, "stringData": {"accessKey": "a", "secretKey": "b"}},
    )
    storage = {"endpoint": "minio:9000", "secretRef": {"name": "creds"}}
    create(kube_api, namespace, training_job("rbac", storage=storage))
    create(kube_api, namespace, model_merge("rbac-merge"))
    batch = client.BatchV1Api(kube_api)
    wait_for(lambda: len(batch.list_namespaced_job(namespace).items) == 2, what="both Jobs")
    pods = wait_for(
        lambda: [
            p
            for p in core.list_namespaced_pod(namespace).items
            if p.metadata.labels.get("difftrain.dev/job") == "rbac"
        ],
        what="the training pod",
    )
    core.patch_namespaced_pod_status(
        pods[0].metadata.name, namespace, {"status": {"phase": "Running"}}
    )
    objects = client.CustomObjectsApi(kube_api)
    wait_for(
        lambda: (
            (
                objects.get_namespaced_custom_object(
                    "difftrain.dev", "v1alpha1", namespace, "diffusiontrainingjobs", "rbac"
                ).get("status")
                or {}
            ).get("phase")
            == "Preparing"
        ),
        what="phase Preparing",
    )


def test_dashboard_renders_and_queries_metrics_the_operator_exports(control_plane):
    import json
    import re

    from prometheus_client import REGISTRY

    import difftrain_operator.metrics  # noqa: F401 - registers the operator's metrics

    rendered = render_chart(control_plane)
    maps = [
        d
        for d in yaml.safe_load_all(rendered)
        if d and d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("dashboards")
    ]
    assert len(maps) == 1
    assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(maps[0]["data"]["difftrain.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queried = set(re.findall(r"\b(difftrain_[a-z_]+)", " ".join(exprs)))
    exported = {
        m.name + suffix
        for m in REGISTRY.collect()
        for suffix in ("", "_total", "_bucket", "_count", "_sum")
    }
    operator_queried = {q for q in queried if q.startswith("difftrain_operator_")}
    assert operator_queried
    assert operator_queried <= exported, operator_queried - exported
    # every training panel queries a series the trainer exports
    from difftrain.train.metrics import TrainingMetrics

    trainer = TrainingMetrics("job", "ns", 0)
    trainer.record_validation(0.5)  # its series appears at the first evaluation
    trainer.record_clip_score(25.0)  # and this one at the first scored samples
    trainer_exported = {
        sample.name for family in trainer.registry.collect() for sample in family.samples
    }
    trainer_queried = queried - operator_queried
    assert {"difftrain_loss", "difftrain_images_per_second", "difftrain_step"} <= trainer_queried
    assert trainer_queried <= trainer_exported, trainer_queried - trainer_exported


def test_dashboard_filters_every_training_and_gpu_panel_by_the_job_and_namespace_variables():
    import json
    import re

    from difftrain.train.metrics import LABELS

    # Prometheus sets job (and, discovering pods, namespace) on every target: our labels are
    # others, or they would arrive as exported_job / exported_namespace
    assert {"job", "namespace"}.isdisjoint(LABELS)
    assert {"training_job", "training_namespace"} <= set(LABELS)
    dashboard = json.loads((CHART / "dashboards" / "difftrain.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["namespace"]["definition"] == (
        "label_values(difftrain_step, training_namespace)"
    )
    assert variables["job"]["definition"] == (
        'label_values(difftrain_step{training_namespace=~"$namespace"}, training_job)'
    )
    assert variables["namespace"]["multi"] and variables["job"]["includeAll"]
    per_job = [
        (p["title"], t["expr"])
        for p in dashboard["panels"]
        for t in p.get("targets", [])
        if "difftrain_operator_" not in t["expr"]
    ]
    gpu = [title for title, expr in per_job if "DCGM_FI_DEV_" in expr]
    assert len(gpu) == 3
    for metric in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE"):
        assert any(metric in expr for _, expr in per_job), metric
    for title, expr in per_job:
        # every selector of a trainer metric carries both variables
        selectors = re.findall(r"\b(difftrain_[a-z_]+)\{([^}]*)\}", expr)
        assert selectors, title
        for name, matchers in selectors:
            assert 'training_namespace=~"$namespace"' in matchers, (title, name)
            assert 'training_job=~"$job"' in matchers, (title, name)
        assert not re.search(r"\bdifftrain_[a-z_]+(?![a-z_{])", expr), (title, expr)


def monitors(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs if d["kind"] in {"PodMonitor", "ServiceMonitor"}}


def test_monitors_are_optional_and_carry_extra_labels_and_namespace_selectors(control_plane):
    assert monitors(rendered(control_plane)) == {}
    docs = rendered(
        control_plane,
        "monitoring.podMonitor.enabled=true",
        "monitoring.serviceMonitor.enabled=true",
        "monitoring.podMonitor.additionalLabels.release=kube-prometheus-stack",
        "monitoring.serviceMonitor.additionalLabels.team=ml-platform",
        "monitoring.serviceMonitor.interval=15s",
    )
    found = monitors(docs)
    pod_monitor, service_monitor = found["PodMonitor"], found["ServiceMonitor"]
    assert pod_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert service_monitor["metadata"]["labels"]["team"] == "ml-platform"
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    assert service_monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NS]}
    assert service_monitor["spec"]["endpoints"][0]["interval"] == "15s"
    # the selectors pick what they are for: the pods the operator builds, the chart's Service
    from difftrain_operator.builders import OperatorSettings, build_training_children
    from tests.unit.test_operator_builders import training_job as typed_training_job

    job = build_training_children(typed_training_job(), "uid-1", OperatorSettings()).job
    template = job["spec"]["template"]
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= ports
    (service,) = [d for d in docs if d["kind"] == "Service"]
    selector = service_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in service_monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    # where the operator watches given namespaces, so does the PodMonitor (unless told otherwise)
    watching = monitors(
        rendered(control_plane, "monitoring.podMonitor.enabled=true", "watchNamespaces={ml,cv}")
    )
    assert watching["PodMonitor"]["spec"]["namespaceSelector"] == {"matchNames": ["ml", "cv"]}
    told = monitors(
        rendered(
            control_plane,
            "monitoring.podMonitor.enabled=true",
            "watchNamespaces={ml}",
            "monitoring.podMonitor.namespaceSelector.any=true",
        )
    )
    assert told["PodMonitor"]["spec"]["namespaceSelector"] == {"any": True}
    bad = helm(
        control_plane,
        "lint",
        str(CHART),
        "--set",
        "monitoring.podMonitor.interval=soon",
        check=False,
    )
    assert bad.returncode != 0 and "interval" in bad.stdout + bad.stderr


@pytest.fixture(scope="module")
def monitoring_crds(control_plane) -> None:
    """The Prometheus Operator's PodMonitor and ServiceMonitor CRDs (from its pinned module)."""
    crds = control_plane.bin_dir / "prometheus-operator-crds"
    for kind in ("podmonitors", "servicemonitors"):
        control_plane.kubectl(
            "apply", "--server-side", "-f", str(crds / f"monitoring.coreos.com_{kind}.yaml")
        )
        control_plane.wait_established(f"{kind}.monitoring.coreos.com")
    control_plane.kubectl("create", "namespace", RELEASE_NS, check=False)


@pytest.mark.usefixtures("monitoring_crds")
def test_monitors_are_accepted_by_the_prometheus_operators_crds(control_plane, tmp_path):
    docs = rendered(
        control_plane,
        "monitoring.podMonitor.enabled=true",
        "monitoring.serviceMonitor.enabled=true",
        "monitoring.podMonitor.additionalLabels.release=kube-prometheus-stack",
        "watchNamespaces={ml}",
    )
    path = tmp_path / "monitors.yaml"
    path.write_text(yaml.safe_dump_all(list(monitors(docs).values())))
    # strict validation: a field the schema does not know would be refused
    applied = control_plane.kubectl(
        "apply", "--server-side", "--validate=strict", "-n", RELEASE_NS, "-f", str(path)
    )
    assert "podmonitor.monitoring.coreos.com/difftrain-operator-trainers" in applied.stdout
    assert "servicemonitor.monitoring.coreos.com/difftrain-operator" in applied.stdout
    stored = yaml.safe_load(
        control_plane.kubectl(
            "get", "podmonitor", "difftrain-operator-trainers", "-n", RELEASE_NS, "-o", "yaml"
        ).stdout
    )
    assert stored["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert stored["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    # and the schema is really checked: a misspelt field is refused
    wrong = monitors(docs)["PodMonitor"]
    wrong["metadata"]["name"] = "misspelt"
    wrong["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    path.write_text(yaml.safe_dump(wrong))
    refused = control_plane.kubectl(
        "apply",
        "--server-side",
        "--validate=strict",
        "-n",
        RELEASE_NS,
        "-f",
        str(path),
        check=False,
    )
    assert refused.returncode != 0 and "intervall" in refused.stderr
    control_plane.kubectl("delete", "-n", RELEASE_NS, "podmonitor,servicemonitor", "--all")


def test_notes_say_what_was_installed_and_how_to_see_a_jobs_status_and_metrics(
    control_plane, tmp_path
):
    import shutil

    # Helm renders NOTES.txt only on install, which needs a cluster whose cluster-wide objects
    # other tests share: a copy of the chart carries it out through a ConfigMap instead
    chart = tmp_path / "difftrain"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-out.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |-\n"
        '{{ include "difftrain/templates/NOTES.txt" . | indent 4 }}\n'
    )

    def notes(*values: str) -> str:
        args = ["template", "difftrain", str(chart), "--namespace", RELEASE_NS]
        args += ["--kube-version", KUBE_VERSION, "--show-only", "templates/notes-out.yaml"]
        for value in values:
            args += ["--set", value]
        text: str = yaml.safe_load(helm(control_plane, *args).stdout)["data"]["notes"]
        return text

    plain = notes()
    assert "kubectl get dtj -A" in plain
    assert "describe dtj NAME" in plain
    assert "difftrain.dev/job=NAME" in plain  # the label the operator puts on a job's pods
    assert "port-forward" in plain and "9090" in plain
    assert "training_job" in plain
    assert "no PodMonitor or ServiceMonitor" in plain
    assert "every namespace" in plain
    monitored = notes(
        "monitoring.podMonitor.enabled=true",
        "monitoring.serviceMonitor.enabled=true",
        "watchNamespaces={ml}",
    )
    assert "PodMonitor difftrain-operator-trainers" in monitored
    assert "ServiceMonitor difftrain-operator" in monitored
    assert "namespaces ml" in monitored
    assert "no PodMonitor" not in monitored
