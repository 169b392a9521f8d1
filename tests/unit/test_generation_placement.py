"""Generation during data preparation runs where training runs: every network of a pipeline on the
accelerator's device, in one dtype, in batches, and the networks are given back as they were.

There is no GPU here; bfloat16 on the CPU stands in for the fp16 CUDA networks a pod has after the
latent cache is built (a pipeline mixing them with float32 ones fails the same way on both).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from difftrain import api
from difftrain.api import PreprocessingSpec, SamplingSpec
from difftrain.data.boomerang import boomerang_variants
from difftrain.data.transforms import ImageTransform
from difftrain.models.placement import frozen_dtype, placed
from difftrain.models.tiny import build_tiny_components
from difftrain.train.run import RunOptions, run_training
from difftrain.train.sampling import build_pipeline, generate
from tests.latent_fixtures import make_pairs
from tests.training import prepare_local_inputs, tiny_job


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_local_inputs(tmp_path_factory.mktemp("inputs"))


def _short(**hp: Any) -> dict[str, Any]:
    return {"batchSize": 2, "maxSteps": 1, "warmupSteps": 0, "mixedPrecision": "no", **hp}


def _small_dataset(inputs: Path, dest: Path, n: int = 6) -> Path:
    dest.mkdir()
    for image in sorted((inputs / "dataset").glob("*.png"))[:n]:
        shutil.copy(image, dest / image.name)
        shutil.copy(image.with_suffix(".txt"), dest / image.with_suffix(".txt").name)
    return dest


def _spy_on_accelerator(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import difftrain.train.run as run

    made: list[Any] = []
    real = run._accelerator

    def spy(spec: Any, *args: Any, **kwargs: Any) -> Any:
        made.append(real(spec, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(run, "_accelerator", spy)
    return made


def _placement(*modules: torch.nn.Module) -> set[tuple[torch.device, torch.dtype]]:
    return {(p.device, p.dtype) for m in modules for p in m.parameters()}


class _UNetBatches:
    """Records the batch size of every UNet call (a spy: the real forward runs)."""

    def __init__(self, unet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        real = unet.forward

        def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.sizes.append(int(sample.shape[0]))
            return real(sample, *args, **kwargs)

        monkeypatch.setattr(unet, "forward", forward)


# --- the helper --------------------------------------------------------------------------------


def test_placed_puts_networks_together_and_gives_back_their_unrounded_weights():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)
    b.to(torch.bfloat16)
    a.train()
    weight = a.weight.detach().clone()
    with placed([a, b], "cpu", torch.float16):
        assert _placement(a, b) == {(torch.device("cpu"), torch.float16)}
        assert b.running_mean is not None and b.running_mean.dtype == torch.float16
        assert not a.training
    assert a.weight.dtype == torch.float32 and torch.equal(a.weight, weight), "no fp16 rounding"
    assert _placement(b) == {(torch.device("cpu"), torch.bfloat16)}
    assert b.running_mean is not None and b.running_mean.dtype == torch.bfloat16
    assert a.training


def test_frozen_networks_run_in_half_precision_only_on_cuda():
    assert frozen_dtype(torch.device("cpu"), "bf16") == torch.float32
    assert frozen_dtype(torch.device("cuda", 1), "fp16") == torch.float16
    assert frozen_dtype(torch.device("cuda"), "bf16") == torch.bfloat16
    assert frozen_dtype(torch.device("cuda"), "no") == torch.float32


# --- Boomerang ---------------------------------------------------------------------------------


def test_boomerang_denoises_variants_in_batches_in_the_given_dtype(monkeypatch):
    components = build_tiny_components(seed=0)
    components.text_encoder.to(torch.bfloat16)  # left elsewhere by an earlier step
    batches = _UNetBatches(components.unet, monkeypatch)
    seen: list[set[tuple[torch.device, torch.dtype]]] = []
    real_decode = components.vae.decode

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(_placement(components.vae, components.unet, components.text_encoder))
        return real_decode(latents, *args, **kwargs)

    monkeypatch.setattr(components.vae, "decode", decode)
    variants = boomerang_variants(
        make_pairs(2),
        components,
        ImageTransform(PreprocessingSpec(resolution=64)),
        strength=0.5,
        copies=3,
        seed=0,
        num_inference_steps=4,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    assert len(variants) == 6
    # all six variants in each UNet call (2 of the 4 steps run at strength 0.5), not one by one
    assert batches.sizes == [6, 6]
    assert seen == [{(torch.device("cpu"), torch.float32)}]
    assert _placement(components.text_encoder) == {(torch.device("cpu"), torch.bfloat16)}


@pytest.mark.parametrize("cache_latents", [True, False])
def test_a_run_makes_boomerang_variants_on_the_accelerators_device(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_latents: bool
):
    import difftrain.data.boomerang as boomerang

    accelerators = _spy_on_accelerator(monkeypatch)
    calls: list[dict[str, Any]] = []
    real = boomerang.boomerang_variants

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(boomerang, "boomerang_variants", spy)
    job = tiny_job(
        inputs,
        tmp_path / "out",
        hyperparameters=_short(),
        preprocessing={
            "resolution": 64,
            "cacheLatents": cache_latents,
            "boomerang": {"enabled": True, "copies": 1, "strength": 0.3},
        },
    )
    job["spec"]["dataset"]["uri"] = str(_small_dataset(inputs, tmp_path / "ds"))
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    outcome = run_training(resource, RunOptions(work_dir=tmp_path / "work"))
    assert outcome.report.augmented == 6
    (acc,) = accelerators
    assert [c.get("device") for c in calls] == [acc.device]
    assert [c.get("dtype") for c in calls] == [frozen_dtype(acc.device, "no")]


# --- DreamBooth class images -------------------------------------------------------------------


def test_class_images_run_every_network_together_after_the_encoders_were_left_elsewhere(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """As in a pod after the latent cache was built: the VAE and the text encoder in another
    dtype than the UNet. Class images are still made, with all three on the accelerator's device
    in one dtype, all in one batch; the networks are given back as they were."""
    import difftrain.models as models
    import difftrain.train.sampling as sampling
    from difftrain.data.cache import LatentCache

    accelerators = _spy_on_accelerator(monkeypatch)
    real_load = models.load_base_model

    def load(*args: Any, **kwargs: Any) -> Any:
        components = real_load(*args, **kwargs)
        components.vae.to(torch.bfloat16)
        components.text_encoder.to(torch.bfloat16)
        return components

    monkeypatch.setattr(models, "load_base_model", load)
    placements: list[set[tuple[torch.device, torch.dtype]]] = []
    after: list[set[tuple[torch.device, torch.dtype]]] = []
    batches: list[int] = []
    real_build = sampling.build_pipeline

    def build(components: Any, unet: Any, **kwargs: Any) -> Any:
        pipe = real_build(components, unet, **kwargs)
        real_call = type(pipe).__call__

        class Recorded(type(pipe)):  # type: ignore[misc]
            def __call__(self, *a: Any, **kw: Any) -> Any:
                placements.append(_placement(self.vae, self.text_encoder, self.unet))
                batches.append(int(kw.get("num_images_per_prompt") or 1))
                return real_call(self, *a, **kw)

        pipe.__class__ = Recorded
        return pipe

    monkeypatch.setattr(sampling, "build_pipeline", build)
    real_get_or_build = LatentCache.get_or_build

    def get_or_build(self: Any, pairs: Any, components: Any, *a: Any, **kw: Any) -> Any:
        # the class images' cache is encoded right after they are made
        after.append(_placement(components.vae, components.text_encoder))
        return real_get_or_build(self, pairs, components, *a, **kw)

    monkeypatch.setattr(LatentCache, "get_or_build", get_or_build)
    job = tiny_job(
        inputs,
        tmp_path / "out",
        hyperparameters=_short(),
        sampling={"everySteps": 0, "numInferenceSteps": 2, "prompts": ["a red circle"]},
        dreambooth={
            "instancePrompt": "a photo of sks circle",
            "classPrompt": "a photo of a circle",
            "numClassImages": 3,
        },
    )
    job["spec"]["dataset"]["uri"] = str(_small_dataset(inputs, tmp_path / "ds"))
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    outcome = run_training(resource, RunOptions(work_dir=tmp_path / "work"))
    assert outcome.loop.state.step == 1
    assert len(list((tmp_path / "out" / "class-images").glob("*.png"))) == 3
    (acc,) = accelerators
    # the first pipeline call made the class images: one place, one dtype, one batch of three
    assert placements[0] == {(acc.device, frozen_dtype(acc.device, "no"))}
    assert batches[0] == 3
    assert after == [{(acc.device, torch.bfloat16)}], "given back in the dtype they came in"


# --- samples during training -------------------------------------------------------------------


def test_samples_from_networks_of_mixed_dtypes_run_under_autocast():
    """The training loop samples with its frozen networks in half precision and its trained ones
    in float32 (a full fine-tune of the UNet under mixed precision)."""
    components = build_tiny_components(seed=0)
    components.vae.to(torch.bfloat16)
    components.text_encoder.to(torch.bfloat16)
    pipe = build_pipeline(components, components.unet)
    spec = SamplingSpec.model_validate({"numInferenceSteps": 2, "seed": 3})
    prompts = ["a red circle", "a blue square", "a green circle"]
    images = generate(pipe, spec, prompts, resolution=64, device=torch.device("cpu"))
    assert [i.size for i in images] == [(64, 64)] * 3
    assert components.unet.dtype == torch.float32, "the trained weights are not cast"


def test_samples_are_made_in_batches_with_a_seed_per_prompt(monkeypatch):
    import numpy as np

    components = build_tiny_components(seed=0)
    batches = _UNetBatches(components.unet, monkeypatch)
    pipe = build_pipeline(components, components.unet)

    def spec(seed: int) -> SamplingSpec:
        return SamplingSpec.model_validate(
            {"numInferenceSteps": 2, "seed": seed, "guidanceScale": 1.0}
        )

    prompts = ["a red circle", "a blue square", "a green circle"]
    together = generate(pipe, spec(3), prompts, resolution=64, device=torch.device("cpu"))
    assert batches.sizes == [3, 3], "one UNet call per step for all prompts"
    # image i depends on prompt i and seed + i only: made alone from seed 3 + 1, image 1 is the
    # same (within a grey level: batched kernels may round differently)
    (alone,) = generate(pipe, spec(4), prompts[1:2], resolution=64, device=torch.device("cpu"))
    diff = np.abs(np.asarray(together[1], dtype=int) - np.asarray(alone, dtype=int))
    assert diff.max() <= 1
