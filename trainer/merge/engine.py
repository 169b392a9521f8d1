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
import time
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difftrain import __version__
from difftrain.api import ModelMergeSpec
from difftrain.merge import methods
from difftrain.merge.arch import (
    ModelInfo,
    UNetLayout,
    block_index,
    component_of,
    describe,
    unet_layout,
)
from difftrain.merge.lora import LoraError, LoraModule, TargetIndex, modules
from difftrain.merge.tensorio import (
    DTYPES,
    Header,
    OutputTensor,
    SafetensorsError,
    StreamingWriter,
    TensorReader,
    read_header,
)
from difftrain.storage import (
    FILE_MANIFEST_SUFFIX,
    StorageError,
    Store,
    StoreConfig,
    commit_file,
    is_s3,
    open_store,
    scratch_dir,
    sha256_file,
)

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_METHODS = {"weighted_sum", "add_difference", "slerp", "ties", "dare", "block_weighted"}


class MergeError(ValueError):
    """Inputs that cannot be merged as asked; raised before anything is written."""


@dataclass
class MergeInput:
    """One opened input: where it is, its header and what it is."""

    role: str  # "models[0]", "base", "vaeUri", ...
    uri: str
    store: Store
    header: Header
    info: ModelInfo
    weight: float | None = None


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


def _open(role: str, uri: str, config: StoreConfig | None, allow_pickle: bool) -> MergeInput:
    if uri.lower().endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise MergeError(
                f"{role} {uri} is a pickle checkpoint; unpickling runs arbitrary code, so only "
                "safetensors are read. Convert it to .safetensors, or set allowPickle: true if "
                "you trust the file"
            )
        raise MergeError(
            f"{role} {uri}: pickle inputs cannot be streamed; convert it to .safetensors first"
        )
    store = open_store(uri, config)
    try:
        header = read_header(store, uri)
    except SafetensorsError as exc:
        raise MergeError(f"{role}: {exc}") from None
    return MergeInput(role, uri, store, header, describe(header))


def _mismatch(a: MergeInput, b: MergeInput, keys: list[str]) -> MergeError:
    details = []
    for key in keys[:5]:
        sa = a.header.tensors.get(key)
        sb = b.header.tensors.get(key)
        details.append(
            f"  {key}: {list(sa.shape) if sa else 'missing'} in {a.role}, "
            f"{list(sb.shape) if sb else 'missing'} in {b.role}"
        )
    more = f"\n  ... and {len(keys) - 5} more" if len(keys) > 5 else ""
    return MergeError(
        f"{a.role} ({a.info.label()}) and {b.role} ({b.info.label()}) cannot be merged: "
        f"{len(keys)} tensors differ in shape:\n" + "\n".join(details) + more
    )


def check_compatible(inputs: list[MergeInput], components: Set[str]) -> None:
    """Refuse inputs whose architectures or shapes differ in the merged components."""
    first = inputs[0]
    for other in inputs[1:]:
        if other.info.layout != first.info.layout:
            raise MergeError(
                f"{first.role} is {first.info.label()} but {other.role} is {other.info.label()}: "
                "key layouts differ; convert both to the same layout first"
            )
        if (
            other.info.family != first.info.family
            or other.info.in_channels != first.info.in_channels
        ):
            raise MergeError(
                f"{first.role} is {first.info.label()} but {other.role} is {other.info.label()}: "
                "different architectures cannot be merged"
            )
        shared = set(first.header.tensors) & set(other.header.tensors)
        differing = sorted(
            k
            for k in shared
            if component_of(k, first.info.layout) in components
            and first.header.tensors[k].shape != other.header.tensors[k].shape
        )
        if differing:
            raise _mismatch(first, other, differing)


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


class _Plan:
    """Resolved inputs, weights and the output layout of one merge."""

    def __init__(self, spec: ModelMergeSpec, config: StoreConfig | None) -> None:
        self.spec = spec
        ap = spec.allow_pickle
        self.models = [_open(f"models[{i}]", m.uri, config, ap) for i, m in enumerate(spec.models)]
        for i, m in enumerate(spec.models):
            self.models[i].weight = m.weight
        self.base = _open("base", spec.base.uri, config, ap) if spec.base else None
        self.vae = _open("vaeUri", spec.vae_uri, config, ap) if spec.vae_uri else None
        self.all = [
            *self.models,
            *([self.base] if self.base else []),
            *([self.vae] if self.vae else []),
        ]
        self.components: set[str] = set(spec.components)
        if spec.vae_source != "merge":
            self.components.discard("vae")


