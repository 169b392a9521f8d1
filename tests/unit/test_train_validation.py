"""The validation loss (held-out keys, fixed timesteps and noise) and the experiment trackers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from difftrain import api
from difftrain.api import ValidationStatus
from difftrain.storage import FILE_MANIFEST_SUFFIX
from difftrain.train.methods import TrainingConfigError
from difftrain.train.report import ConsoleReporter
from difftrain.train.run import RunOptions, run_training
from difftrain.train.validation import held_out_share, hold_out_each, split_held_out
from tests.training import prepare_local_inputs, tiny_job


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_local_inputs(tmp_path_factory.mktemp("inputs"), images=24)


class Recorder(ConsoleReporter):
    """The console reporter, also keeping what the run reported."""

    def __init__(self) -> None:
        super().__init__(bar=False)
        self.validations: list[ValidationStatus] = []
        self.steps: list[int] = []

    def validation(self, status: ValidationStatus) -> None:
        self.validations.append(status)

    def progress(self, progress: Any) -> None:
        self.steps.append(progress.step)


def _run(job: dict, work: Path, reporter: Recorder | None = None):
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    return run_training(resource, RunOptions(work_dir=work, reporter=reporter))


def _hp(**extra: Any) -> dict[str, Any]:
    return {
        "batchSize": 2,
        "learningRate": 1e-3,
        "maxSteps": 4,
        "warmupSteps": 1,
        "mixedPrecision": "no",
        **extra,
    }


# --- the split -----------------------------------------------------------------------------


def test_the_split_is_by_key_and_does_not_move_when_images_are_added():
    keys = [f"img{i:04d}" for i in range(2000)]
    train, held = split_held_out(keys, 0.1, key=lambda k: k)
    assert 150 < len(held) < 250 and len(train) + len(held) == 2000
    more = keys + [f"new{i:04d}" for i in range(500)]
    _, held_more = split_held_out(more, 0.1, key=lambda k: k)
    assert set(held) == {k for k in held_more if k.startswith("img")}
    assert all(held_out_share(k) < 0.1 for k in held)


def test_several_datasets_hold_out_the_fraction_of_each_as_if_alone():
    """validation.fraction of each dataset: the same keys as that dataset alone would hold out
    (two datasets may share keys); one left with nothing to train on is refused."""
    spec = api.ValidationSpec(fraction=0.2)
    cats = [f"{i:05d}" for i in range(60)]
    dogs = [f"{i:05d}" for i in range(40)] + [f"extra{i}" for i in range(20)]
    kept, held = hold_out_each(spec, [cats, dogs], key=lambda k: k)
    alone = [split_held_out(keys, 0.2, key=lambda k: k) for keys in (cats, dogs)]
    assert kept == [alone[0][0], alone[1][0]]
    assert held == alone[0][1] + alone[1][1]
    assert hold_out_each(api.ValidationSpec(), [cats, dogs], key=lambda k: k) == ([cats, dogs], [])
    lone = next(k for k in cats if held_out_share(k) < 0.2)
    with pytest.raises(TrainingConfigError, match="holds out all 1 kept images"):
        hold_out_each(spec, [cats, [lone]], key=lambda k: k)


def test_bad_validation_settings_are_refused_naming_the_field(inputs: Path, tmp_path: Path):
    job = tiny_job(inputs, tmp_path / "out")
    for validation, field in [
        ({"fraction": 0.1, "uri": str(tmp_path)}, "validation"),
        ({"fraction": 0.9}, "validation.fraction"),
        ({"fraction": 0.1, "timesteps": []}, "validation.timesteps"),
        ({"fraction": 0.1, "timesteps": [10, 10]}, "validation.timesteps"),
        ({"fraction": 0.1, "everySteps": 0}, "validation.everySteps"),
        ({"fraction": 0.1, "evryStep": 3}, "validation.evryStep"),
    ]:
        job["spec"]["validation"] = validation
        with pytest.raises(api.SpecError) as err:
            api.parse_resource(job)
        assert f"spec.{field}" in str(err.value) or field in str(err.value), (validation, err)
    job["spec"]["validation"] = {"fraction": 0.1, "uri": str(tmp_path)}
    with pytest.raises(api.SpecError, match="not both"):
        api.parse_resource(job)


def test_a_timestep_past_the_schedule_is_refused_before_training(inputs: Path, tmp_path: Path):
    job = tiny_job(
        inputs,
        tmp_path / "out",
        hyperparameters=_hp(),
        validation={"fraction": 0.25, "timesteps": [100, 1000]},
    )
    with pytest.raises(TrainingConfigError, match=r"validation\.timesteps: 1000"):
        _run(job, tmp_path / "work")


def test_a_fraction_that_holds_out_nothing_is_refused(inputs: Path, tmp_path: Path):
    job = tiny_job(inputs, tmp_path / "out", hyperparameters=_hp(), validation={"fraction": 0.0001})
    with pytest.raises(TrainingConfigError, match="holds out none of the 24"):
        _run(job, tmp_path / "work")


# --- the loss ------------------------------------------------------------------------------


def test_validation_loss_on_held_out_keys_only_at_its_steps_in_status_and_metrics(
    inputs: Path, tmp_path: Path
):
    """The held-out images are never trained on and are exactly what the validator evaluates;
    the loss is computed every everySteps steps and at the end and reaches the reporter (the
    status) and the difftrain_validation_loss metric."""
    from difftrain.train import batches
    from tests.infra.processes import free_port
    from tests.unit.test_train_run import _scrape

    keys_by_builder: dict[int, set[str]] = {}
    original = batches.BatchBuilder.__call__

    def recording(self, epoch, index, indices):
        keys_by_builder.setdefault(id(self), set()).update(self.examples[i].key for i in indices)
        return original(self, epoch, index, indices)

    held = {p.stem for p in (inputs / "dataset").glob("*.png") if held_out_share(p.stem) < 0.25}
    assert 0 < len(held) < 24
    reporter = Recorder()
    job = tiny_job(
        inputs,
        tmp_path / "out",
        hyperparameters=_hp(maxSteps=5),
        validation={"fraction": 0.25, "everySteps": 2, "timesteps": [200, 700], "maxImages": 3},
        tracking={"backends": []},
    )
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    port = free_port()
    batches.BatchBuilder.__call__ = recording  # type: ignore[method-assign]
    try:
        run_training(
            resource, RunOptions(work_dir=tmp_path / "work", reporter=reporter, metrics_port=port)
        )
    finally:
        batches.BatchBuilder.__call__ = original  # type: ignore[method-assign]
    assert [v.step for v in reporter.validations] == [2, 4, 5]
    assert all(v.images == 3 and v.weights == "trained" for v in reporter.validations)
    assert all(v.loss > 0 for v in reporter.validations)
    # two builders: the training one never sees a held-out key, the validator's only those
    training, validating = sorted(keys_by_builder.values(), key=lambda keys: keys <= held)
    assert len(validating) == 3 and validating <= held
    assert training and not (training & held)
    assert _scrape(port)["difftrain_validation_loss"] == pytest.approx(
        reporter.validations[-1].loss
    )


def test_a_separate_validation_dataset_is_cleaned_and_evaluated(inputs: Path, tmp_path: Path):
    """validation.uri: its own folder (same format and cleaning); every training image trains."""
    import shutil

    separate = tmp_path / "validation"
    separate.mkdir()
    for image in sorted((inputs / "dataset").glob("*.png"))[:3]:
        for path in (image, image.with_suffix(".txt")):
            shutil.copy(path, separate / f"v-{path.name}")
    (separate / "v-broken.png").write_bytes(b"not a png")
    (separate / "v-broken.txt").write_text("a broken image")
    reporter = Recorder()
    job = tiny_job(
        inputs,
        tmp_path / "out",
        hyperparameters=_hp(maxSteps=2),
        validation={"uri": str(separate), "everySteps": 2, "timesteps": [500]},
        tracking={"backends": []},
    )
    outcome = _run(job, tmp_path / "work", reporter)
    assert [(v.step, v.images) for v in reporter.validations] == [(2, 3)]
    assert outcome.report.kept == 24  # nothing of the training dataset was held out


def test_the_same_weights_give_the_same_validation_loss(inputs: Path, tmp_path: Path):
    """A run whose weights do not change (learning rate ~0, no warm-up effect) evaluates to the
    same number at every step: fixed timesteps and fixed noise per image."""
    reporter = Recorder()
    job = tiny_job(
        inputs,
        tmp_path / "out",
        hyperparameters=_hp(maxSteps=3, learningRate=1e-30),
        validation={"fraction": 0.25, "everySteps": 1, "timesteps": [150, 850], "maxImages": 3},
        tracking={"backends": []},
    )
    _run(job, tmp_path / "work", reporter)
    losses = [v.loss for v in reporter.validations]
    assert len(losses) == 3 and len(set(losses)) == 1, losses


# --- the trackers --------------------------------------------------------------------------


def test_bad_tracking_settings_are_refused_naming_the_field(inputs: Path, tmp_path: Path):
    job = tiny_job(inputs, tmp_path / "out")
    for tracking, message in [
        ({"backends": ["tensorbord"]}, "spec.tracking.backends[0]"),
        ({"backends": ["tensorboard", "tensorboard"]}, "lists a tracker twice"),
        ({"backends": ["mlflow"]}, "tracking.backends mlflow needs tracking.mlflow.trackingUri"),
        ({"wandb": {"entity": "team"}}, "tracking.backends does not list wandb"),
    ]:
        job["spec"]["tracking"] = tracking
        with pytest.raises(api.SpecError) as err:
            api.parse_resource(job)
        assert message in str(err.value), (tracking, str(err.value))


def test_a_tracker_without_its_package_or_key_is_a_clear_error():
    from accelerate.utils import is_mlflow_available, is_wandb_available

    from difftrain.train.tracking import check_backends

    assert check_backends(api.TrackingSpec(), {}) == ["tensorboard"]
    assert check_backends(api.TrackingSpec(backends=[]), {}) == []
    if not is_wandb_available():
        with pytest.raises(TrainingConfigError, match=r"tracking\.backends wandb needs the wandb"):
            check_backends(api.TrackingSpec(backends=["wandb"]), {"WANDB_API_KEY": "k"})
    else:
        with pytest.raises(TrainingConfigError, match="apiKeySecretRef"):
            check_backends(api.TrackingSpec(backends=["wandb"]), {})
    if not is_mlflow_available():
        spec = api.TrackingSpec(backends=["mlflow"], mlflow={"trackingUri": "http://m:5000"})
        with pytest.raises(
            TrainingConfigError, match=r"tracking\.backends mlflow needs the mlflow"
        ):
            check_backends(spec, {})


def test_tensorboard_event_files_hold_the_losses_and_samples(inputs: Path, tmp_path: Path):
    """The default tracker: TensorBoard files committed beside the samples (each with its
    manifest), holding every step's loss, the learning rate, the validation loss and the grid."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reporter = Recorder()
    out = tmp_path / "out"
    job = tiny_job(
        inputs,
        out,
        hyperparameters=_hp(maxSteps=4),
        validation={"fraction": 0.25, "everySteps": 2, "timesteps": [500], "maxImages": 2},
        sampling={"everySteps": 0, "numInferenceSteps": 1, "prompts": ["a red circle"]},
    )
    outcome = _run(job, tmp_path / "work", reporter)
    root = out / "tracking" / "tensorboard" / "difftrain"
    events = sorted(
        p for p in root.rglob("events.out.tfevents.*") if not p.name.endswith(FILE_MANIFEST_SUFFIX)
    )
    assert events and all(e.with_name(e.name + FILE_MANIFEST_SUFFIX).exists() for e in events)
    for event in events:
        manifest = json.loads(event.with_name(event.name + FILE_MANIFEST_SUFFIX).read_text())
        assert manifest["files"][0]["size"] == event.stat().st_size
    acc = EventAccumulator(str(root), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx(outcome.loop.losses, rel=1e-6)
    assert "train/learning_rate" in scalars
    validation = acc.Scalars("validation/loss")
    assert [e.step for e in validation] == [2, 4]
    assert [e.value for e in validation] == pytest.approx(
        [v.loss for v in reporter.validations], rel=1e-6
    )
    assert [e.step for e in acc.Images("samples")] == [4]
    assert (out / "samples" / "step-00000004" / "grid.png").exists()


def _validation_lines(log: str) -> list[tuple[int, float, int]]:
    found = re.findall(r"validation step=(\d+) loss=([0-9.]+) images=(\d+)", log)
    return [(int(s), float(v), int(n)) for s, v, n in found]


def test_two_processes_evaluate_their_shares_to_the_one_process_value(inputs: Path, tmp_path: Path):
    """Each process evaluates its share of the held-out images and one collective sums them:
    with the same weights (learning rate ~0) two processes report what one process reports."""
    from tests.training import run_cli, write_job

    logs = {}
    for processes in (1, 2):
        job = tiny_job(
            inputs,
            tmp_path / f"out{processes}",
            hyperparameters=_hp(maxSteps=2, learningRate=1e-30),
            validation={"fraction": 0.25, "everySteps": 2, "timesteps": [400], "maxImages": 3},
            tracking={"backends": []},
            sampling={"everySteps": 0, "numInferenceSteps": 1, "prompts": ["a red circle"]},
        )
        path = write_job(tmp_path / f"job{processes}.yaml", job)
        args = ["run", str(path), "--local", "--work-dir", str(tmp_path / f"w{processes}")]
        done = run_cli([*args, "--processes", str(processes)], timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        logs[processes] = _validation_lines(done.stderr)
    (one,) = logs[1]
    assert one[0] == 2 and one[2] == 3
    # every rank logs the all-process value
    assert len(logs[2]) == 2
    for step, loss, images in logs[2]:
        assert (step, images) == (2, 3)
        assert loss == pytest.approx(one[1], rel=1e-5)
