"""SDXL through `difftrain run`: a tiny SDXL-shaped model trains (full, LoRA with both text
encoders), resumes exactly, samples with the SDXL pipeline and exports files diffusers loads."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from difftrain import api
from difftrain.data.transforms import ImageTransform
from difftrain.models.families import FAMILIES, SDXL
from difftrain.models.tiny_sdxl import build_tiny_sdxl_pipeline_folder
from difftrain.train.batches import BatchBuilder, Example
from difftrain.train.family_rules import for_family
from difftrain.train.methods import TrainingConfigError
from difftrain.train.run import RunOptions, run_training
from tests.training import prepare_local_inputs, run_cli, tiny_job


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = prepare_local_inputs(tmp_path_factory.mktemp("inputs"), images=16)
    build_tiny_sdxl_pipeline_folder(root / "sdxl")
    return root


def _job(inputs: Path, out: Path, steps: int = 3, **spec: object) -> dict:
    job = tiny_job(inputs, out, **spec)
    job["spec"]["baseModel"] = {"uri": str(inputs / "sdxl")}
    job["spec"]["hyperparameters"].update(
        {
            "maxSteps": steps,
            "warmupSteps": 1,
            "batchSize": 2,
            "learningRate": 1e-3,
            "lrScheduler": "constant",
            # tiny models at 64 px: recomputing activations only costs time here
            "gradientCheckpointing": False,
        }
    )
    job["spec"]["checkpointing"] = {"everySteps": 2, "keepLast": 3}
    return job


def _run(job: dict, work: Path):
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    return run_training(resource, RunOptions(work_dir=work))


def _unet_inputs() -> tuple:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, 80, generator=gen)
    added = {
        "text_embeds": torch.randn(1, 40, generator=gen),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    }
    return x, torch.tensor([500]), text, added


def _unet_out(pipe) -> torch.Tensor:
    x, t, text, added = _unet_inputs()
    with torch.no_grad():
        out: torch.Tensor = pipe.unet(
            x, t, encoder_hidden_states=text, added_cond_kwargs=added
        ).sample
    return out


def _pooled(pipe, prompt: str = "a red circle") -> torch.Tensor:
    ids = pipe.tokenizer_2([prompt], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out: torch.Tensor = pipe.text_encoder_2(ids.input_ids).text_embeds
    return out


def test_a_full_sdxl_run_samples_and_exports_a_folder_and_an_sgm_file(
    inputs: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    job = _job(inputs, out)
    job["spec"]["output"]["formats"] = ["diffusers", "single_file"]
    outcome = _run(job, tmp_path / "work")
    formats = {o.format: o.uri for o in outcome.outputs}
    assert set(formats) == {"diffusers", "single_file"}
    base = StableDiffusionXLPipeline.from_pretrained(str(inputs / "sdxl"))
    folder = StableDiffusionXLPipeline.from_pretrained(formats["diffusers"])
    single = StableDiffusionXLPipeline.from_single_file(
        formats["single_file"], config=str(inputs / "sdxl"), local_files_only=True
    )
    # the SGM layout A1111, ComfyUI and Forge read
    with safe_open(formats["single_file"], "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("conditioner.embedders.0.transformer.") for k in keys)
    assert any(k.startswith("conditioner.embedders.1.model.") for k in keys)
    assert any(k.startswith("model.diffusion_model.label_emb.") for k in keys)
    trained = _unet_out(folder)
    assert not torch.allclose(trained, _unet_out(base), atol=1e-4), "the UNet did not change"
    assert torch.allclose(trained, _unet_out(single), atol=5e-3)  # the single file is fp16
    assert torch.allclose(_pooled(folder), _pooled(single), atol=5e-3)
    assert any((out / "samples").rglob("grid.png")), "no samples from the SDXL pipeline"
    # the SGM file is a base model in turn: a LoRA trains on it
    again = _job(inputs, tmp_path / "again", steps=2, method="lora", lora={"rank": 4})
    again["spec"]["baseModel"] = {"uri": formats["single_file"]}
    assert _run(again, tmp_path / "work2").loop.state.step == 2


def test_sdxl_lora_trains_both_text_encoders_and_both_layouts_load_the_same(
    inputs: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline

    job = _job(inputs, tmp_path / "out", method="lora", lora={"rank": 4, "trainTextEncoder": True})
    job["spec"]["hyperparameters"]["learningRate"] = 1e-2
    outcome = _run(job, tmp_path / "work")
    formats = {o.format: o.uri for o in outcome.outputs}
    assert set(formats) == {"lora_peft", "lora_kohya"}
    with safe_open(formats["lora_kohya"], "pt") as f:
        kohya_keys = list(f.keys())
    prefixes = {k.split("_", 2)[1] for k in kohya_keys}
    assert {"unet", "te1", "te2"} <= prefixes, prefixes
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya_keys)
    results = {}
    for name, uri in [("base", None), *formats.items()]:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(inputs / "sdxl"))
        if uri is not None:
            pipe.load_lora_weights(uri)
        results[name] = (_unet_out(pipe), _pooled(pipe))
    for i in range(2):
        assert torch.allclose(results["lora_peft"][i], results["lora_kohya"][i], atol=1e-4)
        assert not torch.allclose(results["lora_peft"][i], results["base"][i], atol=1e-5)


def test_sdxl_dreambooth_lora_generates_class_images_with_the_sdxl_pipeline(
    inputs: Path, tmp_path: Path
) -> None:
    import json

    from difftrain.storage import MANIFEST_NAME

    out = tmp_path / "out"
    job = _job(
        inputs,
        out,
        method="lora",
        lora={"rank": 4},
        dreambooth={
            "instancePrompt": "a photo of sks circle",
            "classPrompt": "a photo of a circle",
            "numClassImages": 2,
        },
    )
    outcome = _run(job, tmp_path / "work")
    manifest = json.loads((out / "class-images" / MANIFEST_NAME).read_text())
    assert manifest["metadata"]["count"] == 2
    assert outcome.loop.state.step == 3
    # every batch holds instance images and as many class images
    assert outcome.loop.state.images_seen == 3 * 2 * 2
    assert {o.format for o in outcome.outputs} == {"lora_peft", "lora_kohya"}


METHODS = {
    "full": {},
    "lora-both-text-encoders": {"method": "lora", "lora": {"rank": 4, "trainTextEncoder": True}},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_sdxl_run_stopped_and_resumed_ends_with_the_uninterrupted_weights(
    inputs: Path, tmp_path: Path, method: str
) -> None:
    spec = METHODS[method]
    straight = _job(inputs, tmp_path / "straight", 4, **spec)
    _run(straight, tmp_path / "w1")
    stopped = _job(inputs, tmp_path / "resumed", 2, **spec)
    _run(stopped, tmp_path / "w2")
    resumed = _run(_job(inputs, tmp_path / "resumed", 4, **spec), tmp_path / "w2")
    assert len(resumed.loop.losses) == 2, "the second run did not resume from step 2"
    name = "checkpoints/step-00000004/trainable.safetensors"
    a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


def test_the_cache_holds_sdxls_pooled_embedding_and_each_views_time_ids(
    inputs: Path, tmp_path: Path
) -> None:
    from difftrain.data.cache import LatentCache, cache_space
    from difftrain.models import load_base_model
    from difftrain.models.families import family
    from difftrain.storage import LocalStore
    from tests.latent_fixtures import make_pairs

    components = load_base_model(
        api.BaseModelSpec(uri=str(inputs / "sdxl")), None, work_dir=tmp_path / "model"
    )
    pre = api.PreprocessingSpec(resolution=64, flip_probability=0.5, crop="random")
    pairs = make_pairs(2, sizes=[(200, 100), (64, 64)])
    space = cache_space(pre, components.identity, added=True)
    cache = LatentCache(LocalStore(), str(tmp_path / "cache"))
    samples, encoded = cache.get_or_build(pairs, components, ImageTransform(pre), space=space)
    assert encoded == 2
    wide = samples[0]
    assert wide.sizes is not None and wide.sizes.shape == (2, 6)
    (h, w, top, left, th, tw), mirrored = wide.sizes.tolist()
    assert (h, w, top, th, tw) == (100, 200, 0, 64, 64) and 0 <= left <= 64
    assert mirrored == [100, 200, 0, 64 - left, 64, 64]  # the mirror's crop corner
    # the text as the family conditions on it: both encoders' hidden states and the pooled one
    expected = family("sdxl").encode(components, [pairs[0].caption], torch.device("cpu"))
    assert wide.text_embeddings is not None and wide.pooled is not None
    torch.testing.assert_close(wide.text_embeddings.float(), expected.hidden[0], atol=1e-2, rtol=0)
    assert expected.pooled is not None
    torch.testing.assert_close(wide.pooled.float(), expected.pooled[0], atol=1e-2, rtol=0)
    # training batches carry the view's time ids and the pooled embedding
    for flip, row in ((0.0, 0), (1.0, 1)):
        batch = BatchBuilder(
            [Example(key=wide.key, caption=wide.caption, size=(64, 64), cached=wide)],
            seed=0,
            transform=None,
            decode=None,
            flip_probability=flip,
            caption_dropout=0.0,
            scaling_factor=1.0,
            size_conditioning=True,
        )(0, 0, [0])
        assert batch.time_ids is not None and batch.pooled_embeddings is not None
        assert batch.time_ids[0].tolist() == wide.sizes[row].tolist()
    # a space without them finds the same latents; one with them found nothing before they were
    again, encoded = cache.get_or_build(pairs, components, ImageTransform(pre), space=space)
    assert encoded == 0 and again[0].sizes is not None
    plain = LatentCache(LocalStore(), str(tmp_path / "plain"))
    plain.get_or_build(
        pairs, components, ImageTransform(pre), space=cache_space(pre, components.identity)
    )
    wanting = plain.get_or_build(pairs, components, ImageTransform(pre), space=space)
    assert wanting[0][0].pooled is not None


def test_sdxl_trains_from_the_latent_cache_and_a_second_run_hits_it(
    inputs: Path, tmp_path: Path
) -> None:
    import shutil

    job = _job(inputs, tmp_path / "out", steps=2)
    # a dataset of its own: the cache lives beside it, and the other runs here fill theirs
    dataset = shutil.copytree(
        inputs / "dataset",
        tmp_path / "dataset",
        ignore=shutil.ignore_patterns(".difftrain-cache"),
    )
    job["spec"]["dataset"]["uri"] = str(dataset)
    job["spec"]["preprocessing"]["cacheLatents"] = True
    job["spec"]["regularization"] = {"captionDropout": 0.5}
    first = _run(job, tmp_path / "work")
    assert first.cache_hit is False and first.outputs
    job["spec"]["output"] = {"uri": str(tmp_path / "out2")}
    second = _run(job, tmp_path / "work2")
    assert second.cache_hit is True
    assert second.loop.losses == pytest.approx(first.loop.losses, rel=1e-5)


def test_what_a_family_does_not_support_is_refused_naming_the_field(
    inputs: Path, tmp_path: Path
) -> None:
    class Narrow(SDXL):
        methods = frozenset({"full"})
        boomerang = False

    def refusal(**spec: object) -> str:
        resource = api.parse_resource(_job(inputs, tmp_path / "o", 3, **spec))
        assert isinstance(resource, api.DiffusionTrainingJob)
        with pytest.raises(TrainingConfigError) as caught:
            for_family(resource.spec.resolved(), resource.spec, Narrow())
        return str(caught.value)

    assert "method 'lora' is not supported for SDXL" in refusal(method="lora", lora={"rank": 4})
    assert "preprocessing.boomerang.enabled" in refusal(
        preprocessing={"resolution": 64, "boomerang": {"enabled": True}}
    )


def test_sdxl_boomerang_variants_are_made_with_the_sdxl_unet_and_trained_on(
    inputs: Path, tmp_path: Path
) -> None:
    import shutil

    dataset = shutil.copytree(
        inputs / "dataset", tmp_path / "dataset", ignore=shutil.ignore_patterns(".difftrain-cache")
    )
    for extra in sorted(dataset.glob("*.png"))[4:]:
        extra.unlink()
        extra.with_suffix(".txt").unlink(missing_ok=True)
    job = _job(inputs, tmp_path / "out", steps=2)
    job["spec"]["dataset"]["uri"] = str(dataset)
    job["spec"]["preprocessing"]["boomerang"] = {"enabled": True, "copies": 1}
    outcome = _run(job, tmp_path / "work")
    assert outcome.report.augmented == 4  # one variant of each of the four images
    assert outcome.loop.state.step == 2


def test_an_sdxl_controlnet_trains_samples_and_loads_into_the_sdxl_controlnet_pipeline(
    inputs: Path, tmp_path: Path
) -> None:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import ImageOps

    cond = tmp_path / "edges"
    cond.mkdir()
    for path in sorted((inputs / "dataset").glob("*.png")):
        ImageOps.grayscale(Image.open(path)).convert("RGB").save(cond / path.name)
    out = tmp_path / "out"
    job = _job(inputs, out, method="controlnet", controlnet={"conditioningUri": str(cond)})
    outcome = _run(job, tmp_path / "work")
    assert [o.format for o in outcome.outputs] == ["diffusers"]
    controlnet = ControlNetModel.from_pretrained(outcome.outputs[0].uri)
    assert controlnet.config.addition_embed_type == "text_time"
    assert any((out / "samples").rglob("grid.png")), "no samples from the SDXL ControlNet pipeline"
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        str(inputs / "sdxl"), controlnet=controlnet
    )
    image = pipe(
        "a red circle",
        image=Image.open(sorted(cond.glob("*.png"))[0]),
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3)


def test_sdxl_trains_at_1024_pixels_with_gradient_checkpointing_unless_the_job_says_otherwise(
    inputs: Path,
) -> None:
    def resolution(preprocessing: dict, family: str) -> int:
        job = tiny_job(inputs, inputs / "out", preprocessing=preprocessing)
        resource = api.parse_resource(job)
        assert isinstance(resource, api.DiffusionTrainingJob)
        spec = resource.spec
        return for_family(spec.resolved(), spec, FAMILIES[family]).preprocessing.resolution

    assert resolution({}, "sdxl") == 1024
    assert resolution({"resolution": 512}, "sdxl") == 512
    assert resolution({}, "sd1") == 512
    assert resolution({"resolution": 768}, "sd2") == 768

    def checkpointing(hyperparameters: dict, family: str) -> bool:
        job = tiny_job(inputs, inputs / "out", hyperparameters=hyperparameters)
        resource = api.parse_resource(job)
        assert isinstance(resource, api.DiffusionTrainingJob)
        spec = resource.spec
        return for_family(
            spec.resolved(), spec, FAMILIES[family]
        ).hyperparameters.gradient_checkpointing

    assert checkpointing({}, "sdxl") is True
    assert checkpointing({"gradientCheckpointing": False}, "sdxl") is False
    assert checkpointing({}, "sd1") is False


def test_each_image_carries_its_size_and_crop_as_time_ids() -> None:
    """Original (h, w), the crop's (top, left) in the image scaled to cover the target, the
    target (h, w); a flip mirrors the crop's corner."""
    import io

    wide = Image.new("RGB", (200, 100), "red")
    data = io.BytesIO()
    wide.save(data, "PNG")
    pre = api.PreprocessingSpec(resolution=64)
    builder = BatchBuilder(
        [Example(key="a", caption="c", size=(64, 64), data=data.getvalue())],
        seed=0,
        transform=ImageTransform(pre),
        decode=lambda b, name: Image.open(io.BytesIO(b)).convert("RGB"),
        flip_probability=0.0,
        caption_dropout=0.0,
        scaling_factor=1.0,
        size_conditioning=True,
    )
    batch = builder(0, 0, [0])
    assert batch.time_ids is not None
    # 200x100 covers 64x64 at scale 0.64 (128x64); a centre crop starts 32 px in
    assert batch.time_ids.tolist() == [[100.0, 200.0, 0.0, 32.0, 64.0, 64.0]]
    random_crop = ImageTransform(api.PreprocessingSpec(resolution=64, crop="random"))
    for seed in range(20):
        _, plain = random_crop.pixels_and_sizes(wide, rng=random.Random(seed), flip=False)
        _, flipped = random_crop.pixels_and_sizes(wide, rng=random.Random(seed), flip=True)
        top, left = plain.crop_top_left
        assert 0 <= left <= 64 and top == 0
        assert flipped.crop_top_left == (0, 64 - left)


