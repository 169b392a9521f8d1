"""Aspect-ratio buckets in a whole tiny run: an image alone in its bucket (fewer images than
batchSize) is still trained, and an epoch has a step for its batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from difftrain import api
from difftrain.train.run import RunOptions, run_training
from difftrain.train.synthetic import write_shapes_dataset
from tests.datasets import jpeg
from tests.training import prepare_local_inputs, tiny_job


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_local_inputs(tmp_path_factory.mktemp("buckets-inputs"), images=1)


def test_an_image_alone_in_its_bucket_is_trained_in_the_epoch(model: Path, tmp_path: Path):
    dataset = tmp_path / "dataset"
    write_shapes_dataset(dataset, 4, size=64, seed=0)  # four squares: the 96x96 bucket
    (dataset / "wide.jpg").write_bytes(jpeg(5, (128, 64)))  # one wide image: the 128x64 bucket
    (dataset / "wide.txt").write_text("a wide picture of colours")
    job = tiny_job(
        model,
        tmp_path / "out",
        hyperparameters={"batchSize": 2, "epochs": 1, "warmupSteps": 0, "mixedPrecision": "no"},
        checkpointing={"everySteps": 100, "keepLast": 1},
        method="lora",
        lora={"rank": 2},
    )
    job["spec"]["dataset"]["uri"] = str(dataset)
    job["spec"]["output"]["formats"] = ["lora_peft"]
    job["spec"]["preprocessing"] = {
        "resolution": 96,
        "buckets": {"enabled": True, "minSize": 64, "maxSize": 128, "step": 32},
    }
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    outcome = run_training(resource, RunOptions(work_dir=tmp_path / "work"))
    assert outcome.report.kept == 5
    # the epoch: two batches of squares and the wide image's own batch of one
    assert outcome.loop.state.step == 3
    assert outcome.loop.state.images_seen == 5
