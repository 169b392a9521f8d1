"""Operator benchmark: N DiffusionTrainingJobs applied at once; time from apply to child Job.

Starts the real control plane from the test infrastructure (etcd, kube-apiserver,
kube-controller-manager on loopback) and `difftrain operator` as its own process, applies N
resources as fast as the API server takes them, and records for each the time from the create
call's return to the moment a watch on Jobs sees its child. The baseline, measured in the same run,
is the same path without the operator: N ConfigMaps created and seen through a watch.

    python benchmarks/operator_bench.py            # 200 resources
    python benchmarks/operator_bench.py --count 10 # smoke test
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _watch(list_fn, namespace, seen, stop):  # type: ignore[no-untyped-def]
    from kubernetes import watch

    w = watch.Watch()
    while not stop.is_set():
        for event in w.stream(list_fn, namespace, timeout_seconds=2):
            name = event["object"].metadata.name
            seen.setdefault(name, time.perf_counter())
            if stop.is_set():
                break


def _rss_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _api_requests(plane) -> Counter[str]:  # type: ignore[no-untyped-def]
    """The API server's request counters, as 'VERB resource' -> count (watches excluded)."""
    counts: Counter[str] = Counter()
    text = plane.kubectl("get", "--raw", "/metrics").stdout
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if labels.get("verb") in ("WATCH", "LIST") and labels.get("resource") == "":
            continue
        key = f"{labels.get('verb')} {labels.get('resource')}"
        if labels.get("subresource"):
            key += "/" + labels["subresource"]
        counts[key] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def run(
    count: int,
    clients: int = 1,
    profile: Path | None = None,
    server_profile: Path | None = None,
) -> None:
    from kubernetes import client, config

    from difftrain import api
    from tests.infra.environment import ControlPlane, binary_dir
    from tests.infra.processes import start_operator

    work = Path(tempfile.mkdtemp(prefix="difftrain-operator-bench-"))
    plane = ControlPlane(binary_dir(), work)
    plane.start()
    operator = None
    try:
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all")
        config.load_kube_config(str(plane.kubeconfig))
        core, objects = client.CoreV1Api(), client.CustomObjectsApi()
        for ns in ("baseline", "bench"):
            core.create_namespace({"metadata": {"name": ns}})
        # a GPU node, as in the clusters this runs in (without one, every resource also gets an
        # InsufficientGPUs Warning)
        core.create_node({"metadata": {"name": "gpu-node"}})
        gpus = {"nvidia.com/gpu": "8"}
        core.patch_node_status("gpu-node", {"status": {"allocatable": gpus, "capacity": gpus}})
        core.create_namespaced_secret(
            "bench",
            {"metadata": {"name": "creds"}, "stringData": {"accessKey": "a", "secretKey": "b"}},
        )

        # baseline: create -> seen by a watch, without the operator in the path
        seen: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(
            target=_watch,
            args=(core.list_namespaced_config_map, "baseline", seen, stop),
            daemon=True,
        )
        watcher.start()
        time.sleep(1)
        created: dict[str, float] = {}
        for i in range(count):
            name = f"cm-{i}"
            core.create_namespaced_config_map("baseline", {"metadata": {"name": name}})
            created[name] = time.perf_counter()
        deadline = time.monotonic() + 120
        while len([n for n in created if n in seen]) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        baseline = [max(0.0, seen[n] - created[n]) for n in created if n in seen]

        operator = start_operator(plane.kubeconfig, "bench", work / "operator.log")
        time.sleep(5)
        _, idle_hwm = _rss_mib(operator.pid)

        jobs_seen: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(
            target=_watch,
            args=(client.BatchV1Api().list_namespaced_job, "bench", jobs_seen, stop),
            daemon=True,
        )
        watcher.start()
        time.sleep(1)
        applied: dict[str, float] = {}
        pids = {p.name: p.proc.pid for p in plane.processes if p.proc is not None}
        pids["operator"] = operator.pid
        cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        requests_before = _api_requests(plane)
        spy = None
        if profile is not None:  # sampled stacks of the operator during the burst
            spy = subprocess.Popen(
                [
                    *("py-spy", "record", "--format", "raw", "--rate", "200", "--nonblocking"),
                    *("--pid", str(operator.pid), "--output", str(profile)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        pprof = None
        if server_profile is not None:  # the API server's CPU profile (Go pprof) for 10 s
            pprof = threading.Thread(
                target=lambda: server_profile.write_bytes(
                    subprocess.run(
                        [
                            *(str(plane.bin_dir / "kubectl"), f"--kubeconfig={plane.kubeconfig}"),
                            *("get", "--raw", "/debug/pprof/profile?seconds=10"),
                        ],
                        capture_output=True,
                        check=True,
                    ).stdout
                )
            )
            pprof.start()

        def apply(indices: range) -> None:
            for i in indices:
                name = f"job-{i}"
                body = {
                    "apiVersion": api.API_VERSION,
                    "kind": "DiffusionTrainingJob",
                    "metadata": {"name": name},
                    "spec": {
                        "baseModel": {"uri": "s3://models/sd15"},
                        "dataset": {"uri": "s3://data/pets"},
                        "output": {"uri": f"s3://runs/{name}"},
                        "storage": {"endpoint": "minio:9000", "secretRef": {"name": "creds"}},
                    },
                }
                objects.create_namespaced_custom_object(
                    api.GROUP, api.VERSION, "bench", "diffusiontrainingjobs", body
                )
                applied[name] = time.perf_counter()

        # `clients` appliers in parallel, each with its share of the resources
        appliers = [
            threading.Thread(target=apply, args=(range(c, count, clients),)) for c in range(clients)
        ]
        t0 = time.perf_counter()
        for thread in appliers:
            thread.start()
        for thread in appliers:
            thread.join()
        apply_seconds = time.perf_counter() - t0
        deadline = time.monotonic() + 600
        while len(jobs_seen) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        if pprof is not None:
            pprof.join()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        cpu_used = {name: _cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        requests = _api_requests(plane) - requests_before
        rss, hwm = _rss_mib(operator.pid)
        operator_cpu = cpu_used["operator"]
        burst_seconds = max(jobs_seen.values(), default=t0) - t0
        latencies = [jobs_seen[n] - applied[n] for n in applied if n in jobs_seen]
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=30)
        plane.stop()

    print(
        f"{count} resources applied by {clients} client(s) in {apply_seconds:.2f}s; "
        f"{len(latencies)} child Jobs seen"
    )
    print(f"{'path':<34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, values in (
        ("baseline: ConfigMap create->watch", baseline),
        ("operator: DTJ apply->child Job", latencies),
    ):
        print(
            f"{label:<34} {statistics.median(values) * 1e3:8.0f} "
            f"{_percentile(values, 0.99) * 1e3:8.0f} {max(values) * 1e3:8.0f}"
        )
    ratio = _percentile(latencies, 0.99) / _percentile(baseline, 0.99)
    print(f"p99 ratio operator/baseline: {ratio:.1f}x")
    print(f"operator RSS: {rss:.0f} MiB now, {hwm:.0f} MiB peak ({idle_hwm:.0f} MiB when idle)")
    print(
        f"all Jobs created {burst_seconds:.1f}s after the first apply; operator CPU time "
        f"{operator_cpu:.1f}s ({os.cpu_count()} cores shared with the control plane)"
    )
    print(
        "CPU seconds from the first apply to the last Job: "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu_used.items())
    )
    print(f"API requests in that time, per resource ({sum(requests.values())} in all):")
    for key, n in requests.most_common():
        print(f"  {key:<40} {n / count:6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--clients", type=int, default=1, help="parallel appliers (default 1)")
    parser.add_argument(
        "--profile", type=Path, help="write py-spy's raw stacks of the operator during the burst"
    )
    parser.add_argument(
        "--server-profile", type=Path, help="write the API server's Go CPU profile (first 10 s)"
    )
    args = parser.parse_args()
    run(args.count, args.clients, args.profile, args.server_profile)
