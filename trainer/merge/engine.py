"""The streaming merge engine: plan from the inputs' headers, refuse what cannot be merged, then
evaluate the recipe tensor by tensor and commit the output atomically.

Memory stays at a few tensors of each input plus the read buffers, whatever the model's size: no
input is ever loaded whole. Everything that can be checked from headers is checked before the first
byte of output is written.

Keys present in only some inputs (EMA copies, ``v_pred`` markers, text-encoder ``position_ids`` in
some exports) are never averaged with nothing: they are copied from the first input that has
them, and counted in the output's metadata. Integer tensors are always copied from the first input.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difftrain import __version__
from difftrain.api import ModelMergeSpec
from difftrain.merge.evaluators import (
    CheckpointEvaluator,
    Evaluator,
    LoraIntoCheckpoint,
    LoraMerge,
)
from difftrain.merge.plan import (
    CHECKPOINT_METHODS,
    OUTPUT_DTYPES,
    MergeError,
    MergeInput,
    MergePlan,
    plan_checkpoint_merge,
)
from difftrain.merge.tensorio import (
    StreamingWriter,
    TensorReader,
)
from difftrain.storage import (
    FILE_MANIFEST_SUFFIX,
    StorageError,
    StoreConfig,
    commit_file,
    is_s3,
    open_store,
    scratch_dir,
    sha256_file,
)

__all__ = ["MergeError", "MergeResult", "merge"]

logger = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """What the merge produced (the ModelMerge status is filled from it)."""

    output_uri: str
    sha256: str
    short_hash: str
    size_bytes: int
    tensors: int
    duration_seconds: float
    input_sha256: dict[str, str]
    partial_keys: list[str] = field(default_factory=list)


def _committed_sha256(inp: MergeInput) -> str | None:
    """The sha256 recorded by the input's own manifest (atomic commit), if it has one that fits."""
    manifest_uri = inp.uri + FILE_MANIFEST_SUFFIX
    try:
        if not inp.store.exists(manifest_uri):
            return None
        raw = inp.store.read_range(manifest_uri, 0, inp.store.size(manifest_uri))
        entry = json.loads(raw)["files"][0]
    except (StorageError, ValueError, KeyError, IndexError, TypeError):
        return None
    if entry.get("size") != inp.header.file_size or not isinstance(entry.get("sha256"), str):
        return None
    digest: str = entry["sha256"]
    return digest if len(digest) == 64 else None


def _recipe(
    spec: ModelMergeSpec, inputs: list[MergeInput], hashes: list[str | None]
) -> dict[str, Any]:
    params: dict[str, Any] = {"alpha": spec.alpha}
    if spec.method == "ties":
        params = {"density": spec.density}
    elif spec.method == "dare":
        params = {"dropRate": spec.drop_rate, "seed": spec.seed}
    elif spec.method == "block_weighted":
        params = {"alpha": spec.alpha, "blockWeights": spec.block_weights}
    elif spec.method == "lora_merge":
        params = {"mode": spec.lora_merge_mode, "rank": spec.lora_rank}
    elif spec.method == "lora_into_checkpoint":
        params = {}
    return {
        "tool": f"difftrain {__version__}",
        "method": spec.method,
        "parameters": params,
        "components": sorted(spec.components),
        "vaeSource": spec.vae_source,
        "outputDtype": spec.output_dtype,
        "inputs": [
            {
                "role": i.role,
                "uri": i.uri,
                "weight": i.weight,
                "sha256": hashes[n] or _placeholder(n),
                "architecture": i.info.label(),
            }
            for n, i in enumerate(inputs)
        ],
        "partialKeys": "copied from the first input that has them",
    }


def _placeholder(n: int) -> str:
    return f"sha256-of-input-{n:02d}".ljust(64, "#")


ProgressFn = Callable[[int, int], None]


def merge(
    spec: ModelMergeSpec,
    config: StoreConfig | None = None,
    progress: ProgressFn | None = None,
) -> MergeResult:
    """Run one ModelMerge spec end to end and commit the output."""
    # no autograd for merges, without changing the caller's grad mode
    with torch.no_grad():
        return _merge(spec, config, progress)


def _merge(
    spec: ModelMergeSpec, config: StoreConfig | None, progress: ProgressFn | None
) -> MergeResult:
    started = time.monotonic()
    if spec.method in CHECKPOINT_METHODS:
        plan = plan_checkpoint_merge(spec, config)
        layout_source = plan.models[0]
        evaluator: Evaluator = CheckpointEvaluator(plan)
    elif spec.method == "lora_into_checkpoint":
        plan = MergePlan(spec, config)
        evaluator = LoraIntoCheckpoint(plan)
        layout_source = plan.models[0]
    else:
        plan = MergePlan(spec, config)
        evaluator = LoraMerge(plan)
        layout_source = plan.models[0]

    out_dtype = OUTPUT_DTYPES[spec.output_dtype]
    layout = evaluator.layout(layout_source, out_dtype)
    known = [_committed_sha256(i) for i in plan.all]
    all_known = all(known)
    recipe = _recipe(spec, plan.all, known)
    metadata = {
        "difftrain.recipe": json.dumps(recipe, separators=(",", ":")),
        "difftrain.version": __version__,
    }
    for key in ("modelspec.prediction_type", "modelspec.architecture", "ss_network_module"):
        if key in layout_source.header.metadata:
            metadata[key] = layout_source.header.metadata[key]
    metadata.update(evaluator.extra_metadata())

    out_store = open_store(spec.output.uri, config)
    # a local output is written beside its target and renamed into place; an object-store
    # output is written to a scratch folder and uploaded
    remote = is_s3(spec.output.uri)
    scratch = scratch_dir("difftrain-merge-") if remote else None
    out_path = (
        scratch / "output.safetensors"
        if scratch is not None
        else Path(spec.output.uri).with_name(f".{Path(spec.output.uri).name}.part")
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    readers = {
        id(i): TensorReader(i.store, i.uri, i.header, h)
        for i, h in zip(plan.all, known, strict=True)
    }
    writer = StreamingWriter(out_path, layout, metadata, hash_inline=all_known)
    try:
        for n, t in enumerate(layout):
            writer.write(t.name, evaluator.tensor(t.name, readers))
            if progress:
                progress(n + 1, len(layout))
        hashes = {}
        for n, inp in enumerate(plan.all):
            digest = readers[id(inp)].finish()
            hashes[inp.role] = digest
            if known[n] is None:
                writer.patch(_placeholder(n), digest)
    except BaseException:
        for r in readers.values():
            r.close()
        writer.abort()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    digest = writer.close() or sha256_file(out_path)
    size = out_path.stat().st_size
    if scratch is not None:
        try:
            commit_file(out_store, spec.output.uri, out_path, digest, {"recipe": recipe})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        final = Path(spec.output.uri)
        out_path.replace(final)
        commit_file(out_store, str(final), final, digest, {"recipe": recipe})
    return MergeResult(
        output_uri=spec.output.uri,
        sha256=digest,
        short_hash=digest[:10],
        size_bytes=size,
        tensors=len(layout),
        duration_seconds=round(time.monotonic() - started, 3),
        input_sha256=hashes,
        partial_keys=evaluator.partial_keys,
    )
