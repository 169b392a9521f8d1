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


def render_chart(control_plane) -> str:
    """`helm template` of the chart for the pinned Kubernetes version."""
    return helm(
        control_plane,
        "template",
        "difftrain",
        str(CHART),
        "--namespace",
        RELEASE_NS,
        "--kube-version",
        KUBE_VERSION,
    ).stdout


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
    # a missing permission shows up as a 403 in the operator's log even when a test passes
    assert "403" not in log and "Forbidden" not in log, log[-3000:]


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
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
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
    trainer_exported = {
        sample.name for family in trainer.registry.collect() for sample in family.samples
    }
    trainer_queried = queried - operator_queried
    assert {"difftrain_loss", "difftrain_images_per_second", "difftrain_step"} <= trainer_queried
    assert trainer_queried <= trainer_exported, trainer_queried - trainer_exported
