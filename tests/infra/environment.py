"""The real test infrastructure: etcd, kube-apiserver, kube-controller-manager and MinIO.

The same shape as controller-runtime's envtest, plus the controller-manager (so Jobs make Pods and
owner references garbage-collect) and an object store. Binaries come from ``hack/build-binaries.sh``
(built once per machine and version, cached outside the repository) or from a folder named by
``DIFFTRAIN_TEST_ASSETS`` / ``KUBEBUILDER_ASSETS``.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.infra import certs
from tests.infra.processes import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
# what the test infrastructure builds once per machine (binaries, images, containerd's store)
CACHE_ROOT = Path(
    os.environ.get("DIFFTRAIN_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "difftrain"
)
BUILD_SCRIPT = REPO / "hack" / "build-binaries.sh"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "minio",
    "helm",
    "kwok",
    "coredns",
    "kueue",
    "prometheus",
    "promtool",
)
# folders the build script links beside the binaries
ASSET_DIRS = ("kueue-manifests", "prometheus-operator-crds", "argocd-crds")


def binary_dir() -> Path:
    """The folder with every pinned binary, building what is missing."""
    ready = os.environ.get("DIFFTRAIN_TESTENV_BIN")
    if ready and all((Path(ready) / b).exists() for b in (*BINARIES, *ASSET_DIRS)):
        return Path(ready)
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager, with an admin kubeconfig."""

    bin_dir: Path
    work_dir: Path
    processes: list[ServerProcess] = field(default_factory=list)
    api_port: int = 0
    kubeconfig: Path = Path()
    # where the API server listens: loopback, or a real node's bridge address that pods reach
    address: str = "127.0.0.1"
    pki: certs.PKI | None = None
    # a real node needs the node lifecycle controller (it lifts the not-ready taint); simulated
    # nodes are left alone
    node_lifecycle: bool = False

    @property
    def server_url(self) -> str:
        return f"https://{self.address}:{self.api_port}"

    def start(self) -> None:
        pki = self.pki = certs.generate(self.work_dir / "pki", extra_ips=[self.address])
        etcd_port, peer_port = free_port(), free_port()
        self.api_port = free_port()
        etcd = ServerProcess(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--data-dir",
                str(self.work_dir / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
            self.work_dir,
        )
        etcd.start()
        self.processes.append(etcd)
        etcd.wait_ready(lambda: http_ok(f"http://127.0.0.1:{etcd_port}/health"), 60)

        apiserver = ServerProcess(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.api_port}",
                f"--tls-cert-file={pki.server_cert}",
                f"--tls-private-key-file={pki.server_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                # a real node is reached at its address (there is no DNS for node names)
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                f"--cert-dir={self.work_dir / 'apiserver-certs'}",
                "--v=1",
            ],
            self.work_dir,
        )
        apiserver.start()
        self.processes.append(apiserver)
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        apiserver.wait_ready(lambda: http_ok(f"{self.server_url}/readyz", ctx), 120)

        self.kubeconfig = self.work_dir / "kubeconfig"
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "difftrain-test",
                            "cluster": {
                                "server": self.server_url,
                                "certificate-authority": str(pki.ca_cert),
                            },
                        }
                    ],
                    "users": [
                        {
                            "name": "admin",
                            "user": {
                                "client-certificate": str(pki.admin_cert),
                                "client-key": str(pki.admin_key),
                            },
                        }
                    ],
                    "contexts": [
                        {
                            "name": "difftrain-test",
                            "context": {"cluster": "difftrain-test", "user": "admin"},
                        }
                    ],
                    "current-context": "difftrain-test",
                }
            ),
            encoding="utf-8",
        )
        self.kubeconfig.chmod(0o600)

        controller_manager = ServerProcess(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                "--use-service-account-credentials=false",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller"
                + ("" if self.node_lifecycle else ",-nodelifecycle"),
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
            self.work_dir,
        )
        controller_manager.start()
        self.processes.append(controller_manager)
        # Ready once its service-account controller has made the default namespace's account.
        controller_manager.wait_ready(
            lambda: self.kubectl_ok("get", "serviceaccount", "default", "-n", "default"), 120
        )

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this control plane."""
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def wait_established(self, *crds: str, timeout: float = 180) -> None:
        """Wait until every named CRD is Established.

        Not ``kubectl wait``: right after a create a CRD has no ``status.conditions`` yet, and
        kubectl 1.30's wait then fails ("accessor error") instead of waiting.
        """
        query = '{.status.conditions[?(@.type=="Established")].status}'
        deadline = time.monotonic() + timeout
        for crd in crds:
            while True:
                got = self.kubectl("get", "crd", crd, "-o", f"jsonpath={query}", check=False)
                if got.stdout.strip() == "True":
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"CRD {crd} not Established after {timeout:.0f} s")
                time.sleep(0.5)

    def kubectl_ok(self, *args: str) -> bool:
        return self.kubectl(*args, check=False).returncode == 0

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()


@dataclass
class MinioServer:
    """A real MinIO server on loopback with generated root credentials."""

    bin_dir: Path
    work_dir: Path
    access_key: str = "difftrain-test"
    secret_key: str = field(default_factory=lambda: os.urandom(12).hex())
    port: int = 0
    process: ServerProcess | None = None
    address: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    def start(self) -> None:
        """Start MinIO (again on the same port and data, when it ran before)."""
        self.port = self.port or free_port()
        data = self.work_dir / "minio-data"
        data.mkdir(parents=True, exist_ok=True)
        self.process = ServerProcess(
            "minio",
            [
                str(self.bin_dir / "minio"),
                "server",
                str(data),
                "--address",
                self.endpoint,
                "--console-address",
                f"127.0.0.1:{free_port()}",
                "--quiet",
            ],
            self.work_dir,
            env={
                "MINIO_ROOT_USER": self.access_key,
                "MINIO_ROOT_PASSWORD": self.secret_key,
                "MINIO_BROWSER": "off",
                "MINIO_UPDATE": "off",
                "HOME": str(self.work_dir),
            },
        )
        self.process.start()
        self.process.wait_ready(lambda: http_ok(f"http://{self.endpoint}/minio/health/ready"), 90)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class TestEnvironment:
    """Everything the integration tests talk to, started together and torn down together."""

    bin_dir: Path
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="difftrain-env-")))
    control_plane: ControlPlane | None = None
    minio: MinioServer | None = None

    def start(self) -> None:
        try:
            self.minio = MinioServer(self.bin_dir, self.work_dir)
            self.minio.start()
            self.control_plane = ControlPlane(self.bin_dir, self.work_dir)
            self.control_plane.start()
        except BaseException:
            self.stop()
            raise

    def stop(self, keep_logs: bool = False) -> None:
        if self.control_plane is not None:
            self.control_plane.stop()
        if self.minio is not None:
            self.minio.stop()
        if not keep_logs:
            shutil.rmtree(self.work_dir, ignore_errors=True)
