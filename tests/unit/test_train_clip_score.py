"""The CLIP score of the sample images against their prompts (sampling.clipModelUri)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from difftrain import api
from difftrain.api import ClipScoreStatus
from difftrain.models import ModelError
from difftrain.storage import MANIFEST_NAME
from difftrain.train.clip_score import ClipScorer, clip_score_status, load_clip_scorer
from difftrain.train.report import ConsoleReporter
from difftrain.train.run import RunOptions, run_training
from tests.training import prepare_local_inputs, run_cli, tiny_job, write_job, write_tiny_clip_model

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
PROMPTS = [
    "a red circle on a white background",
    "a blue square",
    "a green triangle on a black background",
    "a photo of a dog",
    "a yellow star in the middle",
    "stripes",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_local_inputs(tmp_path_factory.mktemp("inputs"), images=16)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # seed 2: a model under which some of the tiny samples score above the clamp at 0
    return write_tiny_clip_model(tmp_path_factory.mktemp("clip") / "clip", seed=2)


@pytest.fixture(scope="module")
def scorer(clip_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> ClipScorer:
    work = tmp_path_factory.mktemp("clip-work")
    return load_clip_scorer(str(clip_folder), None, work_dir=work, device=torch.device("cpu"))


def _red_circle(size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((6, 6, size - 7, size - 7), fill=(220, 20, 20))
    return image


def _by_hand(folder: Path, image: Image.Image, prompts: list[str]) -> np.ndarray:
    """100 x cosine of the model's own (normalised) embeddings, from pixels normalised by hand."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    # a 32-px image for a 32-px tower: no resize or crop, only CLIP's normalisation
    pixels = (np.asarray(image, dtype=np.float64) / 255.0 - CLIP_MEAN) / CLIP_STD
    pixel_values = torch.tensor(pixels.transpose(2, 0, 1)[None], dtype=torch.float32)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=pixel_values,
        )
    image_embed = out.image_embeds[0].double().numpy()
    text_embeds = out.text_embeds.double().numpy()
    image_embed /= np.linalg.norm(image_embed)
    text_embeds /= np.linalg.norm(text_embeds, axis=1, keepdims=True)
    raw: np.ndarray = 100.0 * text_embeds @ image_embed
    return raw


def test_the_score_is_100_times_the_cosine_clamped_at_zero(scorer: ClipScorer, clip_folder: Path):
    image = _red_circle()
    raw = _by_hand(clip_folder, image, PROMPTS)
    assert (raw > 0).any(), raw  # not a vacuous check: some pairs score above the clamp
    scores = scorer.scores([image] * len(PROMPTS), PROMPTS)
    assert scores == pytest.approx(np.maximum(raw, 0.0).tolist(), abs=1e-3)
    # the score depends on the prompt: the best-matching prompt and any other differ
    best = int(np.argmax(raw))
    other = (best + 1) % len(PROMPTS)
    pair = scorer.scores([image, image], [PROMPTS[best], PROMPTS[other]])
    assert pair[0] > 0 and pair[0] - pair[1] > 0.01, pair
    # and on the image: the same prompt against another picture scores differently
    blank = Image.new("RGB", (32, 32), (10, 120, 240))
    assert scorer.scores([blank], [PROMPTS[best]])[0] != pytest.approx(pair[0], abs=0.01)


def test_larger_images_are_resized_and_cropped_by_the_models_processor(scorer: ClipScorer):
    """Samples are made at the training resolution: the processor brings them to the tower's
    size (bicubic resize of the short side, centre crop) before they are scored."""
    large = _red_circle(32).resize((64, 64), Image.Resampling.NEAREST)
    prompt = max(PROMPTS, key=lambda p: scorer.scores([large], [p])[0])
    (score,) = scorer.scores([large], [prompt])
    assert score > 0
    by_hand = large.resize((32, 32), Image.Resampling.BICUBIC)
    assert scorer.scores([by_hand], [prompt])[0] == pytest.approx(score, abs=1e-3)
    wide = Image.new("RGB", (96, 64), "white")
    wide.paste(large, (16, 0))  # white margins left and right: cropped away
    assert scorer.scores([wide], [prompt])[0] == pytest.approx(score, abs=1e-3)


def test_the_status_is_the_mean_over_the_images():
    status = clip_score_status([10.0, 20.0, 0.0], 7, ema=True)
    assert status == ClipScoreStatus(score=10.0, step=7, images=3, weights="ema")


def test_the_clip_model_is_loaded_in_eval_mode_without_gradients(scorer: ClipScorer):
    assert not scorer.model.training
    assert not any(p.requires_grad for p in scorer.model.parameters())
    assert scorer.max_length == 77


# --- bad models ------------------------------------------------------------------------------


def _copy(src: Path, dest: Path, *names: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dest / name)
    return dest


