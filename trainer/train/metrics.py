"""The trainer's Prometheus metrics (``difftrain_`` prefix; labels training_job,
training_namespace, rank only).

The names are a contract with the Grafana dashboard in the Helm chart (see README). The labels are
not ``job`` and ``namespace`` because Prometheus sets those on every target it scrapes (the scrape
job; with Kubernetes discovery the pod's namespace): ours would be renamed ``exported_job`` and
``exported_namespace`` and every per-job panel would merge all jobs. Each process keeps its own
registry so that tests and several trainers in one interpreter do not collide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

LABELS = ("training_job", "training_namespace", "rank")
# Checkpoints take seconds (LoRA) to minutes (full SDXL state to a remote store).
CHECKPOINT_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)


@dataclass
class TrainingMetrics:
    """One process's training metrics, optionally served over HTTP."""

    job: str
    namespace: str
    rank: int
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.loss = Gauge("difftrain_loss", "Training loss (smoothed)", LABELS, registry=r)
        self.learning_rate = Gauge(
            "difftrain_learning_rate", "Current learning rate", LABELS, registry=r
        )
        self.images_per_second = Gauge(
            "difftrain_images_per_second", "Training throughput, all processes", LABELS, registry=r
        )
        self.step = Gauge("difftrain_step", "Optimizer steps done", LABELS, registry=r)
        self.total_steps = Gauge(
            "difftrain_total_steps", "Optimizer steps planned", LABELS, registry=r
        )
        self.eta_seconds = Gauge(
            "difftrain_eta_seconds", "Estimated seconds until training ends", LABELS, registry=r
        )
        self.images_seen = Counter(
            "difftrain_images_seen", "Training images consumed, all processes", LABELS, registry=r
        )
        self.gpu_memory_bytes = Gauge(
            "difftrain_gpu_memory_bytes",
            "Peak GPU memory allocated by this process",
            LABELS,
            registry=r,
        )
        self.data_wait_seconds = Counter(
            "difftrain_data_wait_seconds",
            "Time the training loop waited for the next batch",
            LABELS,
            registry=r,
        )
        # Touched at the first evaluation only: a job without validation shows no series.
        self.validation_loss = Gauge(
            "difftrain_validation_loss",
            "Validation loss on held-out images at fixed timesteps and noise (all processes)",
            LABELS,
            registry=r,
        )
        # Touched at the first score only: a job without sampling.clipModelUri shows no series.
        self.clip_score = Gauge(
            "difftrain_clip_score",
            "CLIP score of the newest sample images against their prompts (100 x cosine, mean)",
            LABELS,
            registry=r,
        )
        self.checkpoint_duration = Histogram(
            "difftrain_checkpoint_duration_seconds",
            "Time to write and commit one checkpoint",
            LABELS,
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self._labels = {
            "training_job": self.job,
            "training_namespace": self.namespace,
            "rank": str(self.rank),
        }
        # Touch every series so a scrape shows all of them from the start.
        for metric in (
            self.loss,
            self.learning_rate,
            self.images_per_second,
            self.step,
            self.total_steps,
            self.eta_seconds,
            self.images_seen,
            self.gpu_memory_bytes,
            self.data_wait_seconds,
            self.checkpoint_duration,
        ):
            metric.labels(**self._labels)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
        logger.info("metrics served port=%d", port)

    def record_step(
        self,
        *,
        step: int,
        total_steps: int,
        loss: float,
        learning_rate: float,
        images: int,
        images_per_second: float,
        eta_seconds: float,
        data_wait_seconds: float,
        gpu_memory_bytes: int,
    ) -> None:
        """Update the metrics after one optimizer step."""
        labels = self._labels
        self.step.labels(**labels).set(step)
        self.total_steps.labels(**labels).set(total_steps)
        self.loss.labels(**labels).set(loss)
        self.learning_rate.labels(**labels).set(learning_rate)
        self.images_seen.labels(**labels).inc(images)
        self.images_per_second.labels(**labels).set(images_per_second)
        self.eta_seconds.labels(**labels).set(eta_seconds)
        self.data_wait_seconds.labels(**labels).inc(data_wait_seconds)
        self.gpu_memory_bytes.labels(**labels).set(gpu_memory_bytes)

    def record_validation(self, loss: float) -> None:
        """Set the newest validation loss."""
        self.validation_loss.labels(**self._labels).set(loss)

    def record_clip_score(self, score: float) -> None:
        """Set the newest sample images' CLIP score."""
        self.clip_score.labels(**self._labels).set(score)

    def record_checkpoint(self, seconds: float) -> None:
        """Observe one checkpoint's duration."""
        self.checkpoint_duration.labels(**self._labels).observe(seconds)
