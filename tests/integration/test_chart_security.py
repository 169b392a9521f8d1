"""The chart for security reviews: a NetworkPolicy per job, image pull Secrets, the scratch
volume's ephemeral storage, and Secret access only where the operator watches, each rendered by
`helm template`, installed on the API server and used by the operator run as its Deployment."""

from __future__ import annotations

import pytest
from kubernetes import client, config

from difftrain import api
from difftrain_operator.checks import ClusterChecks
from difftrain_operator.kube import Kube
from tests.integration.chart_install import (
    CHART,
    FORBIDDEN,
    helm,
    install,
    one,
    operator_process,
    render,
    stop,
)
from tests.integration.resources import create, training_job, wait_for

pytestmark = pytest.mark.usefixtures("crds_installed")


def rules_for(role: dict, resource: str) -> list[dict]:
    return [r for r in role["rules"] if resource in r["resources"]]


def test_chart_renders_the_security_values_and_refuses_bad_ones(control_plane):
    plain = render(control_plane, "difftrain-system")
    deployment = one(plain, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in pod
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one replica, no overlap
    role = one(plain, "ClusterRole", "difftrain-operator")
    assert rules_for(role, "secrets") == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
    ]
    assert not rules_for(role, "networkpolicies")
    assert not [d for d in plain if d["kind"] in ("KopfPeering", "ClusterKopfPeering")]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["DIFFTRAIN_NETWORK_POLICY"] == "false"
    assert (env["DIFFTRAIN_SCRATCH_REQUEST"], env["DIFFTRAIN_SCRATCH_LIMIT"]) == ("10Gi", "100Gi")

    docs = render(
        control_plane,
        "difftrain-system",
        "imagePullSecrets[0].name=operator-registry",
        "trainerImagePullSecrets[0].name=regcred",
        "trainerImagePullSecrets[1].name=mirror",
        "networkPolicy.enabled=true",
        "trainerScratch.limit=",
        "replicas=3",
    )
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "operator-registry"}]
    assert "strategy" not in deployment["spec"]  # rolling: peering keeps the new one waiting
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["DIFFTRAIN_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    assert env["DIFFTRAIN_NETWORK_POLICY"] == "true"
    assert env["DIFFTRAIN_SCRATCH_LIMIT"] == ""
    assert env["DIFFTRAIN_METRICS_NAMESPACE_SELECTOR"] == (
        '{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}'
    )
    role = one(docs, "ClusterRole", "difftrain-operator")
    assert rules_for(role, "networkpolicies") == [
        {
            "apiGroups": ["networking.k8s.io"],
            "resources": ["networkpolicies"],
            "verbs": ["get", "create"],
        }
    ]
    # cluster-wide peering: its own ClusterRole, patching only the chart's peering object
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "difftrain"
    peering_role = one(docs, "ClusterRole", "difftrain-operator-peering")
    assert peering_role["rules"] == [
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings"],
            "verbs": ["list", "watch"],
        },
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings"],
            "resourceNames": ["difftrain"],
            "verbs": ["patch"],
        },
    ]
    assert not rules_for(role, "kopfpeerings") and not rules_for(role, "clusterkopfpeerings")

    for bad, field in (
        ("trainerScratch.limit=lots", "trainerScratch.limit"),
        ("trainerImagePullSecrets[0].secret=x", "trainerImagePullSecrets"),
        ("networkPolicy.metricsNamespaceSelector.names=x", "metricsNamespaceSelector"),
    ):
        refused = helm(control_plane, "lint", str(CHART), "--set", bad, check=False)
        assert refused.returncode != 0, bad
        assert field in refused.stdout + refused.stderr, refused.stdout


