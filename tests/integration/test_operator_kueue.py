"""The operator with a real Kueue (tests/infra/kueue.py): Kueue alone admits, queues and preempts.

DiffusionTrainingJobs with ``spec.queueName`` in a ClusterQueue of ``nvidia.com/gpu`` quota; the
operator runs with exactly the chart's RBAC (its ServiceAccount's token), so a permission it lacks
shows as a 403. As elsewhere nothing runs pods: admitted Jobs' pods stay Pending until the test
writes their status as a kubelet would (Running, then Succeeded to free the quota).

One namespace, one operator and the session's Kueue are shared by the tests; each test makes its
own queue objects (unique names), so no test's quota is another's.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from kubernetes import client

from difftrain import api
from difftrain_operator.kueue import DEACTIVATED_ANNOTATION
from tests.infra.environment import REPO
from tests.infra.kueue import (
    GPU,
    PRIORITY_LABEL,
    QUEUE_LABEL,
    Kueue,
    cluster_queue,
    create,
    delete,
    get,
    is_true,
    local_queue,
    resource_flavor,
    workload_of,
    workload_priority_class,
    workload_state,
)
from tests.infra.processes import start_operator
from tests.integration.resources import create as create_resource
from tests.integration.resources import training_job, wait_for

pytestmark = pytest.mark.usefixtures("crds_installed")
PLURAL = "diffusiontrainingjobs"
CHART = REPO / "charts" / "difftrain"
RELEASE_NS = "difftrain-system"
TIMEOUT = 60  # admissions take about a second; a Job's pods are deleted within a few


# -- fixtures: one namespace, one operator with the chart's RBAC, per-test queues ----------------


@pytest.fixture(scope="module")
def ns(kube_api) -> Iterator[str]:
    core = client.CoreV1Api(kube_api)
    name = f"t-kueue-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_secret(
        name, {"metadata": {"name": "creds"}, "stringData": {"accessKey": "a", "secretKey": "b"}}
    )
    yield name
    core.delete_namespace(name)


def _chart_rbac(control_plane) -> list[dict[str, Any]]:
    """The chart's ServiceAccount, ClusterRole and ClusterRoleBinding, as `helm template` renders
    them."""
    kube_version = next(
        line.split("=", 1)[1]
        for line in (REPO / "hack" / "versions.env").read_text().splitlines()
        if line.startswith("KUBERNETES_VERSION=")
    )
    argv = [str(control_plane.bin_dir / "helm"), "template", "difftrain", str(CHART)]
    argv += ["--namespace", RELEASE_NS, "--kube-version", kube_version]
    argv += ["--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    return [d for d in docs if d["kind"] in kinds]


@pytest.fixture(scope="module")
def operator(control_plane, kube_api, kueue: Kueue, ns, tmp_path_factory):
    """`difftrain operator` for ``ns`` with the chart's ServiceAccount token (RBAC applied, so an
    earlier test's older ClusterRole is brought up to date)."""
    core = client.CoreV1Api(kube_api)
    try:
        core.create_namespace({"metadata": {"name": RELEASE_NS}})
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    rbac = _chart_rbac(control_plane)
    work = tmp_path_factory.mktemp("operator-kueue")
    manifest = work / "rbac.yaml"
    manifest.write_text(yaml.safe_dump_all(rbac))
    control_plane.kubectl(
        "apply", "--server-side", "--force-conflicts", "-n", RELEASE_NS, "-f", str(manifest)
    )
    sa = next(d for d in rbac if d["kind"] == "ServiceAccount")["metadata"]["name"]
    token = core.create_namespaced_service_account_token(
        sa, RELEASE_NS, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    kubeconfig = yaml.safe_load(control_plane.kubeconfig.read_text())
    kubeconfig["users"] = [{"name": "admin", "user": {"token": token}}]
    path = work / "operator-kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    log_path = work / "operator.log"
    proc = start_operator(path, ns, log_path)
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log = log_path.read_text()
    print(log[-8000:])  # shown when a test fails
    # a missing permission shows up as a 403 in the operator's log even when a test passes (not
    # just "403": a log line's milliseconds may read so)
    assert "(403)" not in log and "Forbidden" not in log, log[-3000:]


@dataclass
class Queue:
    flavor: str
    cluster_queue: str
    local_queue: str


@pytest.fixture
def make_queue(kube_api, ns) -> Iterator[Any]:
    """make_queue(gpus=1, **cluster_queue_spec): a ResourceFlavor, ClusterQueue and LocalQueue of
    unique names in ``ns``, active; deleted after the test (with the test's resources)."""
    made: list[Queue] = []

    def make(gpus: int = 1, **spec: Any) -> Queue:
        suffix = uuid.uuid4().hex[:8]
        queue = Queue(f"gpu-{suffix}", f"gpu-{suffix}", f"gpus-{suffix}")
        create(kube_api, resource_flavor(queue.flavor))
        create(kube_api, cluster_queue(queue.cluster_queue, queue.flavor, gpus, **spec))
        create(kube_api, local_queue(queue.local_queue, queue.cluster_queue), ns)
        made.append(queue)
        wait_for(
            lambda: (
                is_true(get(kube_api, "ClusterQueue", queue.cluster_queue), "Active")
                and is_true(get(kube_api, "LocalQueue", queue.local_queue, ns), "Active")
            ),
            timeout=TIMEOUT,
            what=f"queues of {queue.cluster_queue} active",
        )
        return queue

    yield make
    objects = client.CustomObjectsApi(kube_api)
    for item in objects.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, PLURAL)["items"]:
        objects.delete_namespaced_custom_object(
            api.GROUP, api.VERSION, ns, PLURAL, item["metadata"]["name"]
        )
    for queue in made:
        delete(kube_api, "LocalQueue", queue.local_queue, ns)
        delete(kube_api, "ClusterQueue", queue.cluster_queue)
        delete(kube_api, "ResourceFlavor", queue.flavor)


