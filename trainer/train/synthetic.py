"""A synthetic captioned dataset of coloured shapes, and the local run's embedded default job.

The local run needs no download: it writes this dataset and a tiny model into a work folder and
trains on them through the same pipeline a cluster job uses.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

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


def write_shapes_dataset(folder: Path, count: int, *, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` PNG + same-stem .txt pairs (the folder layout) into ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = names[(i // len(SHAPES)) % len(names)]
        background = rng.choice([c for c in names if c != colour])
        draw_shape(size, shape, colour, background, rng).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption_for(shape, colour, background))
    return folder


def default_local_job(work_dir: Path) -> dict[str, Any]:
    """The embedded job of ``difftrain run --local``: a few minutes of training on a CPU."""
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
                "learningRate": 3e-4,
                "maxSteps": 300,
                "warmupSteps": 20,
                "mixedPrecision": "no",
                "lrScheduler": "cosine",
            },
            "regularization": {"ema": {"enabled": True, "decay": 0.99}},
            "sampling": {
                "everySteps": 150,
                "numInferenceSteps": 20,
                "prompts": [
                    "a red circle on a blue background",
                    "a yellow square on a black background",
                    "a white triangle on a green background",
                    "a blue circle on a yellow background",
                ],
            },
            "checkpointing": {"everySteps": 100, "keepLast": 2},
            "output": {"uri": str(work_dir / "output")},
        },
    }
