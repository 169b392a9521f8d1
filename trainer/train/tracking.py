"""Experiment trackers through Accelerate: TensorBoard by default, MLflow and W&B when asked for.

What is logged: each step's training loss and the learning rate (at the loop's host reads, so
no extra device sync), the validation loss, the sample grids and their CLIP score.
TensorBoard's event files are committed to ``<output.uri>/tracking/tensorboard/`` file by file
(each with its own manifest), at every checkpoint and at the end, so a run that resumes in a new
pod adds its own event files beside the earlier ones. Only the main process logs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from difftrain.api import (
    ClipScoreStatus,
    DiffusionTrainingJobSpec,
    TrackingSpec,
    ValidationStatus,
)
from difftrain.storage import Store, commit_file, join, sha256_file
from difftrain.train.methods import TrainingConfigError

logger = logging.getLogger(__name__)

TENSORBOARD_PREFIX = "tracking/tensorboard"
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_backends(spec: TrackingSpec, environ: Mapping[str, str]) -> list[str]:
    """The backends to log to, after checking each has its package and credentials."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {
        "tensorboard": is_tensorboard_available,
        "mlflow": is_mlflow_available,
        "wandb": is_wandb_available,
    }
    for backend in spec.backends:
        if not available[backend]():
            raise TrainingConfigError(
                f"tracking.backends {backend} needs the {PACKAGES[backend]} package, which this "
                f"trainer image does not have; use an image with it or remove {backend} from "
                "tracking.backends"
            )
    if "wandb" in spec.backends and not environ.get("WANDB_API_KEY"):
        raise TrainingConfigError(
            "tracking.backends wandb needs an API key: set tracking.wandb.apiKeySecretRef (a "
            "Secret key, passed to the trainer as WANDB_API_KEY), or WANDB_API_KEY for a local run"
        )
    return list(spec.backends)


def accelerator_options(
    spec: TrackingSpec, logging_dir: Path, environ: Mapping[str, str]
) -> dict[str, Any]:
    """Accelerator(...) keyword arguments for the trackers (none when tracking is off)."""
    backends = check_backends(spec, environ)
    if not backends:
        return {}
    return {"log_with": backends, "project_dir": str(logging_dir)}


def flat_config(wire: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """The spec as flat ``a.b.c`` keys with scalar values (lists as JSON), as trackers take it."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in wire.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, str | int | float | bool):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class ExperimentTracker:
    """The run's trackers (already named in the Accelerator's ``log_with``)."""

    def __init__(
        self,
        accelerator: Any,
        spec: DiffusionTrainingJobSpec,
        *,
        run_name: str,
        store: Store,
        output_uri: str,
        logging_dir: Path,
    ) -> None:
        self.acc = accelerator
        self.spec = spec.tracking
        self.main = bool(accelerator.is_main_process)
        self.store = store
        self.output_uri = output_uri
        self.logging_dir = logging_dir
        self._synced: dict[Path, tuple[int, int]] = {}
        init: dict[str, Any] = {}
        name = self.spec.run_name or run_name
        if "tensorboard" in self.spec.backends:
            init["tensorboard"] = {"flush_secs": 30}
        if self.spec.mlflow is not None and self.main:
            import mlflow

            mlflow.set_tracking_uri(self.spec.mlflow.tracking_uri)
            init["mlflow"] = {"run_name": name}
        if self.spec.wandb is not None or "wandb" in self.spec.backends:
            wb: dict[str, Any] = {"name": name}
            if self.spec.wandb is not None and self.spec.wandb.entity:
                wb["entity"] = self.spec.wandb.entity
            if self.spec.wandb is not None and self.spec.wandb.base_url and self.main:
                import wandb

                wb["settings"] = wandb.Settings(base_url=self.spec.wandb.base_url)
            init["wandb"] = wb
        accelerator.init_trackers(
            self.spec.project, config=flat_config(spec.to_wire()), init_kwargs=init
        )

    def log_losses(self, last_step: int, losses: list[float], learning_rate: float) -> None:
        """Each step's loss (the steps up to ``last_step``) and the learning rate."""
        if not self.main:
            return
        first = last_step - len(losses) + 1
        for i, loss in enumerate(losses):
            self.acc.log({"train/loss": loss}, step=first + i)
        self.acc.log({"train/learning_rate": learning_rate}, step=last_step)

    def log_validation(self, status: ValidationStatus) -> None:
        if self.main:
            self.acc.log({"validation/loss": status.loss}, step=status.step)

    def log_clip_score(self, status: ClipScoreStatus) -> None:
        if self.main:
            self.acc.log({"samples/clip_score": status.score}, step=status.step)

    def log_samples(self, step: int, grid: Any) -> None:
        """The sample grid (a PIL image) of ``step``."""
        if not self.main:
            return
        import numpy as np

        pixels = np.asarray(grid.convert("RGB"))
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("samples", pixels, step, dataformats="HWC")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [grid]}, step=step)
            elif tracker.name == "mlflow":
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / f"step-{step:08d}.png"
                    grid.save(path)
                    tracker.log_artifact(str(path), artifact_path="samples")

    def sync(self) -> list[str]:
        """Commit the TensorBoard files that changed since the last sync; their URIs."""
        if not self.main or "tensorboard" not in self.spec.backends:
            return []
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.flush()
        committed: list[str] = []
        with tempfile.TemporaryDirectory(prefix="difftrain-tb-") as tmp:
            for path in sorted(p for p in self.logging_dir.rglob("*") if p.is_file()):
                stat = path.stat()
                signature = (stat.st_size, stat.st_mtime_ns)
                if self._synced.get(path) == signature:
                    continue
                copy = Path(tmp) / "upload"  # the writer may append while this uploads
                shutil.copyfile(path, copy)
                rel = path.relative_to(self.logging_dir).as_posix()
                uri = join(self.output_uri, TENSORBOARD_PREFIX, rel)
                commit_file(self.store, uri, copy, sha256_file(copy))
                self._synced[path] = signature
                committed.append(uri)
        if committed:
            logger.info("tracking files committed count=%d", len(committed))
        return committed

    def finish(self) -> None:
        """Close the trackers and commit the last event files (``Accelerator.end_training``
        closes them again, which is harmless, and ends the process group)."""
        if self.main:
            for tracker in self.acc.trackers:
                tracker.finish()
        self.sync()