# -- helpers -------------------------------------------------------------------------------------


def start(kube_api, ns, name, queue: Queue, labels=None, **spec) -> dict[str, Any]:
    """A one-worker, one-GPU training job in ``queue`` with its own output prefix."""
    body = training_job(
        name,
        storage={"endpoint": "minio:9000", "secretRef": {"name": "creds"}},
        output={"uri": f"s3://runs/{name}"},
        queueName=queue.local_queue,
        resources={"gpusPerWorker": 1},
        **spec,
    )
    if labels:
        body["metadata"]["labels"] = labels
    return create_resource(kube_api, ns, body)


def status(kube_api, ns, name) -> dict[str, Any]:
    obj = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        api.GROUP, api.VERSION, ns, PLURAL, name
    )
    return obj.get("status") or {}


def condition(st: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == kind), {})


def edit(kube_api, ns, name, spec):
    return client.CustomObjectsApi(kube_api).patch_namespaced_custom_object(
        api.GROUP, api.VERSION, ns, PLURAL, name, {"spec": spec}
    )


def job_of(kube_api, ns, name) -> client.V1Job | None:
    jobs = client.BatchV1Api(kube_api).list_namespaced_job(
        ns, label_selector=f"{api.GROUP}/job={name}"
    )
    return next(iter(jobs.items), None)


def wait_job(kube_api, ns, name) -> client.V1Job:
    return wait_for(lambda: job_of(kube_api, ns, name), timeout=TIMEOUT, what=f"{name}'s Job")


def kueue_state(kube_api, ns, name) -> tuple[bool | None, str]:
    """(its Job's spec.suspend, its Workload's state); (None, "no Job") before its Job is made."""
    job = job_of(kube_api, ns, name)
    if job is None:
        return None, "no Job"
    return bool(job.spec.suspend), workload_state(workload_of(kube_api, ns, job.metadata.uid))


def the_job(kube_api, ns, name) -> client.V1Job:
    job = job_of(kube_api, ns, name)
    assert job is not None, f"{name} has no Job"
    return job


def the_workload(kube_api, ns, name) -> dict[str, Any]:
    wl = workload(kube_api, ns, name)
    assert wl is not None, f"{name}'s Job has no Workload"
    return wl


def workload(kube_api, ns, name) -> dict[str, Any] | None:
    job = job_of(kube_api, ns, name)
    return workload_of(kube_api, ns, job.metadata.uid) if job is not None else None


