"""Start-up: the operator's settings, Kopf's settings, and the operator-wide state.

The state is made once, when Kopf starts, and handed to every handler through Kopf's ``memo``
(each resource's memo is a shallow copy of the operator's, so all share these objects).
"""

from __future__ import annotations

import asyncio
import logging
import os
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


def operator_settings(environ: dict[str, str] | None = None) -> builders.OperatorSettings:
    """Operator settings from its Deployment's environment (set by the Helm chart)."""
    env = os.environ if environ is None else environ
    defaults = builders.OperatorSettings()
    max_grace = int(env.get("DIFFTRAIN_TRAINER_MAX_GRACE_SECONDS") or 0)  # 0: no cap
    return builders.OperatorSettings(
        trainer_image=env.get("DIFFTRAIN_TRAINER_IMAGE", defaults.trainer_image),
        price_per_gpu_hour=float(env.get("DIFFTRAIN_PRICE_PER_GPU_HOUR", "0") or 0),
        trainer_max_grace_seconds=max_grace or None,
        hub_cache_claim=env.get("DIFFTRAIN_HUB_CACHE_CLAIM", defaults.hub_cache_claim),
    )


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
    """Annotation storage under our prefix, watch timeouts, Events and the executor."""
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
    # The handlers are async; their blocking API calls run in the loop's default executor (6
    # threads on 2 cores unless set), and mostly wait for the API server.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(THREADS, thread_name_prefix="difftrain-api")
    )


def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Configure Kopf and put the operator-wide state into ``memo``."""
    configure(settings)
    memo[MEMO_KEY] = OperatorState.build(operator_settings(), api_client())