def test_secret_access_is_only_where_the_chart_watches_and_elsewhere_fails_fast(
    control_plane, kube_api, namespace, tmp_path
):
    docs = render(control_plane, f"{namespace}-op", f"watchNamespaces={{{namespace}}}")
    assert not rules_for(one(docs, "ClusterRole", "difftrain-operator"), "secrets")
    installed = install(kube_api, docs, suffix=namespace)
    core = client.CoreV1Api(kube_api)
    other = f"{namespace}-other"
    core.create_namespace({"metadata": {"name": other}})
    try:
        assert installed.may("get", "secrets", namespace)
        assert not installed.may("list", "secrets", namespace)
        assert not installed.may("watch", "secrets", namespace)
        assert not installed.may("get", "secrets", other)
        assert not installed.may("get", "secrets", "kube-system")

        creds = {"metadata": {"name": "creds"}, "stringData": {"accessKey": "a", "secretKey": "b"}}
        core.create_namespaced_secret(namespace, creds)
        core.create_namespaced_secret(other, creds)
        cfg = client.Configuration()
        kubeconfig = installed.kubeconfig(control_plane, tmp_path / "kubeconfig")
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        checks = ClusterChecks(Kube(client.ApiClient(cfg)))
        ref = api.SecretKeyRefs(name="creds")
        assert checks.secret_missing(namespace, ref) is None
        assert checks.secret_missing(namespace, api.SecretKeyRefs(name="nope")) == (
            f"Secret 'nope' (storage.secretRef) does not exist in {namespace}"
        )
        # outside the watched namespaces: a reason at once, not a retry that never succeeds
        problem = checks.secret_missing(other, ref)
        assert problem is not None and "may not read Secret 'creds'" in problem
        assert "watchNamespaces" in problem
    finally:
        core.delete_namespace(other)
        installed.remove()


@pytest.fixture
def secured_operator(control_plane, kube_api, namespace, tmp_path):
    """The operator as the chart runs it with a NetworkPolicy per job, pull Secrets and a scratch
    size: its RBAC, ServiceAccount token, arguments and environment."""
    docs = render(
        control_plane,
        f"{namespace}-op",
        f"watchNamespaces={{{namespace}}}",
        "networkPolicy.enabled=true",
        "networkPolicy.metricsNamespaceSelector.matchLabels.team=observability",
        "trainerImagePullSecrets[0].name=regcred",
        "trainerScratch.request=20Gi",
    )
    installed = install(kube_api, docs, suffix=namespace)
    kubeconfig = installed.kubeconfig(control_plane, tmp_path / "kubeconfig")
    log = tmp_path / "operator.log"
    proc = operator_process(installed.deployment(), kubeconfig, log, "operator-0")
    try:
        yield proc
    finally:
        stop(proc)
        print(log.read_text()[-6000:])
        installed.remove()
    assert not FORBIDDEN.search(log.read_text()), log.read_text()[-3000:]


def test_a_job_gets_its_network_policy_pull_secrets_and_scratch_storage(
    kube_api, namespace, secured_operator
):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "minio-credentials"},
            "stringData": {"accessKey": "a", "secretKey": "b"},
        },
    )
    create(kube_api, namespace, training_job("guarded", resources={"workers": 2}))
    batch = client.BatchV1Api(kube_api)
    job = wait_for(
        lambda: next(iter(batch.list_namespaced_job(namespace).items), None), what="the Job"
    )
    # the API server accepted the NetworkPolicy, created before the Job
    policies = client.NetworkingV1Api(kube_api).list_namespaced_network_policy(namespace).items
    (policy,) = policies
    assert policy.metadata.name == "guarded-network"
    assert policy.spec.pod_selector.match_labels == {
        "difftrain.dev/job": "guarded",
        "app.kubernetes.io/component": "trainer",
    }
    assert policy.spec.policy_types == ["Ingress"]
    peers, metrics = policy.spec.ingress
    assert peers.ports is None  # every port between the job's own pods
    assert [p.pod_selector.match_labels for p in peers._from] == [{"difftrain.dev/job": "guarded"}]
    assert peers._from[0].namespace_selector is None  # this namespace only
    (source,) = metrics._from
    assert source.namespace_selector.match_labels == {
        "kubernetes.io/metadata.name": "monitoring",
        "team": "observability",
    }
    assert [(p.protocol, p.port) for p in metrics.ports] == [("TCP", 9090)]
    assert policy.metadata.owner_references[0].kind == "DiffusionTrainingJob"

    sa = core.read_namespaced_service_account("guarded-trainer", namespace)
    assert [s.name for s in sa.image_pull_secrets] == ["regcred"]
    pod = job.spec.template.spec
    assert pod.service_account_name == "guarded-trainer"
    resources = pod.containers[0].resources
    assert resources.requests["ephemeral-storage"] == "20Gi"
    assert resources.limits["ephemeral-storage"] == "100Gi"
    (scratch,) = [v for v in pod.volumes if v.name == "scratch"]
    assert scratch.empty_dir.size_limit == "100Gi"
