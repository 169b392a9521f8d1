"""Start-up: the operator's settings, Kopf's settings, and the operator-wide state.

The state is made once, when Kopf starts, and handed to every handler through Kopf's ``memo``
(each resource's memo is a shallow copy of the operator's, so all share these objects).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client, config

from difftrain import api
from difftrain_operator import builders, metrics
from difftrain_operator.checks import ClusterChecks
from difftrain_operator.children import ChildCreator
from difftrain_operator.kube import Kube
from difftrain_operator.refresh import StatusRefresher
from difftrain_operator.status_writer import StatusWriter

THREADS = 32  # blocking API calls in flight at most; also the size of the connection pool
MEMO_KEY = "difftrain"
logger = logging.getLogger(__name__)


def _flag(value: str, name: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("", "false", "0", "no"):
        return False
    raise ValueError(f"{name}={value!r}: set it to true or false")


def _label_selector(value: str, name: str) -> builders.Obj:
    try:
        selector = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not JSON ({exc}): set it to a label selector") from None
    if not isinstance(selector, dict):
        raise ValueError(f"{name}={value!r}: set it to a label selector (a JSON object)")
    return selector


def operator_settings(environ: dict[str, str] | None = None) -> builders.OperatorSettings:
    """Operator settings from its Deployment's environment (set by the Helm chart)."""
    env = os.environ if environ is None else environ
    defaults = builders.OperatorSettings()
    max_grace = int(env.get("DIFFTRAIN_TRAINER_MAX_GRACE_SECONDS") or 0)  # 0: no cap
    pull_secrets = env.get("DIFFTRAIN_IMAGE_PULL_SECRETS", "")
    selector = env.get("DIFFTRAIN_METRICS_NAMESPACE_SELECTOR", "")
    return builders.OperatorSettings(
        trainer_image=env.get("DIFFTRAIN_TRAINER_IMAGE", defaults.trainer_image),
        price_per_gpu_hour=float(env.get("DIFFTRAIN_PRICE_PER_GPU_HOUR", "0") or 0),
        trainer_max_grace_seconds=max_grace or None,
        hub_cache_claim=env.get("DIFFTRAIN_HUB_CACHE_CLAIM", defaults.hub_cache_claim),
        image_pull_secrets=tuple(n.strip() for n in pull_secrets.split(",") if n.strip()),
        scratch_request=env.get("DIFFTRAIN_SCRATCH_REQUEST", defaults.scratch_request),
        # empty: no limit
        scratch_limit=env.get("DIFFTRAIN_SCRATCH_LIMIT", defaults.scratch_limit) or None,
        network_policy=_flag(env.get("DIFFTRAIN_NETWORK_POLICY", ""), "DIFFTRAIN_NETWORK_POLICY"),
        metrics_namespace_selector=(
            _label_selector(selector, "DIFFTRAIN_METRICS_NAMESPACE_SELECTOR")
            if selector
            else defaults.metrics_namespace_selector
        ),
    )


def peering_priority(configured: int, started_ns: int) -> int:
    """This replica's Kopf peering priority: the one configured, else one from its start time.

    Kopf pauses an operator that sees a peer of higher priority, and pauses *every* operator
    when two share one, so replicas of one Deployment need distinct priorities. The earlier a
    replica started, the higher its priority (microseconds, negated): the running one keeps
    working, a new one (a second replica, a rolling update's) waits on standby, and takes over
    when the older one stops. A priority set by hand (``--priority``, ``--dev``) wins over these.
    """
    return configured if configured else -(started_ns // 1000)


@dataclass(frozen=True)
class OperatorState:
    """Everything one running operator shares between its handlers."""

    settings: builders.OperatorSettings
    kube: Kube
    checks: ClusterChecks
    children: ChildCreator
    writer: StatusWriter
    refresher: StatusRefresher
    phases: metrics.PhaseTracker

    @classmethod
    def build(cls, settings: builders.OperatorSettings, kube: Kube) -> OperatorState:
        phases = metrics.PhaseTracker()
        writer = StatusWriter(kube, phases)
        return cls(
            settings=settings,
            kube=kube,
            checks=ClusterChecks(kube),
            children=ChildCreator(kube),
            writer=writer,
            refresher=StatusRefresher(writer, settings, phases),
            phases=phases,
        )

    @staticmethod
    def of(memo: kopf.Memo) -> OperatorState:
        """The state made at start-up, from a handler's ``memo``."""
        state = memo[MEMO_KEY]
        assert isinstance(state, OperatorState), "the start-up handler has not run"
        return state


def api_client() -> Kube:
    """One API client (one connection pool) for every handler, after login."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    cfg = client.Configuration.get_default_copy()
    # as many pooled connections as handler threads: an exhausted pool opens a new TLS
    # connection per call, and the handshakes were most of the operator's CPU under load
    cfg.connection_pool_maxsize = THREADS
    return Kube(client.ApiClient(cfg))


def configure(settings: kopf.OperatorSettings) -> None:
    """Annotation storage under our prefix, watch timeouts, Events, peering and the executor."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    # a stalled watch stream is dropped and re-established instead of hanging forever
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    # Events for warnings only: the handlers post their own Events on every phase change, and
    # an Event per handler run would double the API writes of a burst of new resources
    settings.posting.level = logging.WARNING
    if not settings.peering.standalone:
        settings.peering.priority = peering_priority(settings.peering.priority, time.time_ns())
        logger.info("peering %r with priority %d", settings.peering.name, settings.peering.priority)
    # The handlers are async; their blocking API calls run in the loop's default executor (6
    # threads on 2 cores unless set), and mostly wait for the API server.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(THREADS, thread_name_prefix="difftrain-api")
    )


def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Configure Kopf and put the operator-wide state into ``memo``."""
    configure(settings)
    memo[MEMO_KEY] = OperatorState.build(operator_settings(), api_client())