def live_pods(kube_api, ns, name) -> list[client.V1Pod]:
    pods = client.CoreV1Api(kube_api).list_namespaced_pod(
        ns, label_selector=f"{api.GROUP}/job={name}"
    )
    return [
        p
        for p in pods.items
        if not p.metadata.deletion_timestamp and p.status.phase in ("Pending", "Running")
    ]


def ago(minutes: float) -> str:
    t = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def run_pod(kube_api, ns, name, minutes_ago=10) -> client.V1Pod:
    """The job's (one) pod, "running" since ``minutes_ago``; the trainer reports a step."""
    pod = wait_for(lambda: live_pods(kube_api, ns, name), timeout=TIMEOUT, what=f"{name}'s pod")[0]
    client.CoreV1Api(kube_api).patch_namespaced_pod_status(
        pod.metadata.name, ns, {"status": {"phase": "Running", "startTime": ago(minutes_ago)}}
    )
    client.CustomObjectsApi(kube_api).patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, ns, PLURAL, name, {"status": {"step": 5}}
    )
    wait_for(lambda: status(kube_api, ns, name).get("phase") == "Running", what=f"{name} Running")
    return pod


def finish_pod(kube_api, ns, name) -> None:
    """The job's running pod exits 0: the Job completes and Kueue releases its quota."""
    pod = live_pods(kube_api, ns, name)[0]
    terminated = {"exitCode": 0, "reason": "Completed", "startedAt": ago(10), "finishedAt": ago(0)}
    container = {
        "name": "trainer",
        "image": "t",
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "state": {"terminated": terminated},
    }
    client.CoreV1Api(kube_api).patch_namespaced_pod_status(
        pod.metadata.name, ns, {"status": {"phase": "Succeeded", "containerStatuses": [container]}}
    )
    wait_for(
        lambda: status(kube_api, ns, name).get("phase") == "Succeeded",
        timeout=TIMEOUT,
        what=f"{name} Succeeded",
    )


def wait_kueue(kube_api, ns, expected: dict[str, tuple[bool, str]]) -> None:
    def now() -> dict[str, tuple[bool | None, str]]:
        return {n: kueue_state(kube_api, ns, n) for n in expected}

    try:
        wait_for(lambda: now() == expected, timeout=TIMEOUT, what=f"Kueue states {expected}")
    except AssertionError as err:
        raise AssertionError(f"{err}; they are {now()}") from None


def assert_queued(kube_api, ns, name, queue: Queue) -> None:
    st = wait_for(
        lambda: (s := status(kube_api, ns, name)).get("phase") == "Queued" and s,
        timeout=TIMEOUT,
        what=f"{name} Queued",
    )
    queued = condition(st, "Queued")
    assert (queued["status"], queued["reason"]) == ("True", "WaitingForAdmission"), queued
    assert queue.local_queue in queued["message"]
    assert condition(st, "Suspended")["status"] == "False"


def wait_admitted(kube_api, ns, name) -> dict[str, Any]:
    """Kueue admitted it: its resource left Queued (its pods wait for a node)."""
    st: dict[str, Any] = wait_for(
        lambda: (
            (s := status(kube_api, ns, name)).get("phase") not in (None, "Queued", "Suspended")
            and condition(s, "Queued").get("reason") == "Admitted"
            and s
        ),
        timeout=TIMEOUT,
        what=f"{name} admitted",
    )
    return st


# -- tests -----------------------------------------------------------------------------------------


