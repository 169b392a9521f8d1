"""Pure functions: a resource's spec -> the Kubernetes objects that run it.

No API calls here: the handlers apply what these functions return, idempotently (deterministic
names, owner references, 409 means already there). Objects are plain dicts in the API's own shape,
so a test can compare them field by field and the API server can validate them as they are.

Pods meet the Pod Security Standards *restricted* profile: non-root, no privilege escalation, all
capabilities dropped, the runtime's default seccomp profile.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from difftrain import api
from difftrain_operator import edits

Obj = dict[str, Any]

MANAGED_BY = "difftrain-operator"
JOB_LABEL = f"{api.GROUP}/job"
MERGE_LABEL = f"{api.GROUP}/merge"
KUEUE_QUEUE_LABEL = edits.KUEUE_QUEUE_LABEL
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
CONFIG_MOUNT = "/etc/difftrain"
CONTAINER = "trainer"
# Keeps a finished child Job (and so its final status) until the operator has recorded the result,
# even when ttlSecondsAfterFinished deletes it at once.
RESULT_FINALIZER = f"{api.GROUP}/record-result"
HUB_CACHE_MOUNT = "/var/cache/difftrain/hub"
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

EXIT_CONFIG_ERROR = api.EXIT_CONFIG_ERROR
EXIT_INTERRUPTED = api.EXIT_INTERRUPTED
EPHEMERAL_STORAGE = "ephemeral-storage"


def _monitoring_namespace() -> Obj:
    return {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}


@dataclass(frozen=True)
class OperatorSettings:
    """Settings of one operator deployment (from the Helm chart's values)."""

    trainer_image: str = "difftrain/trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    metrics_port: int = 9090
    rendezvous_port: int = 29500
    price_per_gpu_hour: float = 0.0
    run_as_user: int = 1000
    # the most seconds a training pod may keep its node after SIGTERM, whatever its job asks
    # (checkpointing.gracePeriodSeconds or its method's default); None: no cap
    trainer_max_grace_seconds: int | None = None
    # a PersistentVolumeClaim (in each job's namespace) for the model-hub cache; empty: a
    # per-pod emptyDir, which the pod's processes share
    hub_cache_claim: str = ""
    # image pull Secrets (names, present in each job's namespace) on every per-job ServiceAccount
    # and merge pod, for a trainer image in a private registry
    image_pull_secrets: tuple[str, ...] = ()
    # ephemeral storage of a training or merge pod's /tmp (its work folder: the base model's
    # copy, checkpoints on their way to the store, the latent cache): requested, so the scheduler
    # places the pod where the disk has room, and limited (None: no limit), so a runaway pod is
    # evicted instead of filling its node's disk
    scratch_request: str = "10Gi"
    scratch_limit: str | None = "100Gi"
    # a NetworkPolicy per training job: its pods take connections only from each other
    # (rendezvous and collectives) and, on the metrics port, from the monitoring namespaces
    network_policy: bool = False
    metrics_namespace_selector: Obj = field(default_factory=_monitoring_namespace)

    def __post_init__(self) -> None:
        cap, least = self.trainer_max_grace_seconds, api.MIN_GRACE_PERIOD_SECONDS
        if cap is not None and cap < least:
            raise ValueError(
                f"trainerMaxGracePeriodSeconds {cap} is below the {least} s a job's "
                "checkpointing.gracePeriodSeconds may be: set it to at least that, or 0 for no cap"
            )
        for setting, value in (
            ("trainerScratch.request", self.scratch_request),
            ("trainerScratch.limit", self.scratch_limit),
        ):
            if value and not re.fullmatch(api.QUANTITY_PATTERN, value):
                raise ValueError(
                    f"{setting} {value!r} is not a Kubernetes quantity: set it like 10Gi or 500M"
                )


# libyaml's emitter when PyYAML was built with it: same output, a fraction of the CPU
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def child_name(name: str, suffix: str = "", limit: int = 63) -> str:
    """A deterministic DNS-label name for a child object, shortened with a hash when too long."""
    full = f"{name}-{suffix}" if suffix else name
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 2 if suffix else limit - len(digest) - 1
    head = name[:keep].rstrip("-")
    return f"{head}-{digest}-{suffix}" if suffix else f"{head}-{digest}"


def owner_reference(kind: str, name: str, uid: str) -> Obj:
    """The controller owner reference that makes a child garbage-collected with its resource."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(name: str, component: str, key: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "difftrain",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        key: name,
    }


def _meta(name: str, namespace: str, labels: dict[str, str], owner: Obj) -> Obj:
    return {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": [owner]}


@dataclass(frozen=True)
class TrainingChildren:
    """Every object one DiffusionTrainingJob needs, in the order they are applied."""

    config_map: Obj
    service_account: Obj
    role: Obj
    role_binding: Obj
    service: Obj | None
    job: Obj
    network_policy: Obj | None = None

    def all(self) -> list[Obj]:
        objs = [self.config_map, self.service_account, self.role, self.role_binding]
        if self.network_policy is not None:  # before the Job: no pod runs unprotected
            objs.append(self.network_policy)
        if self.service is not None:
            objs.append(self.service)
        objs.append(self.job)
        return objs


def _pod_security(settings: OperatorSettings) -> tuple[Obj, Obj]:
    pod = {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "fsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    return pod, container


def _store_env(storage: api.StorageSpec | None) -> list[Obj]:
    if storage is None or storage.secret_ref is None:
        return []
    ref = storage.secret_ref
    return [
        {
            "name": "DIFFTRAIN_STORE_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.access_key_key}},
        },
        {
            "name": "DIFFTRAIN_STORE_SECRET_KEY",
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.secret_key_key}},
        },
    ]


def _tracking_env(tracking: api.TrackingSpec) -> list[Obj]:
    """The trackers' credentials, from their Secrets (never in the job's ConfigMap)."""
    refs = {
        "MLFLOW_TRACKING_TOKEN": tracking.mlflow.token_secret_ref if tracking.mlflow else None,
        "WANDB_API_KEY": tracking.wandb.api_key_secret_ref if tracking.wandb else None,
    }
    return [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        for name, ref in refs.items()
        if ref is not None
    ]


def _pod_failure_policy() -> Obj:
    return {
        "rules": [
            # preemption, node drain, eviction: the pod is replaced without using a retry
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": [EXIT_INTERRUPTED],
                },
            },
            # a configuration error cannot be fixed by retrying
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": [EXIT_CONFIG_ERROR],
                },
            },
        ]
    }


def _resources(
    cpu: int | str | None,
    memory: int | str | None,
    gpu_name: str,
    gpus: int,
    settings: OperatorSettings,
) -> Obj:
    """Container resources: CPU and memory requested, memory limited, GPUs as limits, the
    scratch volume's ephemeral storage requested and limited."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cpu is not None:
        requests["cpu"] = str(cpu)
    if memory is not None:
        requests["memory"] = limits["memory"] = str(memory)
    if settings.scratch_request:
        requests[EPHEMERAL_STORAGE] = settings.scratch_request
    if settings.scratch_limit:
        limits[EPHEMERAL_STORAGE] = settings.scratch_limit
    if gpus:
        limits[gpu_name] = str(gpus)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _scratch_env(settings: OperatorSettings) -> list[Obj]:
    """The scratch limit in bytes, from the kubelet (the downward API): the trainer keeps its
    local copies of the dataset's images within a share of it."""
    if not settings.scratch_limit:
        return []
    limit = {"resource": f"limits.{EPHEMERAL_STORAGE}", "divisor": "1"}
    return [{"name": "DIFFTRAIN_SCRATCH_LIMIT", "valueFrom": {"resourceFieldRef": limit}}]


