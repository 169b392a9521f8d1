"""Caption tools in whole tiny runs: what reaches the text encoder at each step, with the latent
cache on (latents from the cache, the drawn text encoded in the step), after a resume, with
DreamBooth's template, and how dataset.repeats changes an epoch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from difftrain import api
from difftrain.train.report import ConsoleReporter
from difftrain.train.run import RunOptions, run_training
from difftrain.train.synthetic import write_shapes_dataset
from tests.training import TextEncoderCalls, prepare_local_inputs, tiny_job

# Two captions per image, four tags each; every caption's tags are its own multiset.
CAPTIONS = [
    ("red circle, on blue, small, left", "circle in red, blue background, tiny, top"),
    ("green square, on red, large, right", "square in green, red background, big, bottom"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_local_inputs(tmp_path_factory.mktemp("captions-inputs"), images=4)


def _dataset(folder: Path) -> Path:
    write_shapes_dataset(folder, len(CAPTIONS), size=64, seed=0)
    for i, lines in enumerate(CAPTIONS):
        (folder / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def _run(job: dict, work: Path, reporter: ConsoleReporter | None = None):
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    return run_training(resource, RunOptions(work_dir=work, reporter=reporter))


def _job(model: Path, dataset: Path, output: Path, steps: int, **dataset_fields) -> dict:
    job = tiny_job(
        model,
        output,
        hyperparameters={
            "batchSize": 2,
            "maxSteps": steps,
            "warmupSteps": 0,
            "mixedPrecision": "no",
        },
        checkpointing={"everySteps": 2, "keepLast": 3},
        sampling={"everySteps": 0, "numInferenceSteps": 1, "prompts": ["a photo"]},
        method="lora",  # small checkpoints and exports: the run's ends cost little
        lora={"rank": 2},
    )
    job["spec"]["output"]["formats"] = ["lora_peft"]
    job["spec"]["dataset"] = {
        **job["spec"]["dataset"],
        "uri": str(dataset),
        **dataset_fields,
    }
    job["spec"]["preprocessing"]["flipProbability"] = 0.0
    return job


def _tokens(tokenizer: CLIPTokenizer, row: list[int]) -> list[int]:
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return [t for t in row if t not in special]


def test_shuffled_multi_captions_reach_the_text_encoder_and_resume_draws_the_same(
    model: Path, tmp_path: Path
):
    """Latents from the cache, text encoded in each step: over two epochs every caption of each
    image is trained once, tags shuffled with the first one kept in place; a run stopped after
    epoch 0 and resumed feeds the text encoder exactly what the straight run fed it."""
    tokenizer = CLIPTokenizer.from_pretrained(model / "base-model" / "tokenizer")
    dataset = _dataset(tmp_path / "dataset")
    captions = {"shuffleTags": True, "keepTokens": 1}

    # 2 images, batch 2: one step per epoch. A run stopped after epoch 0 builds the latent cache
    # of the latents alone: every caption varies, so no text embedding is cached
    with TextEncoderCalls() as building:
        first = _run(
            _job(model, dataset, tmp_path / "a", 1, captions=captions), tmp_path / "wa", building
        )
    assert first.cache_hit is False and building.before == []
    with TextEncoderCalls() as resumed_calls:
        resumed = _run(
            _job(model, dataset, tmp_path / "a", 2, captions=captions),
            tmp_path / "wa2",
            resumed_calls,
        )
    assert resumed.cache_hit is True and len(resumed.loop.losses) == 1  # step 2 only

    with TextEncoderCalls() as calls:
        straight = _run(
            _job(model, dataset, tmp_path / "b", 2, captions=captions), tmp_path / "wb", calls
        )
    assert straight.cache_hit is True  # latents from the cache; the text still reaches the encoder
    assert sorted(calls.by_step) == [1, 2]
    rows = [row for step in (1, 2) for row in calls.by_step[step]]
    assert len(rows) == 4  # 2 steps of 2 examples, no cached text embedding used

    # which caption each row is: its tags' tokens as a multiset (shuffling keeps them)
    expected = {}
    for lines in CAPTIONS:
        for caption in lines:
            ids = tokenizer(caption).input_ids
            expected[frozenset(Counter(_tokens(tokenizer, ids)).items())] = (caption, ids)
    seen: Counter[str] = Counter()
    shuffled = 0
    for row in rows:
        caption, ids = expected[frozenset(Counter(_tokens(tokenizer, row)).items())]
        seen[caption] += 1
        first_tag = tokenizer(caption.split(",")[0]).input_ids[1:-1]
        assert _tokens(tokenizer, row)[: len(first_tag)] == first_tag  # kept in place
        shuffled += _tokens(tokenizer, row) != _tokens(tokenizer, ids)
    assert seen == Counter({c: 1 for lines in CAPTIONS for c in lines})  # each once, 2 epochs
    assert shuffled >= 2
    # the resumed run's step 2 drew the very captions of the straight run's
    assert resumed_calls.by_step[2] == calls.by_step[2]


def test_dreambooth_template_keeps_each_image_caption(model: Path, tmp_path: Path):
    """instancePrompt with {caption}: each image trains with the prompt around its own caption
    (here the images decoded in the step, so each step encodes its captions)."""
    tokenizer = CLIPTokenizer.from_pretrained(model / "base-model" / "tokenizer")
    dataset = _dataset(tmp_path / "dataset")
    job = _job(model, dataset, tmp_path / "out", 1, captions={"lines": "first"})
    job["spec"]["preprocessing"]["cacheLatents"] = False
    job["spec"]["dreambooth"] = {
        "instancePrompt": "a photo of sks shape, {caption}",
        "priorPreservation": False,
    }
    with TextEncoderCalls() as calls:
        _run(job, tmp_path / "w", calls)
    rows = calls.by_step[1]
    wanted = [f"a photo of sks shape, {lines[0]}" for lines in CAPTIONS]
    ids = tokenizer(wanted, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert sorted(rows) == sorted(ids)  # one epoch: each image once, in its template


def test_repeats_multiply_the_steps_of_an_epoch(model: Path, tmp_path: Path):
    """2 images, batch 2, repeats 3: an epoch is 3 steps and 6 images (1 step without)."""
    dataset = _dataset(tmp_path / "dataset")
    job = _job(model, dataset, tmp_path / "out", 1, repeats=3, captions={"lines": "first"})
    hp = job["spec"]["hyperparameters"]
    del hp["maxSteps"]
    hp["epochs"] = 1
    outcome = _run(job, tmp_path / "w")
    assert outcome.loop.state.step == 3
    assert outcome.loop.state.images_seen == 6
    assert outcome.loop.state.epoch == 0
