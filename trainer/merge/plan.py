"""The inputs of a merge: opened, described and checked before anything is written."""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

from difftrain.api import ModelMergeSpec
from difftrain.merge.arch import (
    ModelInfo,
    component_of,
    describe,
)
from difftrain.merge.tensorio import (
    Header,
    SafetensorsError,
    read_header,
)
from difftrain.storage import (
    Store,
    StoreConfig,
    open_store,
)

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


def open_input(role: str, uri: str, config: StoreConfig | None, allow_pickle: bool) -> MergeInput:
    """Open one input and read its header; refuse pickles, folders and non-safetensors files."""
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
    if not store.exists(uri):
        if any(True for _ in store.list(uri.rstrip("/") + "/")):
            raise MergeError(
                f"{role} {uri} is a folder (a diffusers model?); merges read single-file "
                ".safetensors checkpoints: export or convert it to one file first"
            )
        raise MergeError(f"{role} {uri} does not exist")
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
        predictions = {first.info.prediction, other.info.prediction} - {"unknown"}
        if len(predictions) > 1:
            raise MergeError(
                f"{first.role} is {first.info.label()} but {other.role} is {other.info.label()}: "
                "epsilon and v-prediction models predict different targets and cannot be merged"
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


class MergePlan:
    """The opened inputs of one merge and the components it merges."""

    def __init__(self, spec: ModelMergeSpec, config: StoreConfig | None) -> None:
        self.spec = spec
        ap = spec.allow_pickle
        self.models = [
            open_input(f"models[{i}]", m.uri, config, ap) for i, m in enumerate(spec.models)
        ]
        for i, m in enumerate(spec.models):
            self.models[i].weight = m.weight
        self.base = open_input("base", spec.base.uri, config, ap) if spec.base else None
        self.vae = open_input("vaeUri", spec.vae_uri, config, ap) if spec.vae_uri else None
        self.all = [
            *self.models,
            *([self.base] if self.base else []),
            *([self.vae] if self.vae else []),
        ]
        self.components: set[str] = set(spec.components)
        if spec.vae_source != "merge":
            self.components.discard("vae")


def plan_checkpoint_merge(spec: ModelMergeSpec, config: StoreConfig | None) -> MergePlan:
    """Open the inputs and check everything that headers can tell."""
    plan = MergePlan(spec, config)
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


def default_weights(spec: ModelMergeSpec, inputs: list[MergeInput]) -> list[float]:
    """The weights of the inputs, with the method's default when none are given."""
    given = [i.weight for i in inputs]
    if all(w is None for w in given):
        if spec.method == "ties":
            return [1.0] * len(inputs)
        return [1.0 / len(inputs)] * len(inputs)
    if any(w is None for w in given):
        raise MergeError("give a weight to every model, or to none (equal weights)")
    return [float(w) for w in given if w is not None]