def _scratch_volume(settings: OperatorSettings) -> Obj:
    """The pod's /tmp: node disk, capped at the scratch limit."""
    empty_dir = {"sizeLimit": settings.scratch_limit} if settings.scratch_limit else {}
    return {"name": "scratch", "emptyDir": empty_dir}


def _pull_secrets(settings: OperatorSettings) -> list[Obj]:
    return [{"name": name} for name in settings.image_pull_secrets]


def build_network_policy(
    name: str, namespace: str, labels: dict[str, str], owner: Obj, settings: OperatorSettings
) -> Obj:
    """Who may connect to one training job's pods: each other, and the monitoring on metrics.

    Between the job's own pods every port is open: the rendezvous (PyTorch's TCPStore, which
    does not authenticate) is on the rendezvous port, but NCCL and Gloo open their connections
    on ports they pick at random. Any other pod reaches only the metrics port, and only from the
    namespaces ``metrics_namespace_selector`` matches. Egress is not restricted (the store, the
    API server and a model hub are the cluster's to know).
    """
    peers = {"podSelector": {"matchLabels": {JOB_LABEL: name}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(child_name(name, "network"), namespace, labels, owner),
        "spec": {
            "podSelector": {
                "matchLabels": {JOB_LABEL: name, "app.kubernetes.io/component": "trainer"}
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [peers]},
                {
                    "from": [{"namespaceSelector": settings.metrics_namespace_selector}],
                    "ports": [{"protocol": "TCP", "port": settings.metrics_port}],
                },
            ],
        },
    }


def _config_map(
    kind: str, name: str, namespace: str, uid: str, spec: Obj, key: str, meta: Obj
) -> Obj:
    """The ConfigMap holding a resource's resolved spec, mounted into its pods."""
    resolved = {
        "apiVersion": api.API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": spec,
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {key: yaml.dump(resolved, Dumper=_Dumper, sort_keys=False)},
    }


