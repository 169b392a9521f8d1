"""Start one training process per GPU (or per requested CPU process) on this machine.

A pod runs ``difftrain run job.yaml`` once; when the job wants several processes this launcher
starts them with the torch.distributed environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) that
Accelerate reads, forwards SIGTERM to them, and exits with a code the operator can read: 75 when
they stopped on request after a checkpoint, 3 for a configuration error, else the first failure.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from difftrain.api import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    """Machines and processes of one job, as the operator's pod environment describes them."""

    num_machines: int = 1
    num_processes: int = 1  # over all machines
    machine_rank: int = 0
    main_address: str = "127.0.0.1"
    main_port: int = 29500

    @property
    def per_machine(self) -> int:
        return max(1, self.num_processes // max(1, self.num_machines))

    @classmethod
    def from_env(cls, env: dict[str, str], processes: int | None = None) -> Topology:
        machines = int(env.get("DIFFTRAIN_NUM_MACHINES", "1"))
        return cls(
            num_machines=machines,
            num_processes=processes or int(env.get("DIFFTRAIN_NUM_PROCESSES", str(machines))),
            machine_rank=int(env.get("DIFFTRAIN_MACHINE_RANK", "0")),
            main_address=env.get("DIFFTRAIN_MAIN_ADDRESS", "127.0.0.1"),
            main_port=int(env.get("DIFFTRAIN_MAIN_PORT", "29500")),
        )


def inside_launcher(env: dict[str, str]) -> bool:
    """Whether this process was started by a launcher (torchrun, accelerate, ours)."""
    return "WORLD_SIZE" in env and "LOCAL_RANK" in env


def process_env(topology: Topology, local_rank: int, base: dict[str, str]) -> dict[str, str]:
    """The torch.distributed environment of one local process."""
    per = topology.per_machine
    env = dict(base)
    env.update(
        {
            "RANK": str(topology.machine_rank * per + local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(per * topology.num_machines),
            "LOCAL_WORLD_SIZE": str(per),
            "GROUP_RANK": str(topology.machine_rank),
            "MASTER_ADDR": topology.main_address,
            "MASTER_PORT": str(topology.main_port),
        }
    )
    return env


def combined_exit_code(codes: Sequence[int]) -> int:
    """One exit code for the pod from its processes' codes."""
    failures = [c for c in codes if c != 0]
    if not failures:
        return 0
    if EXIT_CONFIG_ERROR in failures:
        return EXIT_CONFIG_ERROR
    if all(c == EXIT_INTERRUPTED for c in failures):
        return EXIT_INTERRUPTED
    return next(c for c in failures if c != EXIT_INTERRUPTED)


def launch(argv: Sequence[str], topology: Topology) -> int:
    """Run ``python -m difftrain <argv>`` once per local process and wait for all of them."""
    procs: list[subprocess.Popen[bytes]] = []
    for local_rank in range(topology.per_machine):
        env = process_env(topology, local_rank, dict(os.environ))
        procs.append(subprocess.Popen([sys.executable, "-m", "difftrain", *argv], env=env))
    logger.info("started processes=%d machine_rank=%d", len(procs), topology.machine_rank)

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for p in procs:
        code = p.wait()
        codes.append(code)
        if code not in (0, EXIT_INTERRUPTED):
            # one failed process leaves the others blocked in a collective: stop them
            for other in procs:
                if other.poll() is None:
                    other.terminate()
    return combined_exit_code(codes)