def plan_checkpoint_merge(spec: ModelMergeSpec, config: StoreConfig | None) -> _Plan:
    """Open the inputs and check everything that headers can tell."""
    plan = _Plan(spec, config)
    for inp in plan.models + ([plan.base] if plan.base else []):
        if inp.info.layout.startswith("lora"):
            raise MergeError(
                f"{inp.role} {inp.uri} is a LoRA ({inp.info.layout}); method {spec.method} merges "
                "checkpoints: use lora_into_checkpoint or lora_merge"
            )
    check_compatible(plan.models + ([plan.base] if plan.base else []), plan.components)
    if spec.vae_source == "base" and plan.base is None:
        raise MergeError("vaeSource: base needs a base model (base.uri)")
    return plan


def _weights(spec: ModelMergeSpec, inputs: list[MergeInput]) -> list[float]:
    given = [i.weight for i in inputs]
    if all(w is None for w in given):
        if spec.method == "ties":
            return [1.0] * len(inputs)
        return [1.0 / len(inputs)] * len(inputs)
    if any(w is None for w in given):
        raise MergeError("give a weight to every model, or to none (equal weights)")
    return [float(w) for w in given if w is not None]


ProgressFn = Callable[[int, int], None]


def merge(
    spec: ModelMergeSpec,
    config: StoreConfig | None = None,
    progress: ProgressFn | None = None,
    work_dir: Path | None = None,
) -> MergeResult:
    """Run one ModelMerge spec end to end and commit the output."""
    started = time.monotonic()
    torch.set_grad_enabled(False)
    if spec.method in CHECKPOINT_METHODS:
        plan = plan_checkpoint_merge(spec, config)
        layout_source = plan.models[0]
        evaluator: _Evaluator = _CheckpointEvaluator(plan)
    elif spec.method == "lora_into_checkpoint":
        plan = _Plan(spec, config)
        evaluator = _LoraIntoCheckpoint(plan)
        layout_source = plan.models[0]
    else:
        plan = _Plan(spec, config)
        evaluator = _LoraMerge(plan)
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
    scratch = work_dir or scratch_dir("difftrain-merge-")
    out_path = (
        Path(spec.output.uri).with_name(f".{Path(spec.output.uri).name}.part")
        if not is_s3(spec.output.uri) and work_dir is None
        else scratch / "output.safetensors"
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
        raise
    digest = writer.close() or sha256_file(out_path)
    size = out_path.stat().st_size
    if is_s3(spec.output.uri) or work_dir is not None:
        commit_file(out_store, spec.output.uri, out_path, digest, {"recipe": recipe})
        out_path.unlink(missing_ok=True)
    else:
        # local output: the finished file is renamed into place, then its manifest is written
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


class _Evaluator:
    """Computes each output tensor from the inputs' readers."""

    partial_keys: list[str]

    def layout(self, source: MergeInput, out_dtype: str) -> list[OutputTensor]:
        raise NotImplementedError

    def tensor(self, name: str, readers: dict[int, TensorReader]) -> torch.Tensor:
        raise NotImplementedError

    def extra_metadata(self) -> dict[str, str]:
        return {}


def _output_dtype(dtype: str, out_dtype: str, is_float: bool) -> str:
    return out_dtype if is_float else dtype


class _CheckpointEvaluator(_Evaluator):
    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.weights = _weights(self.spec, plan.models)
        self.out_dtype = DTYPES[OUTPUT_DTYPES[self.spec.output_dtype]]
        self.partial_keys = []
        first = plan.models[0]
        self.layout_name = first.info.layout
        self.unet: UNetLayout | None = None
        if self.spec.method == "block_weighted":
            self.unet = unet_layout(set(first.header.tensors), first.info.layout)
            assert self.spec.block_weights is not None
            if len(self.spec.block_weights) != self.unet.blocks:
                names = self.unet.block_names()
                raise MergeError(
                    f"blockWeights has {len(self.spec.block_weights)} ratios but this UNet has "
                    f"{self.unet.blocks} blocks ({names[0]}..{names[-1]})"
                )
        if self.spec.method in {"add_difference", "ties", "dare"}:
            assert plan.base is not None

    def _vae_input(self) -> MergeInput | None:
        source = self.spec.vae_source
        if source == "base":
            return self.plan.base
        if source == "uri":
            return self.plan.vae
        return None

    def layout(self, source: MergeInput, out_dtype: str) -> list[OutputTensor]:
        out = []
        names = list(source.header.tensors)
        seen = set(names)
        for inp in self.plan.models[1:]:
            for k in inp.header.tensors:
                if k not in seen:
                    names.append(k)
                    seen.add(k)
        for name in sorted(
            names,
            key=lambda k: source.header.tensors[k].begin if k in source.header.tensors else 1 << 62,
        ):
            holder = next(i for i in self.plan.models if name in i.header.tensors)
            info = holder.header.tensors[name]
            if component_of(name, self.layout_name) == "vae" and (vae := self._vae_input()):
                if name not in vae.header.tensors:
                    raise MergeError(f"{vae.role} {vae.uri} has no VAE tensor {name!r}")
                info = vae.header.tensors[name]
            out.append(
                OutputTensor(name, _output_dtype(info.dtype, out_dtype, info.is_float), info.shape)
            )
            if any(name not in i.header.tensors for i in self.plan.models):
                self.partial_keys.append(name)
        return out

    def extra_metadata(self) -> dict[str, str]:
        if not self.partial_keys:
            return {}
        return {"difftrain.partial_keys": json.dumps(self.partial_keys[:50])}

    def tensor(self, name: str, readers: dict[int, TensorReader]) -> torch.Tensor:
        plan, spec = self.plan, self.spec
        component = component_of(name, self.layout_name)
        holders = [i for i in plan.models if name in i.header.tensors]
        first = holders[0]
        info = first.header.tensors[name]
        if component == "vae" and (vae := self._vae_input()):
            return readers[id(vae)].read(name)
        merged_here = (
            component in plan.components
            and info.is_float
            and len(holders) == len(plan.models)
            and (plan.base is None or name in plan.base.header.tensors)
        )
        if not merged_here:
            return readers[id(first)].read(name)
        raw = [readers[id(i)].read(name) for i in plan.models]
        method = spec.method
        two_by_alpha = len(raw) == 2 and all(i.weight is None for i in plan.models)
        if (
            method == "weighted_sum"
            and two_by_alpha
            and raw[0].dtype == raw[1].dtype == self.out_dtype
        ):
            # lerp computes in fp32 internally (opmath) and rounds once, without fp32 copies
            return torch.lerp(raw[0], raw[1], spec.alpha)
        xs = [x.float() for x in raw]
        base = readers[id(plan.base)].read(name).float() if plan.base else None
        if method == "weighted_sum":
            if two_by_alpha:
                return methods.weighted_sum(xs, [1 - spec.alpha, spec.alpha])
            return methods.weighted_sum(xs, self.weights)
        if method == "slerp":
            return methods.slerp(xs[0], xs[1], spec.alpha)
        if method == "add_difference":
            assert base is not None
            return methods.add_difference(xs[0], xs[1], base, spec.alpha)
        if method == "ties":
            assert base is not None
            return methods.ties(base, xs, self.weights, spec.density)
        if method == "dare":
            assert base is not None
            return methods.dare(base, xs, self.weights, spec.drop_rate, spec.seed, name)
        if method == "block_weighted":
            assert self.unet is not None and spec.block_weights is not None
            index = block_index(name, self.layout_name, self.unet) if component == "unet" else None
            ratio = spec.block_weights[index] if index is not None else spec.alpha
            return methods.weighted_sum(xs[:2], [1 - ratio, ratio])
        raise MergeError(f"unknown method {method}")


def _lora_alpha(reader: TensorReader, module: LoraModule) -> float | None:
    if module.alpha is None:
        return None
    return float(reader.read(module.alpha).float().item())


class _LoraIntoCheckpoint(_Evaluator):
    """Adds each LoRA's update ``strength · (alpha/rank) · up @ down`` to its target weight."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.partial_keys = []
        checkpoint, loras = plan.models[0], plan.models[1:]
        if checkpoint.info.layout.startswith("lora"):
            raise MergeError(f"models[0] {checkpoint.uri} must be the checkpoint, not a LoRA")
        index = TargetIndex(
            set(checkpoint.header.tensors), checkpoint.info.layout, checkpoint.info.family
        )
        self.updates: dict[str, list[tuple[MergeInput, LoraModule, float]]] = {}
        for lora in loras:
            if not lora.info.layout.startswith("lora"):
                raise MergeError(f"{lora.role} {lora.uri} is not a LoRA ({lora.info.label()})")
            try:
                mods = modules(set(lora.header.tensors), lora.info.layout)
            except LoraError as exc:
                raise MergeError(f"{lora.role} {lora.uri}: {exc}") from None
            unmatched = []
            for module in mods.values():
                target = index.target(module.name)
                if target is None:
                    unmatched.append(module.name)
                    continue
                down = lora.header.tensors[module.down].shape
                up = lora.header.tensors[module.up].shape
                want = checkpoint.header.tensors[target].shape
                numel = up[0] * _prod(down[1:])
                if up[0] != want[0] or numel != _prod(want):
                    raise MergeError(
                        f"{lora.role} module {module.name}: update of shape "
                        f"[{up[0]}, {_prod(down[1:])}] does not fit {target} {list(want)}; "
                        "the LoRA was trained for another architecture"
                    )
                strength = lora.weight if lora.weight is not None else 1.0
                self.updates.setdefault(target, []).append((lora, module, strength))
            if unmatched:
                raise MergeError(
                    f"{lora.role} {lora.uri}: {len(unmatched)} of {len(mods)} LoRA modules match "
                    f"no weight of models[0] ({checkpoint.info.label()}), e.g. "
                    f"{', '.join(unmatched[:3])}; the LoRA was made for another model or layout"
                )

    def layout(self, source: MergeInput, out_dtype: str) -> list[OutputTensor]:
        return [
            OutputTensor(i.name, _output_dtype(i.dtype, out_dtype, i.is_float), i.shape)
            for i in sorted(source.header.tensors.values(), key=lambda t: t.begin)
        ]

    def tensor(self, name: str, readers: dict[int, TensorReader]) -> torch.Tensor:
        checkpoint = self.plan.models[0]
        weight = readers[id(checkpoint)].read(name)
        if name not in self.updates:
            return weight
        # a copy: the reader's buffer may still be feeding the input's sha256
        out = weight.to(torch.float32, copy=True)
        for lora, module, strength in self.updates[name]:
            reader = readers[id(lora)]
            down = reader.read(module.down).float()
            up = reader.read(module.up).float()
            delta = methods.lora_delta(down, up, _lora_alpha(reader, module), out.shape)
            out.add_(delta, alpha=strength)
        return out


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _LoraMerge(_Evaluator):
    """Merges LoRAs into one LoRA: weighted sum, rank concatenation, or SVD re-extraction."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.partial_keys = []
        layouts = {i.info.layout for i in plan.models}
        if any(not lay.startswith("lora") for lay in layouts):
            bad = next(i for i in plan.models if not i.info.layout.startswith("lora"))
            raise MergeError(f"lora_merge takes LoRAs; {bad.role} {bad.uri} is {bad.info.label()}")
        if len(layouts) > 1:
            raise MergeError(
                "lora_merge inputs mix the kohya and diffusers/PEFT layouts; use one layout"
            )
        self.kind = layouts.pop()
        self.mods = [modules(set(i.header.tensors), self.kind) for i in plan.models]
        self.names = sorted(set().union(*self.mods))
        self.weights = [i.weight if i.weight is not None else 1.0 for i in plan.models]
        mode = self.spec.lora_merge_mode
        if mode == "svd" and not self.spec.lora_rank:
            raise MergeError("loraMergeMode: svd needs loraRank, the rank of the re-extracted LoRA")
        if mode == "sum":
            for name in self.names:
                shapes = {
                    inp.header.tensors[m[name].down].shape
                    for m, inp in zip(self.mods, plan.models, strict=True)
                    if name in m
                }
                if len(shapes) > 1:
                    raise MergeError(
                        f"loraMergeMode: sum needs equal ranks, but module {name} has down "
                        f"shapes {sorted(map(list, shapes))}; use concat or svd"
                    )
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def _suffixes(self) -> tuple[str, str]:
        return (
            (".lora_down.weight", ".lora_up.weight")
            if self.kind == "lora_kohya"
            else (".lora_A.weight", ".lora_B.weight")
        )

    def _module_shapes(self, name: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], str]:
        for mods, inp in zip(self.mods, self.plan.models, strict=True):
            if name in mods:
                down = inp.header.tensors[mods[name].down]
                up = inp.header.tensors[mods[name].up]
                return (rank, *down.shape[1:]), (up.shape[0], rank, *up.shape[2:]), down.dtype
        raise KeyError(name)

    def _rank(self, name: str) -> int:
        ranks = [
            inp.header.tensors[m[name].down].shape[0]
            for m, inp in zip(self.mods, self.plan.models, strict=True)
            if name in m
        ]
        mode = self.spec.lora_merge_mode
        if mode == "concat":
            return sum(ranks)
        if mode == "svd":
            assert self.spec.lora_rank is not None
            return self.spec.lora_rank
        return ranks[0]

    def layout(self, source: MergeInput, out_dtype: str) -> list[OutputTensor]:
        down_s, up_s = self._suffixes()
        out = []
        for name in self.names:
            rank = self._rank(name)
            down, up, _dtype = self._module_shapes(name, rank)
            out.append(OutputTensor(f"{name}.alpha", "F32", ()))
            out.append(OutputTensor(name + down_s, out_dtype, down))
            out.append(OutputTensor(name + up_s, out_dtype, up))
        return out

    def extra_metadata(self) -> dict[str, str]:
        return {"difftrain.lora_layout": self.kind}

    def _factors(
        self, name: str, readers: dict[int, TensorReader]
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        if name in self._cache:
            return self._cache[name]
        parts = []
        for mods, inp, w in zip(self.mods, self.plan.models, self.weights, strict=True):
            if name not in mods:
                continue
            reader = readers[id(inp)]
            module = mods[name]
            down = reader.read(module.down).float()
            up = reader.read(module.up).float()
            alpha = _lora_alpha(reader, module)
            scale = (alpha / down.shape[0]) if alpha is not None else 1.0
            parts.append((down, up, w * scale))
        mode = self.spec.lora_merge_mode
        if mode == "sum":
            # Σ wᵢ sᵢ upᵢ downᵢ is not a product of summed factors; summing factors is the
            # usual approximation when all LoRAs share rank and initialisation. The exact route is
            # svd; here the scale is folded into `up` and alpha set to the rank (scale 1).
            rank = parts[0][0].shape[0]
            down = sum((d for d, _u, _s in parts), torch.zeros_like(parts[0][0])) / len(parts)
            up = sum((u * s for _d, u, s in parts), torch.zeros_like(parts[0][1]))
            result = (down, up, float(rank))
        elif mode == "concat":
            down = torch.cat([d for d, _u, _s in parts], dim=0)
            up = torch.cat([u * s for _d, u, s in parts], dim=1)
            result = (down, up, float(down.shape[0]))
        else:
            delta = sum(
                ((u.reshape(u.shape[0], -1) @ d.reshape(d.shape[0], -1)) * s for d, u, s in parts),
                torch.zeros(parts[0][1].shape[0], _prod(tuple(parts[0][0].shape[1:]))),
            )
            assert self.spec.lora_rank is not None
            down2, up2 = methods.lora_svd(delta, self.spec.lora_rank)
            rank = down2.shape[0]
            target_down, target_up, _ = self._module_shapes(name, self.spec.lora_rank)
            down = torch.zeros(target_down)
            up = torch.zeros(target_up)
            down.reshape(self.spec.lora_rank, -1)[:rank] = down2
            up.reshape(up.shape[0], self.spec.lora_rank)[:, :rank] = up2
            result = (down, up, float(self.spec.lora_rank))
        self._cache = {name: result}
        return result

    def tensor(self, name: str, readers: dict[int, TensorReader]) -> torch.Tensor:
        down_s, up_s = self._suffixes()
        if name.endswith(".alpha"):
            return torch.tensor(self._factors(name[: -len(".alpha")], readers)[2])
        if name.endswith(down_s):
            return self._factors(name[: -len(down_s)], readers)[0]
        return self._factors(name[: -len(up_s)], readers)[1]
