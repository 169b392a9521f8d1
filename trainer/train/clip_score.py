"""The CLIP score of the sample images against their prompts (``sampling.clipModelUri``).

The score of an image and its prompt is 100 × the cosine similarity of their CLIP embeddings,
clamped at 0 (torchmetrics' ``CLIPScore``); the score of a set of samples is the mean over its
images. The CLIP model is a transformers ``CLIPModel`` folder written by ``save_pretrained``
beside its processor, fetched from the store once per node like the base model, loaded from
safetensors only (a pickled checkpoint can run code), and kept on the main process's device in
eval mode, in half precision on a GPU.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difftrain.api import ClipScoreStatus
from difftrain.models.errors import ModelError
from difftrain.models.fetch import fetch_objects
from difftrain.storage import StorageError, StoreConfig, is_s3, open_store

logger = logging.getLogger(__name__)

FIELD = "sampling.clipModelUri"
CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")
_WHAT = (
    "set it to a folder holding a transformers CLIPModel and its CLIPProcessor, both written "
    "with save_pretrained"
)


def clip_folder_files(names: Sequence[str], where: str) -> list[str]:
    """Of a folder's file names, the ones a CLIP model loads from; refuse what is not one.

    ``where`` names the field and the uri in messages (``sampling.clipModelUri s3://...``).
    """
    top = {n for n in names if "/" not in n}
    fix = (
        "save a transformers CLIPModel there with save_pretrained, and its CLIPProcessor beside it"
    )
    if CONFIG not in top:
        hint = " (it is a diffusers pipeline)" if "model_index.json" in top else ""
        raise ModelError(f"{where}: not a CLIP model folder (no config.json){hint}; {fix}")
    if WEIGHTS in top:
        weights = [WEIGHTS]
    elif WEIGHTS_INDEX in top:
        weights = [WEIGHTS_INDEX, *sorted(n for n in top if _SHARD.fullmatch(n))]
    else:
        pickled = sorted(n for n in top if n.endswith(_PICKLES))
        hint = (
            f" ({pickled[0]} is a pickle, which is never loaded: it can run code; re-save the "
            "model with save_pretrained(safe_serialization=True))"
            if pickled
            else f"; {fix}"
        )
        raise ModelError(f"{where}: no {WEIGHTS} (safetensors weights only){hint}")
    if PREPROCESSOR not in top:
        raise ModelError(
            f"{where}: no {PREPROCESSOR} (how images are resized and normalised for the model); "
            "save the model's CLIPProcessor or CLIPImageProcessor there with save_pretrained"
        )
    if "tokenizer.json" not in top and not {"vocab.json", "merges.txt"} <= top:
        raise ModelError(
            f"{where}: no tokenizer (tokenizer.json, or vocab.json and merges.txt); save the "
            "model's CLIPProcessor or CLIPTokenizer there with save_pretrained"
        )
    return [CONFIG, PREPROCESSOR, *(n for n in TOKENIZER_FILES if n in top), *weights]


def fetch_clip_folder(uri: str, store_config: StoreConfig | None, dest: Path) -> Path:
    """The CLIP folder's local path: as is, or its files downloaded into ``dest`` once."""
    where = f"{FIELD} {uri}"
    if not is_s3(uri):
        folder = Path(uri)
        if not folder.is_dir():
            raise ModelError(f"{where}: no such folder; {_WHAT}")
        clip_folder_files([p.name for p in folder.iterdir() if p.is_file()], where)
        return folder
    prefix = uri.rstrip("/") + "/"
    try:
        store = open_store(uri, store_config)
        names = [u[len(prefix) :] for u in store.list(prefix)]
    except StorageError as exc:
        raise ModelError(f"{where}: cannot list the folder: {exc}") from exc
    if not names:
        raise ModelError(f"{where}: nothing under this prefix; {_WHAT}")
    wanted = clip_folder_files(names, where)
    moved = fetch_objects(store, {name: prefix + name for name in wanted}, dest)
    logger.info("clip model fetched", extra={"uri": uri, "files": len(wanted), "downloaded": moved})
    return dest


@dataclass
class ClipScorer:
    """A CLIP model in eval mode on one device, with its tokenizer and image processor."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any
    image_processor: Any
    device: torch.device

    @property
    def max_length(self) -> int:
        """Prompt tokens the text tower takes (longer prompts are cut, as CLIP was trained)."""
        positions = int(self.model.config.text_config.max_position_embeddings)
        return min(positions, int(self.tokenizer.model_max_length))

    @torch.no_grad()
    def scores(self, images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
        """The CLIP score of each image (PIL) against the prompt of the same index."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        model = self.model
        dtype = next(model.parameters()).dtype
        pixels = self.image_processor(
            images=[image.convert("RGB") for image in images], return_tensors="pt"
        )["pixel_values"]
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        vision = model.vision_model(pixel_values=pixels.to(self.device, dtype))
        text = model.text_model(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        image_embeds = model.visual_projection(vision.pooler_output)
        text_embeds = model.text_projection(text.pooler_output)
        values: list[float] = clip_scores(image_embeds, text_embeds).tolist()
        return values


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """100 × the cosine similarity of each row pair, clamped at 0 (in float32)."""
    image = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    text = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    return (100.0 * (image * text).sum(dim=-1)).clamp(min=0.0)


def clip_score_status(scores: Sequence[float], step: int, *, ema: bool) -> ClipScoreStatus:
    """The status of one set of samples' scores: their mean."""
    return ClipScoreStatus(
        score=sum(scores) / max(len(scores), 1),
        step=step,
        images=len(scores),
        weights="ema" if ema else "trained",
    )


def load_clip_scorer(
    uri: str, store_config: StoreConfig | None, *, work_dir: Path, device: torch.device
) -> ClipScorer:
    """The CLIP model at ``uri`` on ``device`` (float16 on a GPU, float32 elsewhere)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    where = f"{FIELD} {uri}"
    folder = fetch_clip_folder(uri, store_config, work_dir)
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where}: unreadable {CONFIG}: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip":
        raise ModelError(
            f"{where}: {CONFIG} describes a {model_type!r} model, not a CLIPModel (model_type "
            "'clip': its text and vision towers, both needed to score images); " + _WHAT
        )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        model, info = CLIPModel.from_pretrained(
            folder, use_safetensors=True, dtype=dtype, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{where}: cannot load it as a CLIP model: {exc}") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(
            f"{where}: its weights lack {len(missing)} of the CLIPModel's tensors (e.g. "
            f"{missing[0]}), which would score with random weights; " + _WHAT
        )
    model.to(device).eval().requires_grad_(False)
    logger.info("clip model loaded uri=%s dtype=%s device=%s", uri, dtype, device)
    return ClipScorer(model, tokenizer, image_processor, device)
