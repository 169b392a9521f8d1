"""A synthetic captioned dataset of coloured shapes, and the local run's embedded default job.

The local run needs no download: it writes this dataset and a tiny model into a work folder and
trains on them through the same pipeline a cluster job uses. ``prompt_colours`` reads a sample
back: which of the palette's colours it shows, against the ones its prompt names.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


def draw_shape(
    size: int, shape: str, colour: str, background: str, rng: random.Random
) -> Image.Image:
    """One image: a shape of one colour on a background of another, at a random place and size."""
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    side = rng.randint(size * 2 // 5, size * 3 // 4)
    x0 = rng.randint(0, size - side)
    y0 = rng.randint(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


def caption_for(shape: str, colour: str, background: str) -> str:
    """The caption of a shapes image."""
    return f"a {colour} {shape} on a {background} background"


def parse_caption(caption: str) -> tuple[str, str, str]:
    """(shape, colour, background) of a caption ``caption_for`` wrote."""
    words = caption.split()
    if (
        len(words) != 7
        or words[1] not in COLOURS
        or words[2] not in SHAPES
        or words[-2] not in COLOURS
    ):
        raise ValueError(f"{caption!r} is not 'a <colour> <shape> on a <colour> background'")
    return words[2], words[1], words[-2]


# A pixel farther than this (RGB distance) from every palette colour counts as none of them.
PALETTE_RADIUS = 90.0


@dataclass(frozen=True)
class PromptColours:
    """What a sample of a shapes prompt shows, in palette colours.

    ``shares``: the fraction of the image's pixels nearest each palette colour (within
    ``PALETTE_RADIUS``); ``border``: the median colour of the image's outer eighth, where the
    background mostly is (a shape covers less than half of it); ``background_distance``: the
    RGB distance from ``border`` to the prompt's background colour; ``shape_distance``: from the
    mean colour of the pixels that are not the background colour (where the shape is) to the
    prompt's shape colour.
    """

    prompt: str
    shares: dict[str, float]
    border: tuple[int, int, int]
    shape_distance: float
    background_distance: float

    @property
    def top_two(self) -> set[str]:
        """The two palette colours covering most of the image."""
        return set(sorted(self.shares, key=lambda c: -self.shares[c])[:2])

    @property
    def shows_prompt(self) -> bool:
        """The image is mostly the prompt's two colours, and its border is the background's."""
        _, colour, background = parse_caption(self.prompt)
        return self.top_two == {colour, background} and nearest_colour(self.border) == background


def nearest_colour(rgb: Any) -> str:
    """The palette colour nearest an RGB triple."""
    value = np.asarray(rgb, dtype=np.float32)
    return min(COLOURS, key=lambda c: float(np.linalg.norm(value - np.asarray(COLOURS[c]))))


def prompt_colours(image: Image.Image, prompt: str) -> PromptColours:
    """Measure one sample of ``prompt`` (see PromptColours)."""
    _, colour, background = parse_caption(prompt)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    flat = pixels.reshape(-1, 3)
    distance = np.linalg.norm(flat[:, None, :] - palette[None], axis=-1)
    nearest = np.where(distance.min(axis=1) <= PALETTE_RADIUS, distance.argmin(axis=1), -1)
    names = list(COLOURS)
    shares = {name: float((nearest == i).mean()) for i, name in enumerate(names)}
    k = max(1, pixels.shape[0] // 8)
    edges = (pixels[:k], pixels[-k:], pixels[k:-k, :k], pixels[k:-k, -k:])
    frame = np.concatenate([edge.reshape(-1, 3) for edge in edges])
    border = np.median(frame, axis=0)
    shape = flat[nearest != names.index(background)]
    shape_mean = (shape if len(shape) else flat).mean(axis=0)
    return PromptColours(
        prompt=prompt,
        shares=shares,
        border=(round(float(border[0])), round(float(border[1])), round(float(border[2]))),
        shape_distance=float(np.linalg.norm(shape_mean - np.asarray(COLOURS[colour]))),
        background_distance=float(np.linalg.norm(border - np.asarray(COLOURS[background]))),
    )


def write_shapes_dataset(
    folder: Path,
    count: int,
    *,
    size: int = 64,
    seed: int = 0,
    backgrounds: tuple[str, ...] | None = None,
) -> Path:
    """Write ``count`` PNG + same-stem .txt pairs (the folder layout) into ``folder``.

    Shapes cycle through SHAPES and the colours (those not in ``backgrounds``), each on one of
    ``backgrounds`` (default: any other colour).
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [c for c in COLOURS if backgrounds is None or c not in backgrounds]
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = names[(i // len(SHAPES)) % len(names)]
        background = rng.choice([c for c in backgrounds or COLOURS if c != colour])
        draw_shape(size, shape, colour, background, rng).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption_for(shape, colour, background))
    return folder


LOCAL_DATASET_SIZE = 96
# The local run's shapes: red, green, blue or yellow ones on white or black (24 captions, each
# drawn about four times), so that its samples' prompts are captions it trains on.
LOCAL_BACKGROUNDS = ("white", "black")
# The local run's tiny model (build_tiny_pipeline_folder's options): a VAE pre-trained on shapes
# with one GroupNorm group (its latents keep every palette colour), attention in the UNet's
# half-size level only (a CPU step several times cheaper), a 16-token text context the captions
# fill, and v-prediction on a zero-terminal-SNR schedule. SD1's schedule keeps some of the image
# at t=999, so a model trained on it keeps the mean colour it is given, and its samples, drawn
# from pure noise, come out as colour noise (0 of 8 prompts shown after 600 steps; a noise offset
# of 0.3 got 4 of 8; this schedule 6 of 8 after 600 steps and 8 of 8 after 1000, the shapes
# roughly drawn: 3 min 43 s in all on an idle 2-core machine).
LOCAL_MODEL: dict[str, Any] = {
    "vae_steps": 150,
    "vae_norm_groups": 1,
    "unet_attention": (False, True),
    "context_length": 16,
    "prediction_type": "v_prediction",
    "zero_terminal_snr": True,
}
LOCAL_STEPS = 1000
LOCAL_PROMPTS = (
    "a red circle on a white background",
    "a blue square on a black background",
    "a yellow triangle on a black background",
    "a green circle on a white background",
    "a red square on a black background",
    "a blue triangle on a white background",
    "a yellow circle on a white background",
    "a green square on a black background",
)


LOCAL_SDXL_MODEL = "base-model-sdxl"


def write_local_inputs(
    work_dir: Path, *, images: int = LOCAL_DATASET_SIZE, family: str = "sd1"
) -> Path:
    """The local run's tiny model and shapes dataset under ``work_dir`` (each made once).

    ``family`` sdxl: an SDXL-shaped model as well (``base-model-sdxl``), with the SD1 model's
    pre-trained VAE (a random one would leave nothing in the latents to learn from).
    """
    from difftrain.models.tiny import build_tiny_pipeline_folder

    if not (work_dir / "base-model" / "model_index.json").exists():
        build_tiny_pipeline_folder(work_dir / "base-model", seed=0, **LOCAL_MODEL)
    if family == "sdxl" and not (work_dir / LOCAL_SDXL_MODEL / "model_index.json").exists():
        import shutil

        from difftrain.models.tiny_sdxl import build_tiny_sdxl_pipeline_folder

        staging = work_dir / f"{LOCAL_SDXL_MODEL}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        build_tiny_sdxl_pipeline_folder(staging, seed=0)
        shutil.rmtree(staging / "vae")
        shutil.copytree(work_dir / "base-model" / "vae", staging / "vae")
        staging.rename(work_dir / LOCAL_SDXL_MODEL)
    if not (work_dir / "dataset").exists():
        write_shapes_dataset(
            work_dir / "dataset", images, size=64, seed=0, backgrounds=LOCAL_BACKGROUNDS
        )
    return work_dir


def default_local_job(work_dir: Path, *, family: str = "sd1") -> dict[str, Any]:
    """The embedded job of ``difftrain run --local``: a few minutes of training on a CPU.

    A random-initialised model, so a high learning rate (1e-3, cosine after a short warm-up),
    and a 10% empty caption for the samples' classifier-free guidance. ``family`` sdxl: the
    same job on the SDXL-shaped model, written to ``output-sdxl``.
    """
    if family == "sdxl":
        job = default_local_job(work_dir)
        job["metadata"]["name"] = "local-shapes-sdxl"
        job["spec"]["baseModel"] = {"uri": str(work_dir / LOCAL_SDXL_MODEL)}
        job["spec"]["output"] = {"uri": str(work_dir / "output-sdxl")}
        return job
    return {
        "apiVersion": "difftrain.dev/v1alpha1",
        "kind": "DiffusionTrainingJob",
        "metadata": {"name": "local-shapes"},
        "spec": {
            "baseModel": {"uri": str(work_dir / "base-model")},
            "dataset": {
                "uri": str(work_dir / "dataset"),
                "format": "folder",
                "cleaning": {"minResolution": 32, "nearDuplicateDistance": 0},
            },
            "preprocessing": {"resolution": 64, "flipProbability": 0.5},
            "method": "full",
            "hyperparameters": {
                "batchSize": 8,
                "learningRate": 1e-3,
                "maxSteps": LOCAL_STEPS,
                "warmupSteps": 20,
                "mixedPrecision": "no",
                "lrScheduler": "cosine",
            },
            "regularization": {"ema": {"enabled": True, "decay": 0.99}, "captionDropout": 0.1},
            "sampling": {
                "everySteps": LOCAL_STEPS // 2,
                "numInferenceSteps": 20,
                "guidanceScale": 3.0,
                "prompts": list(LOCAL_PROMPTS),
            },
            "checkpointing": {"everySteps": LOCAL_STEPS // 4, "keepLast": 2},
            "output": {"uri": str(work_dir / "output")},
        },
    }