def test_the_local_run_trains_its_tiny_sdxl_model_through_the_cli(tmp_path: Path) -> None:
    """`difftrain run --local --family sdxl`: the built-in job on the SDXL-shaped model, with
    a progress bar, checkpoints, samples and an SDXL pipeline folder at the end."""
    from diffusers import StableDiffusionXLPipeline

    work = tmp_path / "local"
    done = run_cli(
        ["run", "--local", "--family", "sdxl", "--max-steps", "6", "--work-dir", str(work)],
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6/6" in done.stderr  # the progress bar's last state
    out = work / "output-sdxl"
    assert (out / "checkpoints" / "step-00000006").is_dir()
    assert any((out / "samples").rglob("grid.png"))
    exported = out / "export" / "diffusers"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(exported))
    assert pipe.text_encoder_2 is not None and pipe.unet.config.addition_embed_type == "text_time"
    assert not (work / "output").exists(), "the SD1 job's output was written"


def test_dataset_cache_for_an_sdxl_job_is_what_its_run_finds(inputs: Path, tmp_path: Path) -> None:
    """`difftrain dataset cache --job` encodes what the SDXL run looks up (the pooled text and
    the time ids included): the run that follows encodes nothing."""
    import shutil

    import yaml

    from difftrain.cli import main

    dataset = shutil.copytree(
        inputs / "dataset", tmp_path / "dataset", ignore=shutil.ignore_patterns(".difftrain-cache")
    )
    job = _job(inputs, tmp_path / "out", steps=2)
    job["spec"]["dataset"]["uri"] = str(dataset)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["dataset", "cache", "--job", str(path)]) == 0
    assert (dataset / ".difftrain-cache" / "index").is_dir()
    assert _run(job, tmp_path / "work").cache_hit is True
