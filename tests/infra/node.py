"""A real node for the test cluster: containerd, runc, CNI, kubelet, kube-proxy and the scheduler.

Pods run as real containers from images imported into containerd's ``k8s.io`` namespace. The
node's pods sit on a Linux bridge (``dt0``, 10.244.0.0/24, host-local addresses from Debian's CNI
plugins); the API server and MinIO listen on the bridge's own address, which pods reach directly
(MinIO) or through the ``kubernetes`` Service's ClusterIP (kube-proxy's iptables rules). CoreDNS,
on the bridge address too, is the cluster DNS: its kubernetes plugin answers Services and the pod
names of headless Services (``<job>-0.<service>.<namespace>.svc``, where a multi-worker job's
rendezvous is) and every other name with NXDOMAIN (no outside world here). The node advertises
``nvidia.com/gpu`` capacity, so GPU requests schedule; no device is behind it, and the trainer
runs on the CPU.

Needs root (network devices, cgroups, mounts). containerd's content store lives outside the run's
folder (``~/.cache/difftrain/node``), so images imported once are there for the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.infra.environment import CACHE_ROOT, ControlPlane, MinioServer, http_ok
from tests.infra.processes import ServerProcess, free_port

NODE_NAME = "difftrain-node"
BRIDGE = "dt0"
BRIDGE_ADDRESS = "10.244.0.1"
POD_SUBNET = "10.244.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
GPU_CAPACITY = 4
CNI_BIN_DIR = Path("/usr/lib/cni")
PAUSE_IMAGE = "localhost/difftrain/pause:3.9"


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the node, in words (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network devices, cgroups and mounts)")
    for tool in ("containerd", "ctr", "runc", "buildah", "iptables", "ip"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not (CNI_BIN_DIR / "bridge").exists():
        missing.append(f"the CNI plugins in {CNI_BIN_DIR} (containernetworking-plugins)")
    return missing


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result


def setup_bridge() -> None:
    """The pods' bridge with its gateway address, made once (kept for the next run)."""
    if _sh("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
    addresses = _sh("ip", "-o", "addr", "show", "dev", BRIDGE).stdout
    if f" {BRIDGE_ADDRESS}/" not in addresses:
        _sh("ip", "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE)
    _sh("ip", "link", "set", BRIDGE, "up")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


# an import writes the archive's layers into the content store and unpacks them into a snapshot
IMPORT_ROOM_FACTOR = 2
IMPORT_ROOM_MARGIN_BYTES = 4 << 30


@dataclass
class Containerd:
    """containerd with the CRI plugin, runc, overlayfs and the bridge network."""

    work_dir: Path
    store_dir: Path = field(default_factory=lambda: CACHE_ROOT / "node" / "containerd")
    process: ServerProcess | None = None

    @property
    def socket(self) -> Path:
        return self.work_dir / "containerd" / "containerd.sock"

    def ctr(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {result.stderr}")
        return result

    def start(self) -> None:
        base = self.work_dir / "containerd"
        cni_conf = base / "cni"
        cni_conf.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-difftrain.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "difftrain",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "dataDir": str(base / "ipam"),
                                "ranges": [[{"subnet": POD_SUBNET, "gateway": BRIDGE_ADDRESS}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                        {"type": "loopback"},
                    ],
                }
            )
        )
        config = f"""version = 2
root = "{self.store_dir}"
state = "{base / "state"}"
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # a sandbox without CAP_SYS_RESOURCE cannot lower a process's OOM score (the pause
  # container's -998, a Guaranteed pod's -997): keep them at containerd's own
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
"""
        (base / "config.toml").write_text(config)
        self.process = ServerProcess(
            "containerd", ["containerd", "--config", str(base / "config.toml")], self.work_dir
        )
        self.process.start()
        self.process.wait_ready(self._answers, 60)
        self._remove_leftovers()

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            self.ctr("version", timeout=10)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def _remove_leftovers(self) -> None:
        """Containers of an earlier run (the content store is kept, its containers are not)."""
        for task in self.ctr("tasks", "ls", "-q").stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        time.sleep(0.5)
        for container in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("tasks", "rm", "-f", container, check=False)
            self.ctr("containers", "rm", container, check=False)

    def has_image(self, ref: str) -> bool:
        return ref in self.ctr("images", "ls", "-q").stdout.split()

    def import_archive(self, archive: Path, ref: str) -> None:
        """Import ``ref``, then drop the earlier imports of its repository (no pod runs them
        while images are imported). Kept until then, the layers the new image shares with an
        earlier one (the base and the dependencies, gigabytes for the trainer) are neither
        written nor unpacked again; on a disk with less room than the new layers need (twice the
        archive, and a margin) the earlier imports go first."""
        repository = ref.rsplit(":", 1)[0]
        older = [
            name
            for name in self.ctr("images", "ls", "-q").stdout.split()
            if name.startswith(repository + ":") and name != ref
        ]
        need = IMPORT_ROOM_FACTOR * archive.stat().st_size + IMPORT_ROOM_MARGIN_BYTES
        if older and shutil.disk_usage(self.store_dir).free < need:
            self.ctr("images", "rm", "--sync", *older)
            older = []
        self.ctr("images", "import", str(archive), timeout=1800)
        if older:
            self.ctr("images", "rm", "--sync", *older)

    def stop(self) -> None:
        if self.process is not None and self.process.proc is not None:
            # the shims outlive containerd: stop what the kubelet did not
            if self.process.proc.poll() is None:
                self._remove_leftovers()
            self.process.stop(grace=20)


@dataclass
class Node:
    """kubelet, kube-proxy and kube-scheduler for one node of ``control_plane``."""

    control_plane: ControlPlane
    containerd: Containerd
    work_dir: Path
    processes: list[ServerProcess] = field(default_factory=list)

    def start(self) -> None:
        bin_dir = self.control_plane.bin_dir
        kubeconfig = str(self.control_plane.kubeconfig)
        scheduler = ServerProcess(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
            ],
            self.work_dir,
        )
        scheduler.start()
        self.processes.append(scheduler)
        self._start_dns()

        kubelet_dir = self.work_dir / "kubelet"
        kubelet_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # the API server reaches the kubelet for logs; loopback-only test node
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "address": BRIDGE_ADDRESS,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{self.containerd.socket}",
            "failSwapOn": False,
            "resolvConf": "/etc/resolv.conf",
            "clusterDomain": CLUSTER_DOMAIN,
            "clusterDNS": [BRIDGE_ADDRESS],
            "serializeImagePulls": False,
            # a test machine's disk is shared with everything else: never evict for it
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 40,
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
        }
        (kubelet_dir / "config.yaml").write_text(yaml.safe_dump(config))
        kubelet = ServerProcess(
            "kubelet",
            [
                str(bin_dir / "kubelet"),
                f"--config={kubelet_dir / 'config.yaml'}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={kubelet_dir / 'root'}",
                f"--cert-dir={kubelet_dir / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={BRIDGE_ADDRESS}",
                "--v=1",
            ],
            self.work_dir,
        )
        kubelet.start()
        self.processes.append(kubelet)
        kubelet.wait_ready(self._node_ready, 180)
        self._advertise_gpus()

        proxy = ServerProcess(
            "kube-proxy",
            [
                str(bin_dir / "kube-proxy"),
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={NODE_NAME}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={POD_SUBNET}",
                f"--healthz-bind-address=127.0.0.1:{free_port()}",
                f"--metrics-bind-address=127.0.0.1:{free_port()}",
                "--conntrack-max-per-core=0",
                "--v=1",
            ],
            self.work_dir,
        )
        proxy.start()
        self.processes.append(proxy)

    def _start_dns(self) -> None:
        """CoreDNS on the bridge address, ready once its kubernetes plugin has synced."""
        ready_port = free_port()
        corefile = self.work_dir / "Corefile"
        corefile.write_text(
            f"""{CLUSTER_DOMAIN}:53 {{
    bind {BRIDGE_ADDRESS}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} {{
        kubeconfig {self.control_plane.kubeconfig}
        ttl 5
    }}
}}
.:53 {{
    bind {BRIDGE_ADDRESS}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""
        )
        dns = ServerProcess(
            "coredns",
            [str(self.control_plane.bin_dir / "coredns"), "-conf", str(corefile)],
            self.work_dir,
        )
        dns.start()
        self.processes.append(dns)
        dns.wait_ready(lambda: http_ok(f"http://127.0.0.1:{ready_port}/ready"), 60)

    def _node_ready(self) -> bool:
        """Ready, and the not-ready taint lifted by the node lifecycle controller."""
        got = self.control_plane.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if got.returncode != 0:
            return False
        node = json.loads(got.stdout)
        ready = [c for c in node["status"].get("conditions", []) if c["type"] == "Ready"]
        taints = node["spec"].get("taints", [])
        return bool(ready) and ready[0]["status"] == "True" and not taints

    def _advertise_gpus(self) -> None:
        """Extended-resource capacity on the node's status, as a device plugin would report."""
        patch = json.dumps(
            [
                {
                    "op": "add",
                    "path": "/status/capacity/nvidia.com~1gpu",
                    "value": str(GPU_CAPACITY),
                }
            ]
        )
        self.control_plane.kubectl(
            "patch", "node", NODE_NAME, "--subresource=status", "--type=json", "-p", patch
        )

    def drain(self, timeout: float = 60) -> None:
        """Every pod deleted and its sandbox torn down by the kubelet (containers, netns)."""
        self.control_plane.kubectl(
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=0",
            "--force",
            "--wait=false",
            check=False,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.containerd.ctr("tasks", "ls", "-q", timeout=10).stdout.split():
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                return
            time.sleep(1)

    def stop(self) -> None:
        if self.processes:
            self.drain()
        for proc in reversed(self.processes):
            proc.stop(grace=20)
        self.processes.clear()


def unmount_under(folder: Path) -> None:
    """Unmount what a kubelet or containerd left mounted under ``folder`` (deepest first)."""
    prefix = str(folder.resolve()) + "/"
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@dataclass
class NodeCluster:
    """A control plane, MinIO and one real node, reachable from pods at the bridge address."""

    bin_dir: Path
    work_dir: Path
    control_plane: ControlPlane | None = None
    minio: MinioServer | None = None
    containerd: Containerd | None = None
    node: Node | None = None

    def start(self) -> None:
        try:
            setup_bridge()
            self.minio = MinioServer(self.bin_dir, self.work_dir, address=BRIDGE_ADDRESS)
            self.minio.start()
            self.control_plane = ControlPlane(
                self.bin_dir, self.work_dir, address=BRIDGE_ADDRESS, node_lifecycle=True
            )
            self.control_plane.start()
            self.containerd = Containerd(self.work_dir)
            self.containerd.start()
        except BaseException:
            self.stop()
            raise

    def start_node(self) -> None:
        """The kubelet and friends (after the pause image is in containerd)."""
        assert self.control_plane is not None and self.containerd is not None
        self.node = Node(self.control_plane, self.containerd, self.work_dir)
        try:
            self.node.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        if self.containerd is not None:
            self.containerd.stop()
        for part in (self.control_plane, self.minio):
            if part is not None:
                part.stop()
        unmount_under(self.work_dir)
        remove_pod_networks()


def remove_pod_networks() -> None:
    """The pods' network namespaces left by sandboxes torn down without CNI (and their veths)."""
    for netns in Path("/var/run/netns").glob("cni-*"):
        subprocess.run(["ip", "netns", "delete", netns.name], capture_output=True, check=False)
