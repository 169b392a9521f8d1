"""Tiny training jobs for tests: a tiny model and a shapes dataset, as job dicts."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from difftrain.train.report import ConsoleReporter
from difftrain.train.synthetic import default_local_job, write_shapes_dataset

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent


def prepare_local_inputs(root: Path, *, images: int = 48, **model: Any) -> Path:
    """A tiny diffusers model folder and a shapes dataset under ``root`` (made once per root).

    ``model`` goes to build_tiny_pipeline_folder (prediction_type, vae_steps, context_length).
    """
    from difftrain.models.tiny import build_tiny_pipeline_folder

    if not (root / "base-model" / "model_index.json").exists():
        build_tiny_pipeline_folder(root / "base-model", seed=0, **model)
    if not (root / "dataset").exists():
        write_shapes_dataset(root / "dataset", images, size=64, seed=0)
    return root


def tiny_job(inputs: Path, output: Path, **spec_updates: Any) -> dict[str, Any]:
    """The local default job on ``inputs``, writing to ``output``, with spec sections replaced.

    Keyword arguments replace whole top-level spec sections (``hyperparameters={...}``); the
    defaults here are short: 12 steps of batch 4, no samples in between.
    """
    job = copy.deepcopy(default_local_job(inputs))
    spec = job["spec"]
    spec["output"] = {"uri": str(output)}
    spec["hyperparameters"] = {
        "batchSize": 4,
        "learningRate": 3e-4,
        "maxSteps": 12,
        "warmupSteps": 2,
        "mixedPrecision": "no",
    }
    spec["sampling"] = {"everySteps": 0, "numInferenceSteps": 2, "prompts": ["a red circle"]}
    spec["checkpointing"] = {"everySteps": 5, "keepLast": 5}
    spec["regularization"] = {}
    for key, value in spec_updates.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return job


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job))
    return path


def run_cli(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m difftrain ARGS`` in a subprocess, as a pod runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "difftrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
        check=False,
    )


def write_tiny_clip_model(path: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random CLIPModel with its processor (the tiny tokenizer that knows the shapes
    captions' words, and a CLIP image processor), written with save_pretrained (made once)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from difftrain.models.tiny import MAX_LENGTH, write_tiny_tokenizer

    if (path / "model.safetensors").exists():
        return path
    write_tiny_tokenizer(path)
    tokenizer = CLIPTokenizer.from_pretrained(path)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_LENGTH,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            **tower,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": image_size // 4,
        },
        projection_dim=16,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPModel(config)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(path, safe_serialization=True)
    # CLIP's resize, centre crop and normalisation (its mean and std), at the tiny tower's size
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(path)
    return path


class TextEncoderCalls(ConsoleReporter):
    """A reporter that records the token ids the text encoder gets (a forward pre-hook on every
    CLIP text model, while in its ``with`` block): before training starts (the latent cache's
    encoding) and in each step."""

    def __init__(self) -> None:
        super().__init__(bar=False)
        self.before: list[list[int]] = []
        self.by_step: dict[int, list[list[int]]] = {}
        self._current = self.before
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> TextEncoderCalls:
        import torch

        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._handle is not None
        self._handle.remove()

    def _record(self, module: torch.nn.Module, args: tuple) -> None:
        import torch

        if type(module).__name__ == "CLIPTextModel" and args and args[0].dtype == torch.long:
            self._current.extend(args[0].tolist())

    def started(self, total_steps: int, resumed_from: str | None) -> None:
        super().started(total_steps, resumed_from)
        self._current = []

    def progress(self, progress) -> None:
        super().progress(progress)
        self.by_step[progress.step] = self._current
        self._current = []
