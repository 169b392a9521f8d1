"""The operator's own Prometheus metrics (``difftrain_operator_`` prefix)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

CREATED = Counter(
    "difftrain_operator_resources_created_total", "Resources the operator started", ["kind"]
)
SUCCEEDED = Counter(
    "difftrain_operator_resources_succeeded_total", "Resources that succeeded", ["kind"]
)
FAILED = Counter(
    "difftrain_operator_resources_failed_total", "Resources that failed", ["kind", "reason"]
)
RECONCILE_SECONDS = Histogram(
    "difftrain_operator_reconcile_duration_seconds",
    "Time to reconcile one resource (children applied, status folded)",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
BY_PHASE = Gauge("difftrain_operator_resources", "Resources by phase", ["kind", "phase"])

PHASES = ("Pending", "Queued", "Preparing", "Running", "Suspended", "Succeeded", "Failed")


@contextmanager
def reconcile_timer(kind: str) -> Iterator[None]:
    """Observe one reconcile's duration."""
    start = time.perf_counter()
    try:
        yield
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - start)


class PhaseTracker:
    """The phase of every resource one operator handles: the by-phase gauge and finish counts."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()

    def record(
        self, kind: str, namespace: str, name: str, phase: str | None, reason: str = ""
    ) -> None:
        """Track a resource's phase (None when it is gone) and count finishes once."""
        key = (kind, namespace, name)
        with self._lock:
            old = self._phases.get(key)
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            if phase != old and phase == "Succeeded":
                SUCCEEDED.labels(kind).inc()
            if phase != old and phase == "Failed":
                FAILED.labels(kind, reason or "Failed").inc()
            counts: dict[str, int] = {}
            for (k, _ns, _n), p in self._phases.items():
                if k == kind:
                    counts[p] = counts.get(p, 0) + 1
            for p in PHASES:
                BY_PHASE.labels(kind, p).set(counts.get(p, 0))