def test_two_jobs_over_quota_one_runs_one_is_queued_then_the_second_runs(
    kube_api, ns, operator, make_queue
):
    queue = make_queue(gpus=1)
    for name in ("q-one", "q-two"):
        start(kube_api, ns, name, queue)
    for name in ("q-one", "q-two"):
        job = wait_job(kube_api, ns, name)
        assert job.metadata.labels[QUEUE_LABEL] == queue.local_queue

    def settled():
        states = {n: kueue_state(kube_api, ns, n) for n in ("q-one", "q-two")}
        admitted = [n for n, s in states.items() if s == (False, "admitted")]
        pending = [n for n, s in states.items() if s == (True, "pending")]
        return (admitted[0], pending[0]) if len(admitted) == len(pending) == 1 else None

    first, second = wait_for(settled, timeout=TIMEOUT, what="one Job admitted, one pending")
    assert_queued(kube_api, ns, second, queue)
    st = wait_admitted(kube_api, ns, first)
    assert st["phase"] == "Pending"  # admitted; its pod waits for a node
    # and it stays so with the operator running: it does not un-suspend what Kueue holds
    time.sleep(3)
    wait_kueue(kube_api, ns, {first: (False, "admitted"), second: (True, "pending")})
    assert status(kube_api, ns, second)["phase"] == "Queued"
    wl = the_workload(kube_api, ns, second)
    reserved = next(c for c in wl["status"]["conditions"] if c["type"] == "QuotaReserved")
    assert reserved["status"] == "False" and GPU in reserved["message"], reserved

    # the first runs and finishes: its quota goes to the second, which leaves Queued
    run_pod(kube_api, ns, first)
    finish_pod(kube_api, ns, first)
    wait_kueue(kube_api, ns, {first: (False, "finished"), second: (False, "admitted")})
    wait_admitted(kube_api, ns, second)
    assert live_pods(kube_api, ns, second)


def test_a_higher_priority_job_preempts_and_the_preempted_one_resumes(
    kube_api, ns, operator, make_queue
):
    suffix = uuid.uuid4().hex[:6]
    low_class, high_class = f"low-{suffix}", f"high-{suffix}"
    create(kube_api, workload_priority_class(low_class, 100))
    create(kube_api, workload_priority_class(high_class, 1000))
    try:
        queue = make_queue(gpus=1, preemption={"withinClusterQueue": "LowerPriority"})
        start(kube_api, ns, "p-low", queue, labels={PRIORITY_LABEL: low_class})
        wait_kueue(kube_api, ns, {"p-low": (False, "admitted")})
        low_job = the_job(kube_api, ns, "p-low")
        assert low_job.metadata.labels[PRIORITY_LABEL] == low_class  # passed on to the Job
        config = client.CoreV1Api(kube_api).read_namespaced_config_map("p-low-config", ns)
        first_pod = run_pod(kube_api, ns, "p-low", minutes_ago=30)
        before = status(kube_api, ns, "p-low")
        assert before["restarts"] == 0

        # the high-priority job takes the GPU: Kueue evicts the low one, its pods stop
        start(kube_api, ns, "p-high", queue, labels={PRIORITY_LABEL: high_class})
        st = wait_for(
            lambda: (s := status(kube_api, ns, "p-low")).get("restarts") == 1 and s,
            timeout=TIMEOUT,
            what="p-low's preemption counted",
        )
        assert st["phase"] == "Suspended"
        assert st["lastRestartReason"] == "Preempted"
        suspended = condition(st, "Suspended")
        assert (suspended["status"], suspended["reason"]) == ("True", "Preempted")
        assert "newest checkpoint" in suspended["message"]
        assert condition(st, "Queued")["reason"] == "Preempted"
        assert st["gpuHours"] >= before["gpuHours"]
        wl = the_workload(kube_api, ns, "p-low")
        evicted = next(c for c in wl["status"]["conditions"] if c["type"] == "Evicted")
        assert evicted["reason"] == "Preempted", evicted
        # evicted, waiting to be admitted again
        wait_kueue(kube_api, ns, {"p-low": (True, "evicted"), "p-high": (False, "admitted")})

        # the high one finishes: the low one is admitted again, the same Job with the same output
        # prefix (the trainer resumes from its newest checkpoint there)
        run_pod(kube_api, ns, "p-high")
        finish_pod(kube_api, ns, "p-high")
        wait_kueue(kube_api, ns, {"p-low": (False, "admitted")})
        again = run_pod(kube_api, ns, "p-low", minutes_ago=5)
        assert again.metadata.name != first_pod.metadata.name
        job = the_job(kube_api, ns, "p-low")
        assert job.metadata.uid == low_job.metadata.uid
        now = client.CoreV1Api(kube_api).read_namespaced_config_map("p-low-config", ns)
        assert now.data == config.data
        assert "uri: s3://runs/p-low" in now.data["job.yaml"]
        final = status(kube_api, ns, "p-low")
        assert final["restarts"] == 1
        assert condition(final, "Queued")["reason"] == "Admitted"
    finally:
        for name in (low_class, high_class):
            delete(kube_api, "WorkloadPriorityClass", name)


