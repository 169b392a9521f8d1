"""Progress reporting: the resource's status in a cluster, a progress bar on a workstation."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from difftrain.api import (
    GROUP,
    VERSION,
    ClipScoreStatus,
    DatasetReport,
    ExportedFile,
    ValidationStatus,
)

logger = logging.getLogger(__name__)

PLURAL = "diffusiontrainingjobs"


@dataclass(frozen=True)
class Progress:
    """Where training stands after one optimizer step."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    images_per_second: float
    eta_seconds: float
    learning_rate: float


def format_eta(seconds: float) -> str:
    """'1h20m', '4m10s', '12s'."""
    s = max(0, int(seconds))
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_text(step: int, total: int) -> str:
    """The status's progress column: '250/1000 (25%)'."""
    pct = int(100 * step / total) if total else 0
    return f"{step}/{total} ({pct}%)"


class Reporter(Protocol):
    """Receives the trainer's progress and results."""

    def started(self, total_steps: int, resumed_from: str | None) -> None: ...
    def dataset(self, report: DatasetReport) -> None: ...
    def progress(self, progress: Progress) -> None: ...
    def checkpoint(self, uri: str) -> None: ...
    def samples(self, uris: list[str]) -> None: ...
    def validation(self, status: ValidationStatus) -> None: ...
    def clip_score(self, status: ClipScoreStatus) -> None: ...
    def finished(self, outputs: list[ExportedFile]) -> None: ...
    def close(self) -> None: ...


class ConsoleReporter:
    """A tqdm progress bar (on a terminal) and key=value log lines."""

    def __init__(self, bar: bool = True) -> None:
        self.bar_enabled = bar
        self.bar: Any = None

    def started(self, total_steps: int, resumed_from: str | None) -> None:
        if resumed_from:
            logger.info("resumed checkpoint=%s", resumed_from)
        if self.bar_enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="training", unit="step", file=sys.stderr)

    def dataset(self, report: DatasetReport) -> None:
        dropped = ", ".join(f"{k}={v}" for k, v in report.dropped.items()) or "none"
        logger.info(
            "dataset total=%d kept=%d augmented=%d dropped: %s",
            report.total,
            report.kept,
            report.augmented,
            dropped,
        )
        for reason, keys in report.examples.items():  # where to look, for each reason and note
            count = report.dropped.get(reason, report.notes.get(reason, 0))
            logger.info("dataset %s=%d e.g. %s", reason, count, ", ".join(keys))
        for number, part in enumerate(report.datasets):  # spec.datasets: each one's part
            logger.info(
                "datasets[%d] %s weight=%g total=%d kept=%d examples_per_epoch=%d (%.1f%%)",
                number,
                part.uri,
                part.weight,
                part.total,
                part.kept,
                part.examples_per_epoch,
                100 * part.share,
            )

    def progress(self, progress: Progress) -> None:
        if self.bar is not None:
            self.bar.n = progress.step
            self.bar.set_postfix(
                loss=f"{progress.loss:.4f}",
                lr=f"{progress.learning_rate:.2e}",
                img_s=f"{progress.images_per_second:.1f}",
                refresh=False,
            )
            self.bar.refresh()

    def checkpoint(self, uri: str) -> None:
        logger.info("checkpoint committed uri=%s", uri)

    def samples(self, uris: list[str]) -> None:
        logger.info("samples written count=%d first=%s", len(uris), uris[0] if uris else "")

    def validation(self, status: ValidationStatus) -> None:
        if self.bar is not None:
            text = f"step {status.step}: validation loss {status.loss:.4f}"
            self.bar.write(text, file=sys.stderr)

    def clip_score(self, status: ClipScoreStatus) -> None:
        if self.bar is not None:
            text = f"step {status.step}: CLIP score {status.score:.2f} ({status.images} samples)"
            self.bar.write(text, file=sys.stderr)

    def finished(self, outputs: list[ExportedFile]) -> None:
        for out in outputs:
            logger.info("exported format=%s uri=%s sha256=%s", out.format, out.uri, out.sha256)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StatusReporter:
    """Patches the DiffusionTrainingJob's status (its pod's ServiceAccount may do exactly that).

    Step updates are throttled to one patch per ``interval`` seconds; checkpoints, samples, the
    validation loss, the CLIP score, the dataset report and the outputs are written at once. A
    failed patch is logged and retried with the next update: reporting never stops training.
    """

    def __init__(
        self, name: str, namespace: str, *, interval: float = 10.0, api_client: Any = None
    ) -> None:
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = client.CustomObjectsApi(api_client)
        self.name = name
        self.namespace = namespace
        self.interval = interval
        self.last_patch = 0.0
        self.pending: dict[str, Any] = {}

    def _patch(self, fields: dict[str, Any], *, now: bool) -> None:
        self.pending.update(fields)
        if not now and time.monotonic() - self.last_patch < self.interval:
            return
        body = {"status": self.pending}
        try:
            self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, body
            )
        except Exception as exc:  # noqa: BLE001 - any API failure: keep training, retry later
            logger.warning("status patch failed name=%s error=%s", self.name, exc)
            return
        self.pending = {}
        self.last_patch = time.monotonic()

    def started(self, total_steps: int, resumed_from: str | None) -> None:
        fields: dict[str, Any] = {"totalSteps": total_steps}
        if resumed_from:
            fields["latestCheckpoint"] = resumed_from
        self._patch(fields, now=True)

    def dataset(self, report: DatasetReport) -> None:
        self._patch({"dataset": report.to_wire()}, now=True)

    def progress(self, progress: Progress) -> None:
        self._patch(
            {
                "step": progress.step,
                "totalSteps": progress.total_steps,
                "progress": progress_text(progress.step, progress.total_steps),
                "epoch": progress.epoch,
                "loss": round(progress.loss, 6),
                "imagesPerSecond": round(progress.images_per_second, 2),
                "eta": format_eta(progress.eta_seconds),
            },
            now=progress.step >= progress.total_steps,
        )

    def checkpoint(self, uri: str) -> None:
        self._patch({"latestCheckpoint": uri}, now=True)

    def samples(self, uris: list[str]) -> None:
        self._patch({"samples": uris[-64:]}, now=True)

    def validation(self, status: ValidationStatus) -> None:
        self._patch({"validation": status.to_wire()}, now=True)

    def clip_score(self, status: ClipScoreStatus) -> None:
        self._patch({"clipScore": status.to_wire()}, now=True)

    def finished(self, outputs: list[ExportedFile]) -> None:
        self._patch({"outputs": [o.to_wire() for o in outputs]}, now=True)

    def close(self) -> None:
        if self.pending:
            self._patch({}, now=True)


class Reporters:
    """Several reporters as one."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def started(self, total_steps: int, resumed_from: str | None) -> None:
        for r in self.reporters:
            r.started(total_steps, resumed_from)

    def dataset(self, report: DatasetReport) -> None:
        for r in self.reporters:
            r.dataset(report)

    def progress(self, progress: Progress) -> None:
        for r in self.reporters:
            r.progress(progress)

    def checkpoint(self, uri: str) -> None:
        for r in self.reporters:
            r.checkpoint(uri)

    def samples(self, uris: list[str]) -> None:
        for r in self.reporters:
            r.samples(uris)

    def validation(self, status: ValidationStatus) -> None:
        for r in self.reporters:
            r.validation(status)

    def clip_score(self, status: ClipScoreStatus) -> None:
        for r in self.reporters:
            r.clip_score(status)

    def finished(self, outputs: list[ExportedFile]) -> None:
        for r in self.reporters:
            r.finished(outputs)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
