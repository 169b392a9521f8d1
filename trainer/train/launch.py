"""Start the training processes of this machine with torch's elastic launcher.

A pod runs ``difftrain run job.yaml`` once. When the job has more than one process in all (one
machine with several GPUs, several machines with one GPU each, or both), this process becomes a
torch elastic agent (``torch.distributed.launcher.api.elastic_launch``): the agents of all
machines meet at a c10d rendezvous hosted by machine 0 (the headless Service's address), agree on
ranks, and each starts ``python -m difftrain <args>`` once per local process with the
torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) that Accelerate
reads.

Faults: when a process dies, its agent restarts the whole group (every machine's processes, a new
rendezvous round), and training resumes from the newest checkpoint; a replaced pod that joins
makes the others restart theirs the same way (membership changes use no restart). The agent
forwards SIGTERM to its processes, which finish their step, checkpoint and exit 75.

Exit codes for the operator: 0 done, 75 stopped on request after a checkpoint, 3 a configuration
error (no retry helps), else the first failure's code.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from difftrain.api import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED

logger = logging.getLogger(__name__)

# restarts of a machine's process group after a process failed (a replaced pod joining uses none)
DEFAULT_MAX_RESTARTS = 3
# how long the agent waits for its processes to checkpoint after SIGTERM before it kills them
DEFAULT_STOP_TIMEOUT_S = 120
# how long the agents wait for each other at the rendezvous (pods start at different times)
RENDEZVOUS_TIMEOUT_S = 900


@dataclass(frozen=True)
class Topology:
    """Machines and processes of one job, as the operator's pod environment describes them."""

    num_machines: int = 1
    per_machine: int = 1  # processes on each machine
    machine_rank: int = 0
    main_address: str = "127.0.0.1"
    main_port: int = 29500
    run_id: str = "difftrain"
    local_address: str | None = None  # this machine's address the others can reach
    max_restarts: int = DEFAULT_MAX_RESTARTS
    stop_timeout_s: int = DEFAULT_STOP_TIMEOUT_S

    @property
    def world_size(self) -> int:
        return self.num_machines * self.per_machine

    @property
    def needs_launcher(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str], processes: int | None = None) -> Topology:
        """From the pod's environment; ``processes`` (``--processes``) is per machine."""
        machines = max(1, int(env.get("DIFFTRAIN_NUM_MACHINES", "1")))
        total = int(env.get("DIFFTRAIN_NUM_PROCESSES", str(machines)))
        return cls(
            num_machines=machines,
            per_machine=processes or max(1, total // machines),
            machine_rank=int(env.get("DIFFTRAIN_MACHINE_RANK", "0")),
            main_address=env.get("DIFFTRAIN_MAIN_ADDRESS", "127.0.0.1"),
            main_port=int(env.get("DIFFTRAIN_MAIN_PORT", "29500")),
            run_id=env.get("DIFFTRAIN_RUN_ID") or env.get("DIFFTRAIN_JOB_NAME") or "difftrain",
            local_address=env.get("DIFFTRAIN_POD_IP") or None,
            max_restarts=int(env.get("DIFFTRAIN_MAX_RESTARTS", str(DEFAULT_MAX_RESTARTS))),
            stop_timeout_s=int(env.get("DIFFTRAIN_STOP_TIMEOUT", str(DEFAULT_STOP_TIMEOUT_S))),
        )


def inside_launcher(env: Mapping[str, str]) -> bool:
    """Whether this process was started by a launcher (torchrun, accelerate, ours)."""
    return "WORLD_SIZE" in env and "LOCAL_RANK" in env


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


def pod_exit_code(code: int) -> int:
    """A process's exit code as a shell reports it: killed by signal N is 128 + N."""
    return 128 - code if code < 0 else code


# a process that ends with one of these answered; running it again gives the same answer
_FINAL_EXIT_CODES = (EXIT_CONFIG_ERROR, EXIT_INTERRUPTED)


def rendezvous_parameters(topology: Topology) -> Any:
    """Where and how the machines' agents meet (c10d, hosted by machine 0)."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    return RendezvousParameters(
        backend="c10d",
        endpoint=f"{topology.main_address}:{topology.main_port}",
        run_id=topology.run_id,
        min_nodes=topology.num_machines,
        max_nodes=topology.num_machines,
        local_addr=topology.local_address,
        # machine 0 hosts the rendezvous store; its address need not match its own host name
        is_host=topology.machine_rank == 0,
        timeout=RENDEZVOUS_TIMEOUT_S,
    )


def _agent(topology: Topology, argv: Sequence[str]) -> Any:
    from torch.distributed.elastic.agent.server.api import (
        RunResult,
        WorkerGroup,
        WorkerSpec,
        WorkerState,
    )
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    class TrainerAgent(LocalElasticAgent):
        """Restarts the process group after a crash, never after an answer.

        A configuration error (3) or a stop on request (75) would come back on every restart,
        so the group stops instead of using its restarts on it.
        """

        def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
            result: RunResult = super()._monitor_workers(worker_group)
            if result.state == WorkerState.FAILED and any(
                f.exitcode in _FINAL_EXIT_CODES for f in result.failures.values()
            ):
                self._remaining_restarts = 0
            return result

    spec = WorkerSpec(
        role="trainer",
        local_world_size=topology.per_machine,
        entrypoint=sys.executable,
        args=("-m", "difftrain", *argv),
        rdzv_handler=get_rendezvous_handler(rendezvous_parameters(topology)),
        max_restarts=topology.max_restarts,
        monitor_interval=0.5,
        local_addr=topology.local_address,
    )
    return TrainerAgent(
        spec=spec,
        logs_specs=DefaultLogsSpecs(),
        start_method="spawn",
        shutdown_timeout=topology.stop_timeout_s,
    )


def launch(argv: Sequence[str], topology: Topology) -> int:
    """Run ``python -m difftrain <argv>`` on every process of the job; this machine's part."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.rendezvous import RendezvousError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    logger.info(
        "starting processes=%d machine_rank=%d machines=%d rendezvous=%s:%d",
        topology.per_machine,
        topology.machine_rank,
        topology.num_machines,
        topology.main_address,
        topology.main_port,
    )
    # the agent turns these signals into a stop: its processes get them and checkpoint
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP"
    # each attempt's processes meet in a store of their own, hosted by rank 0: in the store the
    # agents share across rounds, a restarted group read the killed process's old address
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    agent = _agent(topology, argv)
    close_rendezvous = True
    try:
        result = agent.run()
    except SignalException as exc:
        # the processes got the signal, checkpointed and stopped (or were killed after
        # stop_timeout_s, leaving the previous checkpoint as the newest); the rendezvous stays
        # open for the machines that go on
        close_rendezvous = False
        logger.warning("stopped by signal %s", exc.sigval)
        return EXIT_INTERRUPTED
    except RendezvousError as exc:
        # another machine's agent gave up (its restarts used up) or never came
        logger.error(
            "the machines of this job cannot meet at %s:%d: %s",
            topology.main_address,
            topology.main_port,
            exc,
        )
        return 1
    finally:
        if close_rendezvous:
            agent._worker_group.spec.rdzv_handler.shutdown()
    if not result.is_failed():
        return 0
    codes = [pod_exit_code(f.exitcode) for f in result.failures.values()]
    logger.error("training processes ended with exit codes %s", codes)
    return combined_exit_code(codes)
