"""Several local datasets in one tiny run (spec.datasets), without the latent cache: what each
epoch's steps give the text encoder by the weights and repeats, the report's part of each
dataset, and the per-dataset refusals the run makes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from difftrain import api
from difftrain.train.methods import TrainingConfigError
from difftrain.train.run import RunOptions, run_training
from difftrain.train.synthetic import write_shapes_dataset
from tests.training import TextEncoderCalls, prepare_local_inputs, tiny_job

CLEANING = {"minResolution": 32, "nearDuplicateDistance": 0}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_local_inputs(tmp_path_factory.mktemp("datasets-inputs"), images=2)


def _dataset(folder: Path, name: str, count: int, seed: int) -> dict[str, str]:
    """``count`` shapes, each captioned ``<name> number <i>``: key -> caption."""
    write_shapes_dataset(folder, count, size=64, seed=seed)
    captions = {}
    for i in range(count):
        captions[f"{i:05d}"] = f"{name} number {i}"
        (folder / f"{i:05d}.txt").write_text(captions[f"{i:05d}"])
    return captions


def _job(model: Path, output: Path, datasets: list[dict], **hp: int) -> dict:
    job = tiny_job(
        model,
        output,
        hyperparameters={"batchSize": 4, "warmupSteps": 0, "mixedPrecision": "no", **hp},
        checkpointing={"everySteps": 100, "keepLast": 1},
        sampling={"everySteps": 0, "numInferenceSteps": 1, "prompts": ["a photo"]},
        method="lora",
        lora={"rank": 2},
        preprocessing={"resolution": 64, "flipProbability": 0.0, "cacheLatents": False},
    )
    spec = job["spec"]
    del spec["dataset"]
    spec["datasets"] = [{"cleaning": CLEANING, **d} for d in datasets]
    spec["output"]["formats"] = ["lora_peft"]
    return job


def _run(job: dict, work: Path, reporter: TextEncoderCalls | None = None):
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    return run_training(resource, RunOptions(work_dir=work, reporter=reporter))


def test_weights_set_the_shares_and_repeats_lengthen_the_epoch(model: Path, tmp_path: Path):
    """a: 2 images with repeats 2 and weight 3; b: 4 images with weight 1. An epoch is
    2 x 2 + 4 = 8 examples, 6 of a's (each image three times) and 2 of b's, another two of b in
    the next epoch; batch 4 gives 2 steps an epoch. The report has each dataset's part."""
    a = _dataset(tmp_path / "a", "apple", 2, seed=0)
    b = _dataset(tmp_path / "b", "banana", 4, seed=1)
    job = _job(
        model,
        tmp_path / "out",
        [
            {"uri": str(tmp_path / "a"), "weight": 3, "repeats": 2},
            {"uri": str(tmp_path / "b")},
        ],
        epochs=2,
    )
    with TextEncoderCalls() as seen:
        outcome = _run(job, tmp_path / "work", seen)
    assert outcome.loop.state.step == 4 and outcome.loop.state.images_seen == 16

    tokenizer = CLIPTokenizer.from_pretrained(model / "base-model" / "tokenizer")
    width = tokenizer.model_max_length
    text_of = {
        tuple(tokenizer(c, padding="max_length", max_length=width).input_ids): c
        for c in [*a.values(), *b.values()]
    }
    b_drawn = []
    for steps in ((1, 2), (3, 4)):
        texts = Counter(text_of[tuple(row)] for step in steps for row in seen.by_step[step])
        assert {c: texts[c] for c in a.values()} == {c: 3 for c in a.values()}
        drawn = [c for c in texts.elements() if c in b.values()]
        assert len(drawn) == 2 and len(set(drawn)) == 2  # never one twice in an epoch
        b_drawn.extend(drawn)
    assert sorted(b_drawn) == sorted(b.values())  # the two epochs: all of b, each once

    report = outcome.report
    assert (report.total, report.kept) == (6, 6)
    parts = [(p.uri, p.weight, p.kept, p.examples_per_epoch) for p in report.datasets]
    assert parts == [(str(tmp_path / "a"), 3.0, 2, 6), (str(tmp_path / "b"), 1.0, 4, 2)]
    assert [p.share for p in report.datasets] == [0.75, 0.25]


def test_one_dataset_left_with_nothing_is_refused_naming_its_position(model: Path, tmp_path: Path):
    """Each dataset is cleaned on its own: one whose every image is too small stops the run with
    datasets[1] in the message, before any training."""
    _dataset(tmp_path / "a", "apple", 2, seed=0)
    _dataset(tmp_path / "b", "banana", 2, seed=1)
    job = _job(
        model,
        tmp_path / "out",
        [
            {"uri": str(tmp_path / "a")},
            {"uri": str(tmp_path / "b"), "cleaning": {**CLEANING, "minResolution": 128}},
        ],
        maxSteps=1,
    )
    with pytest.raises(TrainingConfigError, match=r"datasets\[1\]\.uri .*/b: cleaning kept no"):
        _run(job, tmp_path / "work")
