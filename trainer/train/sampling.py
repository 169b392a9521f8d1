"""Sample images from fixed prompts and seeds, written to the store with a grid image."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from difftrain.api import SamplingSpec
from difftrain.storage import Store, commit, join

SAMPLE_BATCH = 4  # sample images per pipeline call


def should_sample(step: int, total_steps: int, every_steps: int) -> bool:
    """Samples every ``every_steps`` optimizer steps (0: never in between) and at the end."""
    return step == total_steps or (every_steps > 0 and step % every_steps == 0)


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equally sized images into one grid, row by row."""
    if not images:
        raise ValueError("no images to tile")
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def build_pipeline(
    components: Any,
    unet: torch.nn.Module,
    *,
    controlnet: torch.nn.Module | None = None,
    text_encoders: list[torch.nn.Module] | None = None,
) -> Any:
    """The family's diffusers pipeline around the modules being trained (no safety checker);
    ``text_encoders`` in the family's order (default: the components')."""
    from diffusers import DPMSolverMultistepScheduler

    from difftrain.models.families import family

    scheduler = DPMSolverMultistepScheduler.from_config(components.scheduler_config)
    pipe = family(components.family).pipeline(
        components, unet, scheduler, text_encoders=text_encoders, controlnet=controlnet
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe: Any,
    spec: SamplingSpec,
    prompts: list[str],
    *,
    resolution: int,
    device: torch.device,
    conditioning: list[Image.Image] | None = None,
    conditioning_scale: float = 1.0,
    batch_size: int = SAMPLE_BATCH,
) -> list[Image.Image]:
    """One image per prompt, prompt i with seed ``spec.seed + i``: comparable across steps.

    With ``conditioning`` (a ControlNet pipeline), prompt i is conditioned on image i (cycled) and
    the ControlNet's residuals are scaled by ``conditioning_scale`` (0: the UNet alone). Prompts
    go through the pipeline ``batch_size`` at a time; where its networks hold different dtypes
    (frozen ones in half precision beside trained fp32 weights) it runs under autocast in the
    half one, as the training step does.
    """
    images: list[Image.Image] = []
    with _autocast(pipe, device):
        for start in range(0, len(prompts), batch_size):
            batch = range(start, min(len(prompts), start + batch_size))
            kwargs: dict[str, Any] = {}
            if conditioning is not None:
                kwargs["image"] = [conditioning[i % len(conditioning)] for i in batch]
                kwargs["controlnet_conditioning_scale"] = conditioning_scale
            negative = spec.negative_prompt
            out = pipe(
                [prompts[i] for i in batch],
                negative_prompt=[negative] * len(batch) if negative is not None else None,
                num_inference_steps=spec.num_inference_steps,
                guidance_scale=spec.guidance_scale,
                height=resolution,
                width=resolution,
                generator=[torch.Generator(device="cpu").manual_seed(spec.seed + i) for i in batch],
                output_type="pil",
                **kwargs,
            )
            images.extend(out.images)
    return images


def _autocast(pipe: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast in the half-precision dtype among the pipeline's networks, when they mix dtypes."""
    names = ("unet", "text_encoder", "text_encoder_2", "vae", "controlnet")
    networks = [getattr(pipe, n, None) for n in names]
    dtypes = {
        p.dtype
        for net in networks
        if net is not None
        for p in net.parameters()
        if p.is_floating_point()
    }
    half = next((d for d in (torch.float16, torch.bfloat16) if d in dtypes), None)
    if len(dtypes) < 2 or half is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=half)


def write_samples(
    store: Store,
    output_uri: str,
    step: int,
    images: list[Image.Image],
    prompts: list[str],
    work_dir: Path,
    clip_scores: list[float] | None = None,
) -> list[str]:
    """Commit the images and their grid under ``<output>/samples/step-N/``; return their URIs.

    The manifest's metadata holds the step, the prompts and, when scored, each image's CLIP
    score (``clipScores``, in the images' order).
    """
    folder = work_dir / f"samples-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for i, image in enumerate(images):
        path = folder / f"{i:02d}.png"
        image.save(path)
        files[path.name] = path
    grid = folder / "grid.png"
    image_grid(images).save(grid)
    files["grid.png"] = grid
    prefix = join(output_uri, "samples", f"step-{step:08d}")
    metadata: dict[str, Any] = {"step": step, "prompts": prompts}
    if clip_scores is not None:
        metadata["clipScores"] = clip_scores
    commit(store, prefix, files, metadata=metadata)
    for path in files.values():
        path.unlink()
    folder.rmdir()
    return [join(prefix, "grid.png")] + [join(prefix, n) for n in sorted(files) if n != "grid.png"]