def test_a_bad_clip_model_uri_is_refused_naming_the_field(
    inputs: Path, clip_folder: Path, tmp_path: Path
):
    processor = ["preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer_config.json"]
    text_only = _copy(inputs / "base-model" / "text_encoder", tmp_path / "text-only", "config.json")
    shutil.copy(inputs / "base-model" / "text_encoder" / "model.safetensors", text_only)
    _copy(clip_folder, text_only, *processor)
    pickled = _copy(clip_folder, tmp_path / "pickled", "config.json", *processor)
    from safetensors.torch import load_file

    torch.save(load_file(clip_folder / "model.safetensors"), pickled / "pytorch_model.bin")
    no_processor = _copy(clip_folder, tmp_path / "no-processor", "config.json", "model.safetensors")
    cases = [
        (str(tmp_path / "missing"), "no such folder"),
        (
            str(inputs / "base-model"),
            r"not a CLIP model folder \(no config.json\) \(it is a diffusers",
        ),
        (str(text_only), "describes a 'clip_text_model' model, not a CLIPModel"),
        (str(pickled), "safetensors weights only.*pytorch_model.bin is a pickle"),
        (str(no_processor), "no preprocessor_config.json"),
        ("s3://models/clip", "cannot list the folder"),
    ]
    for uri, message in cases:
        with pytest.raises(
            ModelError, match=rf"sampling\.clipModelUri {re.escape(uri)}: .*{message}"
        ):
            load_clip_scorer(uri, None, work_dir=tmp_path / "work", device=torch.device("cpu"))


def test_a_run_with_a_bad_clip_model_exits_3_before_training(inputs: Path, tmp_path: Path):
    job = tiny_job(
        inputs,
        tmp_path / "out",
        sampling={"everySteps": 2, "prompts": ["a red circle"], "clipModelUri": str(inputs)},
        tracking={"backends": []},
    )
    path = write_job(tmp_path / "job.yaml", job)
    done = run_cli(["run", str(path), "--local", "--work-dir", str(tmp_path / "work")])
    assert done.returncode == 3, done.stderr[-3000:]
    assert f"sampling.clipModelUri {inputs}: not a CLIP model folder" in done.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_field_is_a_uri():
    with pytest.raises(api.SpecError, match=r"spec\.sampling\.clipModelUri"):
        api.parse_resource(tiny_job(Path("/x"), Path("/y"), sampling={"clipModelUri": ""}))


# --- in a run --------------------------------------------------------------------------------


class Recorder(ConsoleReporter):
    def __init__(self) -> None:
        super().__init__(bar=False)
        self.scores: list[ClipScoreStatus] = []

    def clip_score(self, status: ClipScoreStatus) -> None:
        self.scores.append(status)


def test_a_run_reports_its_samples_clip_score_at_the_sampling_steps(
    inputs: Path, clip_folder: Path, scorer: ClipScorer, tmp_path: Path
):
    """At every sampling step the samples' CLIP score reaches the status (the reporter), the
    difftrain_clip_score metric, TensorBoard, the samples' manifest and the run's result; it is
    the score of the committed images against their prompts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.infra.processes import free_port
    from tests.unit.test_train_run import _scrape

    prompts = PROMPTS
    out = tmp_path / "out"
    job = tiny_job(
        inputs,
        out,
        hyperparameters={
            "batchSize": 2,
            "learningRate": 1e-3,
            "maxSteps": 4,
            "warmupSteps": 1,
            "mixedPrecision": "no",
        },
        sampling={
            "everySteps": 2,
            "numInferenceSteps": 1,
            "prompts": prompts,
            "clipModelUri": str(clip_folder),
        },
    )
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    reporter = Recorder()
    port = free_port()
    outcome = run_training(
        resource, RunOptions(work_dir=tmp_path / "work", reporter=reporter, metrics_port=port)
    )
    assert [(s.step, s.images, s.weights) for s in reporter.scores] == [
        (2, len(prompts), "trained"),
        (4, len(prompts), "trained"),
    ]
    assert outcome.loop.clip_score == reporter.scores[-1]
    assert _scrape(port)["difftrain_clip_score"] == pytest.approx(reporter.scores[-1].score)
    for status in reporter.scores:
        folder = out / "samples" / f"step-{status.step:08d}"
        manifest: dict[str, Any] = json.loads((folder / MANIFEST_NAME).read_text())
        images = [Image.open(folder / f"{i:02d}.png").convert("RGB") for i in range(len(prompts))]
        by_image = scorer.scores(images, prompts)
        assert max(by_image) > 0, by_image
        assert manifest["metadata"]["clipScores"] == pytest.approx(by_image, abs=1e-3)
        assert status.score == pytest.approx(sum(by_image) / len(prompts), abs=1e-3)
    root = out / "tracking" / "tensorboard" / "difftrain"
    events = EventAccumulator(str(root), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("samples/clip_score")] == [
        (s.step, pytest.approx(s.score, rel=1e-5)) for s in reporter.scores
    ]
