"""How each output tensor is computed: checkpoint methods, LoRA into a checkpoint, LoRA with LoRA.

Each evaluator declares the output's layout up front (names, dtypes, shapes, from the inputs'
headers) and then computes one tensor at a time from the inputs' readers.
"""

from __future__ import annotations

import json

import torch

from difftrain.merge import methods
from difftrain.merge.arch import (
    UNetLayout,
    block_index,
    component_of,
    unet_layout,
)
from difftrain.merge.lora import LoraError, LoraModule, TargetIndex, modules
from difftrain.merge.plan import (
    OUTPUT_DTYPES,
    MergeError,
    MergeInput,
    MergePlan,
    default_weights,
)
from difftrain.merge.tensorio import (
    DTYPES,
    OutputTensor,
    TensorReader,
)


class Evaluator:
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


class CheckpointEvaluator(Evaluator):
    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.weights = default_weights(self.spec, plan.models)
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


class LoraIntoCheckpoint(Evaluator):
    """Adds each LoRA's update ``strength · (alpha/rank) · up @ down`` to its target weight."""

    def __init__(self, plan: MergePlan) -> None:
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


class LoraMerge(Evaluator):
    """Merges LoRAs into one LoRA: weighted sum, rank concatenation, or SVD re-extraction."""

    def __init__(self, plan: MergePlan) -> None:
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
