"""Spec -> child objects: every field lands where it should."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from difftrain import api
from difftrain_operator.builders import (
    EXIT_CONFIG_ERROR,
    EXIT_INTERRUPTED,
    JOB_LABEL,
    KUEUE_QUEUE_LABEL,
    OperatorSettings,
    build_merge_children,
    build_training_children,
    child_name,
)

SETTINGS = OperatorSettings(trainer_image="registry.local/difftrain/trainer:test")


def training_job(**spec: Any) -> api.DiffusionTrainingJob:
    body: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/sd15"},
        "dataset": {"uri": "s3://data/pets"},
        "output": {"uri": "s3://runs/pets"},
        "storage": {"endpoint": "minio:9000", "secretRef": {"name": "minio-creds"}},
    }
    body.update(spec)
    res = api.parse_resource(
        {
            "apiVersion": api.API_VERSION,
            "kind": "DiffusionTrainingJob",
            "metadata": {"name": "pets", "namespace": "ml"},
            "spec": body,
        }
    )
    assert isinstance(res, api.DiffusionTrainingJob)
    return res


def container(job_obj: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = job_obj["spec"]["template"]["spec"]["containers"][0]
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_single_worker_job_carries_the_spec():
    children = build_training_children(
        training_job(
            resources={
                "gpusPerWorker": 2,
                "cpu": 8,
                "memory": "64Gi",
                "shmSize": "16Gi",
                "nodeSelector": {"pool": "h100"},
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ],
                "affinity": {"nodeAffinity": {"x": 1}},
                "priorityClassName": "high",
                "image": "my/trainer:1",
            },
            backoffLimit=5,
            activeDeadlineSeconds=3600,
            ttlSecondsAfterFinished=600,
            suspend=True,
            queueName="gpu-queue",
        ),
        uid="u-1",
        settings=SETTINGS,
    )
    job = children.job
    assert children.service is None
    assert job["metadata"]["name"] == "pets"
    assert job["metadata"]["ownerReferences"][0] == {
        "apiVersion": api.API_VERSION,
        "kind": "DiffusionTrainingJob",
        "name": "pets",
        "uid": "u-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    spec = job["spec"]
    assert (
        spec["backoffLimit"],
        spec["activeDeadlineSeconds"],
        spec["ttlSecondsAfterFinished"],
        spec["suspend"],
    ) == (5, 3600, 600, True)
    assert spec["completions"] == spec["parallelism"] == 1
    assert "completionMode" not in spec
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["affinity"] == {"nodeAffinity": {"x": 1}}
    assert pod["priorityClassName"] == "high"
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "pets-trainer"
    c = container(job)
    assert c["image"] == "my/trainer:1"
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "ephemeral-storage": "10Gi"},
        "limits": {"memory": "64Gi", "ephemeral-storage": "100Gi", "nvidia.com/gpu": "2"},
    }
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    env = env_of(c)
    assert env["DIFFTRAIN_STORE_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "minio-creds", "key": "accessKey"}
    }
    assert env["DIFFTRAIN_STORE_SECRET_KEY"]["secretKeyRef"]["key"] == "secretKey"
    assert env["DIFFTRAIN_NUM_PROCESSES"] == "2"
    assert env["DIFFTRAIN_MACHINE_RANK"] == "0"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9090}]
    assert all("secretKey" not in str(e.get("value", "")) for e in c["env"])


def test_several_workers_get_an_indexed_job_and_a_headless_service():
    children = build_training_children(
        training_job(resources={"workers": 3, "gpusPerWorker": 4}), uid="u", settings=SETTINGS
    )
    job, svc = children.job, children.service
    assert svc is not None
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {JOB_LABEL: "pets"}
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    env = env_of(container(job))
    assert env["DIFFTRAIN_MAIN_ADDRESS"] == f"pets-0.{svc['metadata']['name']}.ml.svc"
    assert env["DIFFTRAIN_NUM_MACHINES"] == "3"
    assert env["DIFFTRAIN_NUM_PROCESSES"] == "12"
    assert "job-completion-index" in env["DIFFTRAIN_MACHINE_RANK"]["fieldRef"]["fieldPath"]


def test_workers_meet_at_a_rendezvous_of_their_own_and_have_time_to_checkpoint():
    job = build_training_children(
        training_job(
            resources={"workers": 2, "gpusPerWorker": 1}, checkpointing={"gracePeriodSeconds": 900}
        ),
        uid="uid-1",
        settings=SETTINGS,
    ).job
    pod = job["spec"]["template"]["spec"]
    env = env_of(container(job))
    assert env["DIFFTRAIN_RUN_ID"] == "uid-1"
    assert env["DIFFTRAIN_POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # the scratch limit in bytes from the kubelet, within a share of which images are copied
    assert env["DIFFTRAIN_SCRATCH_LIMIT"] == {
        "resourceFieldRef": {"resource": "limits.ephemeral-storage", "divisor": "1"}
    }
    # the job's own grace period; the launcher's wait for its processes' checkpoint ends inside it
    assert pod["terminationGracePeriodSeconds"] == 900
    assert 0 < int(env["DIFFTRAIN_STOP_TIMEOUT"]) < 900


@pytest.mark.parametrize(
    ("spec", "seconds"),
    [
        ({}, 600),
        ({"method": "controlnet", "controlnet": {"conditioningUri": "s3://data/edges"}}, 300),
        ({"method": "lora", "lora": {}}, 120),
    ],
)
def test_a_pods_grace_period_is_its_methods_default_for_the_checkpoint(spec, seconds):
    children = build_training_children(training_job(**spec), "u", SETTINGS)
    pod = children.job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == seconds
    assert int(env_of(container(children.job))["DIFFTRAIN_STOP_TIMEOUT"]) == seconds - 15
    # the trainer reads the same figure from its ConfigMap
    doc = yaml.safe_load(children.config_map["data"]["job.yaml"])
    assert doc["spec"]["checkpointing"]["gracePeriodSeconds"] == seconds


def test_the_operators_cap_shortens_a_longer_grace_period_in_the_pod_and_the_config_map():
    capped = OperatorSettings(trainer_max_grace_seconds=60)
    children = build_training_children(training_job(), "u", capped)  # full: 600 s by default
    assert children.job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60
    assert env_of(container(children.job))["DIFFTRAIN_STOP_TIMEOUT"] == "45"
    doc = yaml.safe_load(children.config_map["data"]["job.yaml"])
    assert doc["spec"]["checkpointing"]["gracePeriodSeconds"] == 60
    spec = api.parse_resource(doc).spec
    assert isinstance(spec, api.DiffusionTrainingJobSpec)
    assert spec.grace_period_seconds == 60
    # a shorter grace period than the cap is the job's own
    short = training_job(checkpointing={"gracePeriodSeconds": 40})
    pod = build_training_children(short, "u", capped).job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 40


def test_a_cap_below_the_shortest_grace_period_a_job_may_have_is_refused():
    with pytest.raises(ValueError, match="trainerMaxGracePeriodSeconds 10 is below the 30 s"):
        OperatorSettings(trainer_max_grace_seconds=10)


def test_pods_meet_the_restricted_profile():
    for obj in (
        build_training_children(training_job(), "u", SETTINGS).job,
        build_merge_children(_merge(), "u", SETTINGS)[1],
    ):
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = pod["containers"][0]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}


def test_failure_policy_ignores_preemption_and_fails_fast_on_config_errors():
    policy = build_training_children(training_job(), "u", SETTINGS).job["spec"]["podFailurePolicy"][
        "rules"
    ]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in policy
    actions = {r["action"]: r.get("onExitCodes", {}).get("values") for r in policy[1:]}
    assert actions == {"Ignore": [EXIT_INTERRUPTED], "FailJob": [EXIT_CONFIG_ERROR]}


def test_rbac_lets_the_trainer_patch_only_its_own_status():
    children = build_training_children(training_job(), "u", SETTINGS)
    assert children.role["rules"] == [
        {
            "apiGroups": [api.GROUP],
            "resources": ["diffusiontrainingjobs/status"],
            "resourceNames": ["pets"],
            "verbs": ["get", "patch"],
        }
    ]
    assert children.role_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pets-trainer", "namespace": "ml"}
    ]


def test_config_map_holds_the_resolved_spec():
    children = build_training_children(training_job(method="lora", lora={}), "u", SETTINGS)
    doc = yaml.safe_load(children.config_map["data"]["job.yaml"])
    assert doc["spec"]["hyperparameters"]["learningRate"] == 1e-4
    assert doc["spec"]["output"]["formats"] == ["lora_peft", "lora_kohya"]
    assert api.parse_resource(doc).spec == training_job(method="lora", lora={}).spec.resolved()


def test_children_are_deterministic():
    first = build_training_children(training_job(), "u", SETTINGS).all()
    again = build_training_children(training_job(), "u", SETTINGS).all()
    assert first == again


@pytest.mark.parametrize("length", [10, 52, 63, 120])
def test_child_names_fit_dns_labels_and_stay_unique(length):
    name = "x" * length
    for suffix in ("", "trainer", "workers"):
        short = child_name(name, suffix)
        assert len(short) <= 63
        assert short == child_name(name, suffix)
    assert child_name("a" * 70, "trainer") != child_name("a" * 71, "trainer")


def _merge(**spec: Any) -> api.ModelMerge:
    body = {
        "models": [{"uri": "s3://models/a.safetensors"}, {"uri": "s3://models/b.safetensors"}],
        "output": {"uri": "s3://models/out.safetensors"},
        "storage": {"endpoint": "minio:9000", "secretRef": {"name": "creds"}},
        **spec,
    }
    res = api.parse_resource(
        {
            "apiVersion": api.API_VERSION,
            "kind": "ModelMerge",
            "metadata": {"name": "mix", "namespace": "ml"},
            "spec": body,
        }
    )
    assert isinstance(res, api.ModelMerge)
    return res


def test_merge_runs_on_cpu_unless_a_gpu_is_asked_for():
    _, cpu_job = build_merge_children(_merge(resources={"memory": "4Gi"}), "u", SETTINGS)
    c = container(cpu_job)
    assert c["args"][:2] == ["merge", "/etc/difftrain/merge.yaml"]
    assert c["resources"] == {
        "requests": {"memory": "4Gi", "ephemeral-storage": "10Gi"},
        "limits": {"memory": "4Gi", "ephemeral-storage": "100Gi"},
    }
    assert cpu_job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    _, gpu_job = build_merge_children(_merge(resources={"gpu": True}), "u", SETTINGS)
    assert container(gpu_job)["resources"]["limits"] == {
        "ephemeral-storage": "100Gi",
        "nvidia.com/gpu": "1",
    }


def test_gpu_shortfall_names_what_is_missing():
    from difftrain_operator.checks import gpu_shortfall

    def node(gpus):
        return {
            "metadata": {"name": f"n{gpus}"},
            "status": {"allocatable": {"nvidia.com/gpu": gpus}},
        }

    assert gpu_shortfall([node("4"), node("8")], "nvidia.com/gpu", 8) is None
    message = gpu_shortfall([node("4")], "nvidia.com/gpu", 8)
    assert message is not None and "largest offers 4" in message
    assert gpu_shortfall([], "nvidia.com/gpu", 0) is None  # CPU-only workers need no GPU
    assert gpu_shortfall([{"metadata": {"name": "cpu"}}], "nvidia.com/gpu", 1) is not None


def test_every_child_is_owned_by_its_resource():
    children = build_training_children(training_job(resources={"workers": 2}), "u-9", SETTINGS)
    for obj in children.all():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "u-9"


def test_a_hub_model_gets_the_hub_cache_and_its_token_from_the_secret():
    hub = {"hub": "org/gated-model", "tokenSecretRef": {"name": "hf-token", "key": "token"}}
    children = build_training_children(training_job(baseModel=hub), "uid-1", SETTINGS)
    pod = children.job["spec"]["template"]["spec"]
    c = container(children.job)
    env = env_of(c)
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["DIFFTRAIN_HUB_CACHE"] == "/var/cache/difftrain/hub"
    assert {"name": "hub-cache", "mountPath": "/var/cache/difftrain/hub"} in c["volumeMounts"]
    assert {"name": "hub-cache", "emptyDir": {}} in pod["volumes"]
    # the token stays in the Secret: not in the job's ConfigMap
    assert "hf-token" in children.config_map["data"]["job.yaml"]
    assert "HF_TOKEN" not in children.config_map["data"]["job.yaml"]

    shared = OperatorSettings(trainer_image="t", hub_cache_claim="model-cache")
    pod = build_training_children(training_job(baseModel=hub), "uid-1", shared).job["spec"][
        "template"
    ]["spec"]
    assert {"name": "hub-cache", "persistentVolumeClaim": {"claimName": "model-cache"}} in pod[
        "volumes"
    ]


def test_tracker_credentials_reach_the_trainer_from_their_secrets_only():
    tracking = {
        "backends": ["tensorboard", "mlflow", "wandb"],
        "mlflow": {
            "trackingUri": "http://mlflow.mlops:5000",
            "tokenSecretRef": {"name": "mlflow", "key": "token"},
        },
        "wandb": {"apiKeySecretRef": {"name": "wandb", "key": "apiKey"}, "entity": "team"},
    }
    children = build_training_children(training_job(tracking=tracking), "uid-1", SETTINGS)
    env = env_of(container(children.job))
    assert env["MLFLOW_TRACKING_TOKEN"] == {"secretKeyRef": {"name": "mlflow", "key": "token"}}
    assert env["WANDB_API_KEY"] == {"secretKeyRef": {"name": "wandb", "key": "apiKey"}}
    job_yaml = children.config_map["data"]["job.yaml"]
    assert "WANDB_API_KEY" not in job_yaml and "MLFLOW_TRACKING_TOKEN" not in job_yaml
    plain = env_of(container(build_training_children(training_job(), "uid-1", SETTINGS).job))
    assert "WANDB_API_KEY" not in plain and "MLFLOW_TRACKING_TOKEN" not in plain


def test_a_store_model_gets_no_hub_cache_and_no_token():
    children = build_training_children(training_job(), "uid-1", SETTINGS)
    c = container(children.job)
    assert "HF_TOKEN" not in env_of(c) and "DIFFTRAIN_HUB_CACHE" not in env_of(c)
    assert all(
        v["name"] != "hub-cache" for v in children.job["spec"]["template"]["spec"]["volumes"]
    )


def _scratch(job_obj: dict[str, Any]) -> dict[str, Any]:
    pod = job_obj["spec"]["template"]["spec"]
    volume: dict[str, Any] = next(v for v in pod["volumes"] if v["name"] == "scratch")
    mount = next(m for m in container(job_obj)["volumeMounts"] if m["name"] == "scratch")
    assert mount["mountPath"] == "/tmp"
    return volume


def test_the_scratch_volume_requests_and_is_limited_to_its_ephemeral_storage():
    job = build_training_children(training_job(), uid="u", settings=SETTINGS).job
    resources = container(job)["resources"]
    assert resources["requests"]["ephemeral-storage"] == "10Gi"
    assert resources["limits"]["ephemeral-storage"] == "100Gi"
    assert _scratch(job) == {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}}
    _, merge_job = build_merge_children(_merge(), "u", SETTINGS)
    assert _scratch(merge_job)["emptyDir"] == {"sizeLimit": "100Gi"}
    assert container(merge_job)["resources"]["requests"]["ephemeral-storage"] == "10Gi"


def test_the_operator_settings_size_the_scratch_volume_or_leave_it_unlimited():
    settings = OperatorSettings(scratch_request="200Gi", scratch_limit=None)
    job = build_training_children(training_job(), uid="u", settings=settings).job
    resources = container(job)["resources"]
    assert resources["requests"]["ephemeral-storage"] == "200Gi"
    assert "ephemeral-storage" not in resources.get("limits", {})
    assert _scratch(job) == {"name": "scratch", "emptyDir": {}}


def test_a_scratch_size_that_is_no_quantity_is_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"trainerScratch\.limit 'lots'"):
        OperatorSettings(scratch_limit="lots")


def test_image_pull_secrets_go_on_every_jobs_service_account_and_merge_pod():
    settings = OperatorSettings(image_pull_secrets=("regcred", "mirror"))
    children = build_training_children(training_job(), uid="u", settings=settings)
    assert children.service_account["imagePullSecrets"] == [
        {"name": "regcred"},
        {"name": "mirror"},
    ]
    # the pods get them through their ServiceAccount
    pod = children.job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == children.service_account["metadata"]["name"]
    _, merge_job = build_merge_children(_merge(), "u", settings)
    assert merge_job["spec"]["template"]["spec"]["imagePullSecrets"] == [
        {"name": "regcred"},
        {"name": "mirror"},
    ]
    plain = build_training_children(training_job(), uid="u", settings=SETTINGS)
    assert "imagePullSecrets" not in plain.service_account


def test_no_network_policy_unless_the_operator_is_asked_for_one():
    children = build_training_children(training_job(), uid="u", settings=SETTINGS)
    assert children.network_policy is None
    assert all(o["kind"] != "NetworkPolicy" for o in children.all())


def test_network_policy_admits_only_the_jobs_own_pods_and_metrics_from_monitoring():
    selector = {"matchLabels": {"team": "observability"}}
    settings = OperatorSettings(network_policy=True, metrics_namespace_selector=selector)
    children = build_training_children(
        training_job(resources={"workers": 2}), uid="u-9", settings=settings
    )
    policy = children.network_policy
    assert policy is not None
    assert policy["metadata"]["name"] == "pets-network"
    assert policy["metadata"]["namespace"] == "ml"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "u-9"
    spec = policy["spec"]
    # it selects exactly the job's pods
    pod_labels = children.job["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["podSelector"]["matchLabels"][JOB_LABEL] == "pets"
    assert spec["policyTypes"] == ["Ingress"]  # egress open: store, API server, hub
    peers, metrics = spec["ingress"]
    # the job's pods reach each other on every port (rendezvous, NCCL's and Gloo's own ports),
    # and only pods of this namespace (no namespaceSelector) with this job's label
    assert peers == {"from": [{"podSelector": {"matchLabels": {JOB_LABEL: "pets"}}}]}
    assert metrics == {
        "from": [{"namespaceSelector": selector}],
        "ports": [{"protocol": "TCP", "port": settings.metrics_port}],
    }
    ports = {p["containerPort"] for p in container(children.job)["ports"]}
    assert ports == {settings.metrics_port}
    # created before the Job, so no pod runs before it
    kinds = [o["kind"] for o in children.all()]
    assert kinds.index("NetworkPolicy") < kinds.index("Job")


def test_operator_settings_come_from_the_charts_environment():
    from difftrain_operator.startup import operator_settings

    settings = operator_settings(
        {
            "DIFFTRAIN_IMAGE_PULL_SECRETS": "regcred, mirror",
            "DIFFTRAIN_SCRATCH_REQUEST": "20Gi",
            "DIFFTRAIN_SCRATCH_LIMIT": "",
            "DIFFTRAIN_NETWORK_POLICY": "true",
            "DIFFTRAIN_METRICS_NAMESPACE_SELECTOR": '{"matchLabels": {"team": "obs"}}',
        }
    )
    assert settings.image_pull_secrets == ("regcred", "mirror")
    assert (settings.scratch_request, settings.scratch_limit) == ("20Gi", None)
    assert settings.network_policy is True
    assert settings.metrics_namespace_selector == {"matchLabels": {"team": "obs"}}
    defaults = operator_settings({})
    assert defaults.image_pull_secrets == ()
    assert (defaults.scratch_request, defaults.scratch_limit) == ("10Gi", "100Gi")
    assert defaults.network_policy is False
    assert defaults.metrics_namespace_selector == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
    }
    with pytest.raises(ValueError, match="DIFFTRAIN_NETWORK_POLICY"):
        operator_settings({"DIFFTRAIN_NETWORK_POLICY": "maybe"})
    with pytest.raises(ValueError, match="DIFFTRAIN_METRICS_NAMESPACE_SELECTOR"):
        operator_settings({"DIFFTRAIN_METRICS_NAMESPACE_SELECTOR": "[1]"})


def test_older_replicas_have_higher_peering_priorities_unless_one_is_set():
    from difftrain_operator.startup import peering_priority

    first = peering_priority(0, started_ns=1_700_000_000_000_000_000)
    second = peering_priority(0, started_ns=1_700_000_000_000_001_000)  # a microsecond later
    assert first > second  # the first keeps acting; the second waits on standby
    assert peering_priority(100, started_ns=1_700_000_000_000_000_000) == 100