def test_the_users_suspend_deactivates_the_workload_and_resume_reactivates_it(
    kube_api, ns, operator, make_queue
):
    queue = make_queue(gpus=1)
    start(kube_api, ns, "s-run", queue)
    wait_kueue(kube_api, ns, {"s-run": (False, "admitted")})
    run_pod(kube_api, ns, "s-run")
    start(kube_api, ns, "s-wait", queue)
    wait_job(kube_api, ns, "s-wait")
    wait_kueue(kube_api, ns, {"s-wait": (True, "pending")})
    # created suspended: not handed to Kueue until resumed (no queue label, no Workload)
    start(kube_api, ns, "s-held", queue, suspend=True)
    held = wait_job(kube_api, ns, "s-held")
    assert held.spec.suspend and QUEUE_LABEL not in (held.metadata.labels or {})
    wait_for(lambda: status(kube_api, ns, "s-held").get("phase") == "Suspended", what="s-held")

    # the user suspends the running one: its Workload is deactivated, Kueue stops it
    run_uid = the_job(kube_api, ns, "s-run").metadata.uid
    edit(kube_api, ns, "s-run", {"suspend": True})
    wl = wait_for(
        lambda: (w := workload(kube_api, ns, "s-run")) and w["spec"].get("active") is False and w,
        timeout=TIMEOUT,
        what="s-run's Workload deactivated",
    )
    assert wl["metadata"]["annotations"][DEACTIVATED_ANNOTATION] == "true"
    wait_for(lambda: not live_pods(kube_api, ns, "s-run"), timeout=TIMEOUT, what="pods stopped")
    # its quota goes to the waiting one
    wait_kueue(kube_api, ns, {"s-run": (True, "evicted"), "s-wait": (False, "admitted")})
    wait_admitted(kube_api, ns, "s-wait")
    st = status(kube_api, ns, "s-run")
    assert (st["phase"], condition(st, "Suspended")["reason"]) == ("Suspended", "Suspended")
    assert condition(st, "Queued")["status"] == "False"
    # and stays so: Kueue does not admit it again, the operator does not fight Kueue
    time.sleep(3)
    job = the_job(kube_api, ns, "s-run")
    assert job.spec.suspend and job.metadata.uid == run_uid
    assert the_workload(kube_api, ns, "s-run")["spec"]["active"] is False
    assert not live_pods(kube_api, ns, "s-run")
    assert kueue_state(kube_api, ns, "s-wait") == (False, "admitted")
    held = the_job(kube_api, ns, "s-held")
    assert held.spec.suspend and workload(kube_api, ns, "s-held") is None

    # resumed: the Workload is active again and waits for the quota the other one holds
    edit(kube_api, ns, "s-run", {"suspend": False})
    wl = wait_for(
        lambda: (
            (w := workload(kube_api, ns, "s-run")) and w["spec"].get("active") is not False and w
        ),
        timeout=TIMEOUT,
        what="s-run's Workload active again",
    )
    assert DEACTIVATED_ANNOTATION not in (wl["metadata"].get("annotations") or {})
    assert_queued(kube_api, ns, "s-run", queue)
    assert the_job(kube_api, ns, "s-run").spec.suspend
    # the other finishes: it is admitted and runs again (same Job)
    run_pod(kube_api, ns, "s-wait")
    finish_pod(kube_api, ns, "s-wait")
    wait_kueue(kube_api, ns, {"s-run": (False, "admitted")})
    run_pod(kube_api, ns, "s-run", minutes_ago=1)
    assert the_job(kube_api, ns, "s-run").metadata.uid == run_uid

    # the job created suspended, resumed: handed to Kueue (label, Workload), queued behind s-run
    edit(kube_api, ns, "s-held", {"suspend": False})
    held = wait_for(
        lambda: (j := the_job(kube_api, ns, "s-held")).metadata.labels.get(QUEUE_LABEL) and j,
        timeout=TIMEOUT,
        what="s-held's queue label",
    )
    assert held.metadata.labels[QUEUE_LABEL] == queue.local_queue
    wait_kueue(kube_api, ns, {"s-held": (True, "pending")})
    assert_queued(kube_api, ns, "s-held", queue)
