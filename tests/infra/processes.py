"""Start and stop the test infrastructure's server processes.

Each server runs in its own session with its output in a log file; it is asked to die with the test
process (PR_SET_PDEATHSIG), so even a test run killed with SIGKILL leaves no server behind.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# ports handed out: from this one up to the kernel's ephemeral range or Kubernetes' NodePort range
LOWEST_PORT = 10000
NODE_PORTS_FROM = 30000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, not handed out before by this
    process, below the kernel's ephemeral range and the node's NodePorts: a port the kernel
    picks (``bind`` to 0) may be taken as the local port of an outgoing connection before the
    server binds it (etcd once found its port so taken while the other test process connected)."""
    high = max(LOWEST_PORT + 1000, min(NODE_PORTS_FROM, _ephemeral_low()))
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(LOWEST_PORT, high)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


class ServerProcess:
    """One server binary, its log, and how to tell it is ready."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process, output to its log file."""
        full_env = dict(os.environ)
        if self.env:
            full_env.update(self.env)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def log_tail(self, lines: int = 40) -> str:
        """The end of the log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, probe: Callable[[], bool], timeout: float) -> None:
        """Poll ``probe`` until it is true; raise with the log's tail on exit or timeout."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            if probe():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL after ``grace`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=grace)
        except ProcessLookupError:
            pass


def start_operator(
    kubeconfig: Path, namespace: str, log_path: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """`difftrain operator --standalone` for one namespace, as the given kubeconfig's user."""
    argv = [sys.executable, "-m", "difftrain.cli", "operator", "--standalone"]
    argv += ["--namespace", namespace, *extra]
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, KUBECONFIG=str(kubeconfig)),
        )
