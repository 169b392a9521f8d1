"""Training-step benchmark on the CPU: difftrain's loop against a diffusers-example-style loop.

Both train the same tiny SD-shaped model (built from configs) on the same generated shapes
dataset, batch 8 at 64 px, for the same number of steps, in this process:

- ``example``: what the diffusers text_to_image example does every step: decode and transform the
  images with PIL, encode them with the VAE and the captions with the text encoder, then the UNet
  forward/backward and an AdamW step;
- ``difftrain``: ``difftrain run`` on the same job (latents and text embeddings cached once; the
  cache build is reported separately), timed over its optimizer steps.

    python benchmarks/train_bench.py [--steps 60] [--repeat 2]

PERFORMANCE.md's regression guard: difftrain >= 1.2x the example loop on the same tiny model.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))


def example_loop(model_dir: Path, data_dir: Path, steps: int, batch: int) -> float:
    """Images/s of the example-style loop (VAE and text encoder run every step)."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from difftrain import api
    from difftrain.data.transforms import ImageTransform

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").requires_grad_(False)
    text = CLIPTextModel.from_pretrained(model_dir / "text_encoder").requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    sched = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    transform = ImageTransform(api.PreprocessingSpec(resolution=64, flipProbability=0.5))
    images = sorted(data_dir.glob("*.png"))
    rng = random.Random(0)
    unet.train()

    def step() -> None:
        chosen = rng.sample(images, batch)
        pixels = torch.stack([transform(Image.open(p).convert("RGB"), rng=rng) for p in chosen])
        captions = [p.with_suffix(".txt").read_text() for p in chosen]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tok(captions, padding="max_length", max_length=77, return_tensors="pt")
            hidden = text(ids.input_ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def difftrain_loop(root: Path, steps: int, batch: int) -> tuple[float, float]:
    """(images/s over the optimizer steps, seconds to load data and build the cache)."""
    from difftrain import api
    from difftrain.train.report import ConsoleReporter
    from difftrain.train.run import RunOptions, run_training
    from difftrain.train.synthetic import default_local_job

    job = default_local_job(root)
    spec = job["spec"]
    spec["output"] = {"uri": str(root / f"out-{time.monotonic_ns()}")}
    spec["hyperparameters"].update(
        {"batchSize": batch, "maxSteps": steps + 3, "warmupSteps": 1, "lrScheduler": "constant"}
    )
    spec["sampling"] = {"everySteps": 0, "numInferenceSteps": 1, "prompts": ["a red circle"]}
    spec["checkpointing"] = {"everySteps": 100000, "keepLast": 1}
    spec["regularization"] = {}
    spec["output"]["formats"] = ["single_file"]
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    start = time.perf_counter()
    outcome = run_training(
        resource, RunOptions(work_dir=root / "work", reporter=ConsoleReporter(bar=False))
    )
    total = time.perf_counter() - start
    images = outcome.loop.state.images_seen
    return images / outcome.loop.step_seconds, total - outcome.loop.step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import logging

    import torch

    from difftrain.models.tiny import build_tiny_pipeline_folder
    from difftrain.train.synthetic import write_shapes_dataset

    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="difftrain-train-bench-"))
    try:
        build_tiny_pipeline_folder(root / "base-model", seed=0)
        write_shapes_dataset(root / "dataset", 96, size=64, seed=0)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
        rows = []
        for _ in range(args.repeat):
            example = example_loop(root / "base-model", root / "dataset", args.steps, args.batch)
            ours, setup = difftrain_loop(root, args.steps, args.batch)
            rows.append((example, ours, setup))
            print(
                f"example {example:6.1f} img/s   difftrain {ours:6.1f} img/s   "
                f"ratio {ours / example:4.2f}   (difftrain setup incl. cache {setup:4.1f} s)"
            )
        best_example = max(r[0] for r in rows)
        best_ours = max(r[1] for r in rows)
        print(
            f"best: example {best_example:.1f}, difftrain {best_ours:.1f} img/s, "
            f"ratio {best_ours / best_example:.2f} (target >= 1.2)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
