"""Fault drills on the real node: what breaks, what the system promises, what it did.

Each drill prints one line of figures (``drill ...``) that docs/RELIABILITY.md is written from.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3Endpoint
from tests.e2e.conftest import (
    RELEASE_NS,
    Cluster,
    apply,
    new_store,
    pods_of,
    report,
    tiny_job,
    two_worker_job,
    upload_inputs,
    wait_condition,
    wait_for,
    worker_pods,
)

LONG_STEPS = 40
EVERY = 20


def _checkpoints(store: S3Endpoint, name: str) -> list[int]:
    """Steps of the committed checkpoints (those whose manifest is written)."""
    prefix = f"runs/{name}/checkpoints/"
    steps = []
    for obj in store.client().list_objects(store.bucket, prefix, recursive=True):
        if obj.object_name.endswith("/_manifest.json"):
            steps.append(int(obj.object_name[len(prefix) :].split("/")[0].removeprefix("step-")))
    return sorted(steps)


def _state(store: S3Endpoint, name: str, step: int) -> dict[str, Any]:
    key = f"runs/{name}/checkpoints/step-{step:08d}/state.json"
    state: dict[str, Any] = json.loads(store.client().get_object(store.bucket, key).read())
    return state["state"]  # type: ignore[no-any-return]


def _pod_states(watch: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    """The pod objects a ``kubectl get --watch -o json`` printed until it terminated."""
    lines: list[str] = []
    out = watch.stdout
    assert out is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(out.readline, "")))
    reader.start()
    decoder = json.JSONDecoder()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            text, seen = "".join(lines).strip(), []
            while text:
                try:
                    obj, end = decoder.raw_decode(text)
                except json.JSONDecodeError:
                    break
                text = text[end:].strip()
                seen.append(obj)
                statuses = obj.get("status", {}).get("containerStatuses") or []
                if any((cs.get("state") or {}).get("terminated") for cs in statuses):
                    return seen
            time.sleep(0.5)
    finally:
        watch.kill()
        watch.wait()
        reader.join(timeout=5)
    raise AssertionError(f"the pod did not terminate in {timeout}s")


def _operator_pods(cluster: Cluster) -> list[dict[str, Any]]:
    """The operator's pods that the chart's Deployment runs."""
    out = cluster.kubectl(
        "get", "pods", "-n", RELEASE_NS, "-l", "app.kubernetes.io/name=difftrain", "-o", "json"
    ).stdout
    pods: list[dict[str, Any]] = json.loads(out)["items"]
    return pods


def _running_pod(cluster: Cluster, namespace: str, name: str) -> str:
    for pod in pods_of(cluster, namespace, name):
        if pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
            return str(pod["metadata"]["name"])
    raise AssertionError("no running trainer pod")


def test_wrong_credentials_fail_the_job_at_once_with_a_clear_condition(
    cluster: Cluster, e2e_namespace: str, inputs: Path, tmp_path: Path
):
    store = new_store(cluster, e2e_namespace, secret_key="not-the-secret-key")
    upload_inputs(store, inputs)  # the test's own client has the right keys
    started = time.monotonic()
    apply(cluster, e2e_namespace, tiny_job(store, "badkeys"), tmp_path)
    wait_condition(cluster, "dtj", "badkeys", e2e_namespace, "Failed", 180)
    seconds = time.monotonic() - started
    status = cluster.get("dtj", "badkeys", e2e_namespace)["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"
    # the trainer's own line, naming what to fix, reaches the condition
    assert "difftrain run:" in failed["message"], failed
    assert "Traceback" not in failed["message"]
    # a configuration error is not retried: one pod, ended with exit code 3
    pods = pods_of(cluster, e2e_namespace, "badkeys")
    assert len(pods) == 1
    ended = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert ended["exitCode"] == 3
    report(f"drill wrong-credentials: Failed after {seconds:.1f} s, pods=1, exit=3")


@pytest.mark.parametrize("how", ["delete", "evict"])
def test_an_interrupted_pod_checkpoints_and_a_new_pod_resumes_to_exactly_max_steps(
    cluster: Cluster, e2e_namespace: str, store: S3Endpoint, inputs: Path, tmp_path: Path, how
):
    """SIGTERM (pod deleted) or preemption (Eviction API): a checkpoint at the step reached,
    exit 75, a new pod from that checkpoint, no retry of the backoff limit used."""
    upload_inputs(store, inputs)
    name = f"long-{how}"
    job = tiny_job(store, name, maxSteps=LONG_STEPS)
    job["spec"]["checkpointing"] = {"everySteps": EVERY, "keepLast": 20}
    apply(cluster, e2e_namespace, job, tmp_path)
    wait_for(
        cluster,
        "dtj",
        name,
        e2e_namespace,
        f"past step {EVERY + 5}",
        lambda o: (o.get("status") or {}).get("step", 0) > EVERY + 5,
        300,
    )
    pod = _running_pod(cluster, e2e_namespace, name)
    # every state the pod passes through, before it is gone
    watch = subprocess.Popen(
        [
            str(cluster.control_plane.bin_dir / "kubectl"),
            f"--kubeconfig={cluster.control_plane.kubeconfig}",
            "get",
            "pod",
            pod,
            "-n",
            e2e_namespace,
            "--watch",
            "-o",
            "json",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)
    interrupted = time.monotonic()
    if how == "delete":
        cluster.kubectl("delete", "pod", pod, "-n", e2e_namespace, "--wait=false")
    else:
        eviction = tmp_path / "eviction.json"
        eviction.write_text(
            json.dumps(
                {
                    "apiVersion": "policy/v1",
                    "kind": "Eviction",
                    "metadata": {"name": pod, "namespace": e2e_namespace},
                }
            )
        )
        cluster.kubectl(
            "create",
            "--raw",
            f"/api/v1/namespaces/{e2e_namespace}/pods/{pod}/eviction",
            "-f",
            str(eviction),
        )
    seen = _pod_states(watch, timeout=120)
    # the stopped pod said so: exit 75 after its checkpoint
    ended = next(
        cs["state"]["terminated"]
        for obj in seen
        for cs in obj.get("status", {}).get("containerStatuses") or []
        if (cs.get("state") or {}).get("terminated")
    )
    assert ended["exitCode"] == 75, ended
    if how == "evict":
        conditions = {c["type"] for obj in seen for c in obj["status"].get("conditions", [])}
        assert "DisruptionTarget" in conditions
    checkpoint_s = time.monotonic() - interrupted
    wait_condition(cluster, "dtj", name, e2e_namespace, "Succeeded", 600)
    recovered_s = time.monotonic() - interrupted

    steps = _checkpoints(store, name)
    stop_step = next(s for s in steps if s % EVERY)  # the SIGTERM checkpoint, off the schedule
    assert steps[-1] == LONG_STEPS
    final = _state(store, name, LONG_STEPS)
    # no step lost or trained twice: every image of every step counted once
    assert final["step"] == LONG_STEPS and final["images_seen"] == LONG_STEPS * 4
    job = cluster.get("job", name, e2e_namespace)
    assert not job["status"].get("failed"), job["status"]  # the backoff limit is untouched
    status = cluster.get("dtj", name, e2e_namespace)["status"]
    assert status["step"] == LONG_STEPS
    # the new pod resumed from the stop's own checkpoint: nothing trained was lost
    (new_pod,) = [p for p in pods_of(cluster, e2e_namespace, name) if p["metadata"]["name"] != pod]
    log = cluster.kubectl("logs", new_pod["metadata"]["name"], "-n", e2e_namespace).stdout
    marker = f"resumed checkpoint={store.uri(f'runs/{name}/checkpoints/step-')}"
    assert marker in log, log[-3000:]
    resumed = int(log.split(marker, 1)[1][:8])
    assert resumed == stop_step
    lost = stop_step - resumed
    report(
        f"drill {how}: stopped at step {stop_step} (checkpoint {checkpoint_s:.1f} s after "
        f"the signal), steps lost {lost}, Succeeded {recovered_s:.1f} s after it"
    )


def _long_job(store: S3Endpoint, name: str) -> dict[str, Any]:
    job = tiny_job(store, name, maxSteps=LONG_STEPS)
    job["spec"]["checkpointing"] = {"everySteps": EVERY, "keepLast": 20}
    return job


def _past(step: int) -> Any:
    return lambda o: (o.get("status") or {}).get("step", 0) > step


RETRIED = "transient storage error; retrying"


def _wait_for_log_line(cluster: Cluster, namespace: str, pod: str, line: str, timeout: int) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = cluster.kubectl("logs", pod, "-n", namespace, check=False).stdout
        if line in log:
            return True
        time.sleep(2)
    return False


def test_minio_away_for_20_seconds_during_checkpoints_is_waited_out(
    cluster: Cluster, e2e_namespace: str, store: S3Endpoint, inputs: Path, tmp_path: Path
):
    """The store goes away mid-run and stays away 20 s past the pod's first call that finds it
    gone (the next checkpoint's upload: the pod reads its images from its local copies)."""
    minio = cluster.nodes.minio
    assert minio is not None
    upload_inputs(store, inputs)
    apply(cluster, e2e_namespace, _long_job(store, "outage"), tmp_path)
    wait_for(cluster, "dtj", "outage", e2e_namespace, "past step 5", _past(5), 300)
    pod = _running_pod(cluster, e2e_namespace, "outage")
    minio.stop()
    stopped_at = time.monotonic()
    try:
        met = _wait_for_log_line(cluster, e2e_namespace, pod, RETRIED, 300)
        assert met, "the pod made no store call in 300 s with the store away"
        time.sleep(20)
    finally:
        minio.start()
    away_s = time.monotonic() - stopped_at
    wait_condition(cluster, "dtj", "outage", e2e_namespace, "Succeeded", 600)
    total_s = time.monotonic() - stopped_at
    # the same pod went on: its uploads waited for the store instead of failing the pod
    pods = pods_of(cluster, e2e_namespace, "outage")
    assert len(pods) == 1
    log = cluster.kubectl("logs", pods[0]["metadata"]["name"], "-n", e2e_namespace).stdout
    retried = log.count(RETRIED)
    assert retried > 0, log[-3000:]
    # every checkpoint on the schedule is whole: its manifest (written last) is there
    assert _checkpoints(store, "outage") == list(range(EVERY, LONG_STEPS + 1, EVERY))
    final = _state(store, "outage", LONG_STEPS)
    assert final["step"] == LONG_STEPS and final["images_seen"] == LONG_STEPS * 4
    job = cluster.get("job", "outage", e2e_namespace)
    assert not job["status"].get("failed"), job["status"]
    report(
        f"drill minio-outage: store away {away_s:.1f} s from step >5 (20 s past the first "
        f"failed call), {retried} retried calls, pods=1, "
        f"Succeeded {total_s:.1f} s after the stop"
    )


def test_the_operator_pod_killed_mid_run_leaves_no_duplicates_and_status_goes_on(
    cluster: Cluster, e2e_namespace: str, store: S3Endpoint, inputs: Path, tmp_path: Path
):
    upload_inputs(store, inputs)
    apply(cluster, e2e_namespace, _long_job(store, "opkill"), tmp_path)
    wait_for(cluster, "dtj", "opkill", e2e_namespace, "past step 5", _past(5), 300)
    operators = _operator_pods(cluster)
    assert len(operators) == 1
    old = operators[0]["metadata"]["name"]
    killed = time.monotonic()
    cluster.kubectl("delete", "pod", old, "-n", RELEASE_NS, "--grace-period=0", "--force")
    step_then = cluster.get("dtj", "opkill", e2e_namespace)["status"]["step"]
    # the trainer reports its steps itself, with or without the operator
    wait_for(cluster, "dtj", "opkill", e2e_namespace, "further", _past(step_then + 5), 120)
    wait_condition(cluster, "dtj", "opkill", e2e_namespace, "Succeeded", 600)
    total_s = time.monotonic() - killed
    jobs = json.loads(
        cluster.kubectl(
            "get", "jobs", "-n", e2e_namespace, "-l", "difftrain.dev/job=opkill", "-o", "json"
        ).stdout
    )["items"]
    assert len(jobs) == 1 and len(pods_of(cluster, e2e_namespace, "opkill")) == 1
    configmaps = cluster.kubectl(
        "get", "configmaps", "-n", e2e_namespace, "-l", "difftrain.dev/job=opkill", "-o", "name"
    ).stdout.split()
    assert len(configmaps) == 1
    now = _operator_pods(cluster)
    assert [p["metadata"]["name"] for p in now] != [old]
    status = cluster.get("dtj", "opkill", e2e_namespace)["status"]
    assert status["phase"] == "Succeeded" and status["step"] == LONG_STEPS
    report(
        f"drill operator-killed: at step {step_then}; one Job, one pod, one ConfigMap; "
        f"Succeeded {total_s:.1f} s after the kill"
    )


@pytest.mark.parametrize("index", [1, 0])
def test_a_killed_worker_pod_is_replaced_and_every_rank_resumes_from_the_newest_checkpoint(
    cluster: Cluster, e2e_namespace: str, store: S3Endpoint, inputs: Path, tmp_path: Path, index
):
    """One worker pod of two killed outright (SIGKILL to its container, as the OOM killer or a
    lost node does): the other does not hang in a collective; the Job replaces the pod, the
    ranks meet again and resume from the newest checkpoint; the job ends at exactly maxSteps."""
    upload_inputs(store, inputs)
    name = f"killw{index}"
    steps_total, every = 40, 10
    job = two_worker_job(store, name, maxSteps=steps_total)
    job["spec"]["checkpointing"] = {"everySteps": every, "keepLast": 20}
    apply(cluster, e2e_namespace, job, tmp_path)
    wait_for(cluster, "dtj", name, e2e_namespace, f"past step {every + 5}", _past(every + 5), 400)
    victim = worker_pods(cluster, e2e_namespace, name)[index]
    container = victim["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    step_then = cluster.get("dtj", name, e2e_namespace)["status"]["step"]
    before = _checkpoints(store, name)
    assert cluster.nodes.containerd is not None
    killed = time.monotonic()
    cluster.nodes.containerd.ctr("tasks", "kill", "--signal", "SIGKILL", container)
    wait_condition(cluster, "dtj", name, e2e_namespace, "Succeeded", 900)
    recovered_s = time.monotonic() - killed

    pods = pods_of(cluster, e2e_namespace, name)
    (dead,) = [p for p in pods if p["metadata"]["name"] == victim["metadata"]["name"]]
    assert dead["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    newest = worker_pods(cluster, e2e_namespace, name)
    assert newest[index]["metadata"]["name"] != victim["metadata"]["name"]  # replaced
    # a crash is a real failure: it counts against the backoff limit, which was not used up
    failed = cluster.get("job", name, e2e_namespace)["status"].get("failed", 0)
    assert 1 <= failed <= job["spec"].get("backoffLimit", 3)
    # one model, every step trained once by both ranks after the resume
    assert _checkpoints(store, name)[-1] == steps_total
    final = _state(store, name, steps_total)
    assert final["step"] == steps_total and final["images_seen"] == steps_total * 4 * 2
    # the pod of rank 0 (whichever the rendezvous placed first) logged the resume
    log = "".join(
        cluster.kubectl("logs", p["metadata"]["name"], "-n", e2e_namespace).stdout
        for p in newest.values()
    )
    marker = f"resumed checkpoint={store.uri(f'runs/{name}/checkpoints/step-')}"
    assert marker in log, log[-3000:]
    resumed = int(log.rsplit(marker, 1)[1][:8])
    assert resumed == before[-1]  # the newest checkpoint committed before the kill
    status = cluster.get("dtj", name, e2e_namespace)["status"]
    assert status["step"] == steps_total
    report(
        f"drill worker-{index}-killed: status at step {step_then} when killed, resumed from "
        f"step {resumed} "
        f"(steps lost {step_then - resumed}), pods {len(pods)}, Job failures {failed}, "
        f"Succeeded {recovered_s:.1f} s after the kill"
    )