def _capped_grace(
    spec: api.DiffusionTrainingJobSpec, cap: int | None
) -> api.DiffusionTrainingJobSpec:
    """The resolved spec with its grace period cut to the operator's cap, so the pod and the
    trainer's ConfigMap say the same."""
    if cap is None or spec.grace_period_seconds <= cap:
        return spec
    checkpointing = spec.checkpointing.model_copy(update={"grace_period_seconds": cap})
    return spec.model_copy(update={"checkpointing": checkpointing})


def build_training_children(
    job: api.DiffusionTrainingJob, uid: str, settings: OperatorSettings
) -> TrainingChildren:
    """The ConfigMap, RBAC, optional headless Service and Job of one training job."""
    name = job.metadata.name
    namespace = job.metadata.namespace
    if not name or not namespace:
        raise ValueError("the resource needs metadata.name and metadata.namespace")
    spec = _capped_grace(job.spec.resolved(), settings.trainer_max_grace_seconds)
    grace = spec.grace_period_seconds
    owner = owner_reference("DiffusionTrainingJob", name, uid)
    labels = _labels(name, "trainer", JOB_LABEL)
    sa_name = child_name(name, "trainer")
    config_name = child_name(name, "config")
    job_name = child_name(name, limit=52)  # pods of an Indexed Job are <job>-<index>-<random>

    config_map_spec = spec.to_wire()
    config_map = _config_map(
        "DiffusionTrainingJob",
        name,
        namespace,
        uid,
        config_map_spec,
        "job.yaml",
        _meta(config_name, namespace, labels, owner),
    )
    service_account: Obj = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(sa_name, namespace, labels, owner),
    }
    if settings.image_pull_secrets:
        # the ServiceAccount admission plugin copies them into every pod made with it
        service_account["imagePullSecrets"] = _pull_secrets(settings)
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(sa_name, namespace, labels, owner),
        "rules": [
            {
                "apiGroups": [api.GROUP],
                "resources": ["diffusiontrainingjobs/status"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            }
        ],
    }
    role_binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(sa_name, namespace, labels, owner),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa_name},
        "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": namespace}],
    }

    res = spec.resources
    workers = res.workers
    service = None
    env: list[Obj] = [
        {"name": "DIFFTRAIN_JOB_NAME", "value": name},
        {"name": "DIFFTRAIN_NAMESPACE", "value": namespace},
        {"name": "DIFFTRAIN_METRICS_PORT", "value": str(settings.metrics_port)},
        {"name": "DIFFTRAIN_NUM_MACHINES", "value": str(workers)},
        {
            "name": "DIFFTRAIN_NUM_PROCESSES",
            "value": str(workers * max(res.gpus_per_worker, 1)),
        },
        # the rendezvous of this resource only (a namesake applied later gets another uid)
        {"name": "DIFFTRAIN_RUN_ID", "value": uid},
        # where the other workers reach this pod's processes (no DNS name needed for them)
        {"name": "DIFFTRAIN_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # the launcher waits this long for its processes' checkpoint, inside the grace period
        {
            "name": "DIFFTRAIN_STOP_TIMEOUT",
            "value": str(max(5, grace - 15)),
        },
        *_store_env(spec.storage),
        *_tracking_env(spec.tracking),
        *_scratch_env(settings),
    ]
    mounts: list[Obj] = []
    volumes: list[Obj] = []
    if spec.base_model.hub is not None:
        env.append({"name": "DIFFTRAIN_HUB_CACHE", "value": HUB_CACHE_MOUNT})
        token = spec.base_model.token_secret_ref
        if token is not None:
            env.append(
                {
                    "name": "HF_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}},
                }
            )
        mounts.append({"name": "hub-cache", "mountPath": HUB_CACHE_MOUNT})
        claim = settings.hub_cache_claim
        volumes.append(
            {"name": "hub-cache", "persistentVolumeClaim": {"claimName": claim}}
            if claim
            else {"name": "hub-cache", "emptyDir": {}}
        )
    pod_extra: Obj = {}
    if workers > 1:
        service_name = child_name(name, "workers")
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(service_name, namespace, labels, owner),
            "spec": {
                "clusterIP": "None",
                "selector": {JOB_LABEL: name},
                "publishNotReadyAddresses": True,
                "ports": [{"name": "rendezvous", "port": settings.rendezvous_port}],
            },
        }
        pod_extra["subdomain"] = service_name
        env += [
            {
                "name": "DIFFTRAIN_MAIN_ADDRESS",
                "value": f"{job_name}-0.{service_name}.{namespace}.svc",
            },
            {"name": "DIFFTRAIN_MAIN_PORT", "value": str(settings.rendezvous_port)},
            {
                "name": "DIFFTRAIN_MACHINE_RANK",
                "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}},
            },
        ]
    else:
        env.append({"name": "DIFFTRAIN_MACHINE_RANK", "value": "0"})

    resources = _resources(
        res.cpu, res.memory, res.gpu_resource_name, res.gpus_per_worker, settings
    )
    pod_sc, container_sc = _pod_security(settings)
    container = {
        "name": CONTAINER,
        "image": res.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["run", f"{CONFIG_MOUNT}/job.yaml", "--termination-log", "/dev/termination-log"],
        # a configuration error's one line reaches the resource's Failed condition
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": env,
        "ports": [{"name": "metrics", "containerPort": settings.metrics_port}],
        "resources": resources,
        "securityContext": container_sc,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "scratch", "mountPath": "/tmp"},
            *mounts,
        ],
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace,
        "serviceAccountName": sa_name,
        "securityContext": pod_sc,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(res.shm_size)}},
            _scratch_volume(settings),
            *volumes,
        ],
        **pod_extra,
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in res.tolerations]
    if res.affinity:
        pod_spec["affinity"] = res.affinity
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name

    job_labels = dict(labels)
    if spec.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    if priority := job.metadata.labels.get(KUEUE_PRIORITY_LABEL):
        # the resource's Kueue WorkloadPriorityClass, read when the Job is made
        job_labels[KUEUE_PRIORITY_LABEL] = priority
    job_spec: Obj = {
        "completions": workers,
        "parallelism": workers,
        "backoffLimit": spec.backoff_limit,
        # with a Kueue queue the Job starts suspended, and Kueue alone admits (un-suspends) it
        "suspend": spec.suspend or bool(spec.queue_name),
        "podFailurePolicy": _pod_failure_policy(),
        "template": {
            "metadata": {
                "labels": labels,
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(settings.metrics_port),
                },
            },
            "spec": pod_spec,
        },
    }
    if workers > 1:
        job_spec["completionMode"] = "Indexed"
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    # what the Job reflects, so that an edit's fields can be told apart later (see ``edits``)
    annotations = {edits.SPEC_ANNOTATION: edits.spec_annotation(config_map_spec)}
    if job.metadata.generation is not None:
        annotations[edits.GENERATION_ANNOTATION] = str(job.metadata.generation)
    job_obj = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            **_meta(job_name, namespace, job_labels, owner),
            "annotations": annotations,
            "finalizers": [RESULT_FINALIZER],
        },
        "spec": job_spec,
    }
    network_policy = (
        build_network_policy(name, namespace, labels, owner, settings)
        if settings.network_policy
        else None
    )
    return TrainingChildren(
        config_map, service_account, role, role_binding, service, job_obj, network_policy
    )


def build_merge_children(
    merge: api.ModelMerge, uid: str, settings: OperatorSettings
) -> tuple[Obj, Obj]:
    """The ConfigMap and Job that run one ModelMerge (CPU unless the spec asks for a GPU).

    The merge reports its result through the container's termination message, which the
    operator reads from the pod; the pod needs no API access and gets no token.
    """
    name = merge.metadata.name
    namespace = merge.metadata.namespace
    if not name or not namespace:
        raise ValueError("the resource needs metadata.name and metadata.namespace")
    spec = merge.spec
    owner = owner_reference("ModelMerge", name, uid)
    labels = _labels(name, "merge", MERGE_LABEL)
    config_name = child_name(name, "merge-config")
    config_map = _config_map(
        "ModelMerge",
        name,
        namespace,
        uid,
        spec.to_wire(),
        "merge.yaml",
        _meta(config_name, namespace, labels, owner),
    )
    res = spec.resources
    resources = _resources(
        res.cpu, res.memory, res.gpu_resource_name, 1 if res.gpu else 0, settings
    )
    pod_sc, container_sc = _pod_security(settings)
    container = {
        "name": CONTAINER,
        "image": res.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": [
            "merge",
            f"{CONFIG_MOUNT}/merge.yaml",
            "--termination-log",
            "/dev/termination-log",
        ],
        "env": _store_env(spec.storage),
        "resources": resources,
        "securityContext": container_sc,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "scratch", "mountPath": "/tmp"},
        ],
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_sc,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_name}},
            _scratch_volume(settings),
        ],
    }
    if settings.image_pull_secrets:
        # the namespace's default ServiceAccount runs it: the pull Secrets go on the pod
        pod_spec["imagePullSecrets"] = _pull_secrets(settings)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            **_meta(child_name(name, "merge", limit=52), namespace, labels, owner),
            "finalizers": [RESULT_FINALIZER],
        },
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 2,
            "podFailurePolicy": _pod_failure_policy(),
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    return config_map, job
