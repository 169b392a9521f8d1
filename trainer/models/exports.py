"""Exports of a trained model in the layouts the ecosystem loads.

- ``export_diffusers``: a diffusers folder (``from_pretrained``), or a ControlNet folder;
- ``export_single_file``: one ``.safetensors`` in the LDM layout (A1111, ComfyUI, diffusers'
  ``from_single_file``); SD1 with the CLIP text model under ``cond_stage_model.transformer.``, SD2
  with OpenCLIP names under ``cond_stage_model.model.`` (see :mod:`difftrain.models.ldm`);
- ``export_lora_peft``: the diffusers/PEFT LoRA layout (``unet.<module>.lora_A.weight``) with the
  adapter config diffusers reads back (``lora_adapter_metadata``);
- ``export_lora_kohya``: the kohya/A1111 layout (``lora_unet_<module>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``); SDXL UNet modules under their LDM/SGM names, as kohya's
  sd-scripts writes them (``lora_unet_input_blocks_4_1_…``).

Both LoRA layouts take the family's text encoders: one module for SD1/SD2, or SDXL's two in
pipeline order (``text_encoder``, ``text_encoder_2``; kohya's ``lora_te1_``, ``lora_te2_``).

Every file carries the caller's metadata (the recipe, the base model's hash) in its safetensors
header. Networks with PEFT adapters are exported with the adapters merged into a copy, so a full
export of a LoRA run is the base model with the LoRA applied.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftrain.convert import unet_layout_from_diffusers
from difftrain.merge.arch import diffusers_unet_module_to_ldm
from difftrain.models.components import Components, file_sha256
from difftrain.models.errors import ModelError
from difftrain.models.ldm import (
    V_PRED_KEY,
    text_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
    with_open_clip_extras,
)
from difftrain.models.safetensors_meta import add_metadata, save_safetensors

logger = logging.getLogger(__name__)

__all__ = [
    "export_diffusers",
    "export_lora_kohya",
    "export_lora_peft",
    "export_single_file",
    "file_sha256",
]
# A tokenizer is embedded in a single file's header only when this small (tiny and test models):
# CLIP's full vocabulary would put ~2 MB of JSON in every header A1111 shows in its UI.
MAX_EMBEDDED_TOKENIZER = 256 << 10


def merged_copy(module: nn.Module) -> nn.Module:
    """``module`` itself when it has no PEFT adapters, else a copy with them merged in."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        return module
    merged = copy.deepcopy(module)
    for name, layer in list(merged.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in merged.__dict__:
            delattr(merged, attr)
    return merged


def _sampling_scheduler(components: Components) -> Any:
    import diffusers

    config = components.scheduler_config
    cls = getattr(diffusers, str(config.get("_class_name", "DDPMScheduler")), None)
    if cls is None or not hasattr(cls, "from_config"):
        cls = diffusers.DDPMScheduler
    return cls.from_config({**config, "prediction_type": components.prediction_type})


def export_diffusers(
    components: Components,
    out_dir: Path,
    *,
    unet: nn.Module | None = None,
    text_encoder: TextEncoders = None,
    controlnet: nn.Module | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a diffusers folder: the family's pipeline with the trained networks (adapters merged
    in), or the ControlNet alone. ``text_encoder``: one trained encoder or the family's list in
    its order (None where the base one is kept)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if controlnet is not None:
        controlnet.save_pretrained(out_dir, safe_serialization=True)  # type: ignore[operator]
    else:
        from difftrain.models.families import family

        pipe = family(components.family).pipeline(
            components,
            merged_copy(unet or components.unet),
            _sampling_scheduler(components),
            text_encoders=[merged_copy(te) for te in text_encoders_of(components, text_encoder)],
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
    if metadata:
        for path in sorted(out_dir.rglob("*.safetensors")):
            add_metadata(path, metadata)
    logger.info("diffusers folder exported", extra={"path": str(out_dir)})
    return out_dir


def text_encoders_of(components: Components, trained: TextEncoders) -> list[nn.Module]:
    """The family's text encoders in its order: ``trained`` ones where given, else the base's."""
    from difftrain.models.families import family

    base = family(components.family).encoders(components)
    given: list[nn.Module | None]
    if trained is None:
        given = [None] * len(base)
    elif isinstance(trained, nn.Module):
        given = [trained] + [None] * (len(base) - 1)
    else:
        given = list(trained)
    if len(given) != len(base):
        raise ValueError(f"{len(given)} text encoders given for a model with {len(base)}")
    return [g if g is not None else b for g, b in zip(given, base, strict=True)]


def _configs_metadata(
    components: Components, unet: nn.Module, texts: Sequence[nn.Module]
) -> dict[str, str]:
    def clean(config: Any) -> str:
        items = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        drop = {"_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"}
        return json.dumps({k: v for k, v in items.items() if k not in drop}, default=str)

    out = {
        "difftrain.config.unet": clean(unet.config),
        "difftrain.config.vae": clean(components.vae.config),
        **{
            f"difftrain.config.{name}": clean(text.config)
            for name, text in zip(("text_encoder", "text_encoder_2"), texts, strict=False)
        },
        "difftrain.config.scheduler": json.dumps(components.scheduler_config, default=str),
        "modelspec.prediction_type": components.prediction_type,
    }
    tokenizers = [("tokenizer", components.tokenizer), ("tokenizer_2", components.tokenizer_2)]
    for key, tokenizer in tokenizers:
        if tokenizer is None:
            continue
        with tempfile.TemporaryDirectory(prefix="difftrain-tokenizer-") as tmp:
            tokenizer.save_pretrained(tmp)
            files = {
                p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()
            }
        if sum(len(v) for v in files.values()) <= MAX_EMBEDDED_TOKENIZER:
            out.update({f"difftrain.{key}.{name}": text for name, text in files.items()})
    return out


def export_single_file(
    components: Components,
    path: Path,
    *,
    unet: nn.Module | None = None,
    text_encoder: TextEncoders = None,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the model as one .safetensors file: the LDM layout (SD1, SD2) or SGM's (SDXL), as
    A1111, ComfyUI and Forge load them."""
    unet_module = merged_copy(unet or components.unet)
    texts = [merged_copy(te) for te in text_encoders_of(components, text_encoder)]
    if components.family == "sdxl":
        from difftrain.models.sgm import sdxl_to_sgm

        tensors = sdxl_to_sgm(
            unet_module.state_dict(),
            components.vae.state_dict(),
            texts[0].state_dict(),
            texts[1].state_dict(),
        )
    else:
        text = text_to_ldm(texts[0].state_dict(), components.family)
        if components.family == "sd2":
            text = with_open_clip_extras(text, components.ldm_extras)
        tensors = {
            **unet_to_ldm(unet_module.state_dict()),
            **vae_to_ldm(components.vae.state_dict()),
            **text,
        }
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    if components.prediction_type == "v_prediction":
        # ComfyUI tells v-prediction checkpoints by this (empty) key
        tensors[V_PRED_KEY] = torch.tensor([])
    header = {**_configs_metadata(components, unet_module, texts), **metadata}
    save_safetensors(tensors, path, header)
    logger.info("single file exported", extra={"path": str(path), "tensors": len(tensors)})
    return path


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptedModule:
    """One LoRA-adapted module: its factors and their scale (delta = up @ down * scaling)."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    rank: int
    alpha: float
    scaling: float


def adapted_modules(model: nn.Module, what: str, *, prefix: str = "") -> list[AdaptedModule]:
    """The LoRA layers of ``model``, however they were added (diffusers, peft injection, PeftModel).

    Read from the layers rather than from a ``peft_config`` attribute, which only some ways of
    adding adapters set. ``prefix`` is put before module names that lack it.
    """
    from peft.tuners.lora import LoraLayer

    found: list[AdaptedModule] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) != 1:
            raise ModelError(f"{what}: module {name} has {len(active)} active adapters; export one")
        adapter = active[0]
        if layer.use_dora.get(adapter):
            raise ModelError(f"{what}: DoRA adapters cannot be exported as LoRA files")
        module = name.removeprefix("base_model.model.")
        if prefix and not module.startswith(prefix):
            module = prefix + module
        found.append(
            AdaptedModule(
                module=module,
                down=layer.lora_A[adapter].weight.detach().float().contiguous(),
                up=layer.lora_B[adapter].weight.detach().float().contiguous(),
                rank=int(layer.r[adapter]),
                alpha=float(layer.lora_alpha[adapter]),
                scaling=float(layer.scaling[adapter]),
            )
        )
    if not found:
        raise ModelError(f"{what} has no LoRA adapter to export")
    return found


def _adapter_config(modules: list[AdaptedModule]) -> dict[str, Any]:
    """A LoraConfig that rebuilds exactly these modules (diffusers reads it from the header)."""
    from collections import Counter

    from peft import LoraConfig

    rank = Counter(m.rank for m in modules).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules).most_common(1)[0][0]
    # rank-stabilised LoRA scales by alpha / sqrt(rank); tell it apart where the two differ
    rslora = any(m.rank > 1 and abs(m.scaling - m.alpha / m.rank**0.5) < 1e-9 for m in modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(m.module for m in modules),
        rank_pattern={m.module: m.rank for m in modules if m.rank != rank},
        alpha_pattern={m.module: m.alpha for m in modules if m.alpha != alpha},
        use_rslora=rslora,
        init_lora_weights=False,
    ).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


# (PEFT component, kohya prefix) of each text encoder, in pipeline order, by how many a family has
TEXT_ENCODER_LORA_NAMES: dict[int, list[tuple[str, str]]] = {
    1: [("text_encoder", "lora_te_")],
    2: [("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")],
}
TextEncoders = nn.Module | Sequence[nn.Module | None] | None


def _text_parts(text_encoder: TextEncoders) -> list[tuple[str, str, list[AdaptedModule]]]:
    """(PEFT component, kohya prefix, adapted modules) of each text encoder with adapters."""
    if text_encoder is None:
        return []
    encoders = [text_encoder] if isinstance(text_encoder, nn.Module) else list(text_encoder)
    names = TEXT_ENCODER_LORA_NAMES.get(len(encoders))
    if names is None:
        raise ModelError(f"{len(encoders)} text encoders given; a family has one or two")
    return [
        # with text_model. as transformers 4 named it; diffusers strips it for transformers 5
        (component, kohya, adapted_modules(module, component, prefix="text_model."))
        for (component, kohya), module in zip(names, encoders, strict=True)
        if module is not None
    ]


def export_lora_peft(
    unet_with_adapters: nn.Module,
    path: Path,
    *,
    text_encoder: TextEncoders = None,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the adapters in the diffusers/PEFT layout that ``load_lora_weights`` reads.

    ``text_encoder``: one module (SD1/SD2) or SDXL's two in order, None where one has no adapters.
    """
    parts = [("unet", adapted_modules(unet_with_adapters, "the UNet"))]
    parts += [(component, te) for component, _kohya, te in _text_parts(text_encoder)]
    tensors: dict[str, torch.Tensor] = {}
    adapter_meta: dict[str, Any] = {}
    for component, modules in parts:
        for m in modules:
            tensors[f"{component}.{m.module}.lora_A.weight"] = m.down.to(dtype)
            tensors[f"{component}.{m.module}.lora_B.weight"] = m.up.to(dtype)
        # target names without text_model.: PEFT matches them as suffixes, so they fit the text
        # model of transformers 4 (text_model.encoder...) and 5 (encoder...) alike
        config = _adapter_config(
            [replace(m, module=m.module.removeprefix("text_model.")) for m in modules]
        )
        adapter_meta.update({f"{component}.{k}": v for k, v in config.items()})
    header = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(adapter_meta, sort_keys=True, default=str),
        **metadata,
    }
    save_safetensors(tensors, path, header)
    return path


def _unet_keys(unet: nn.Module) -> set[str]:
    """The UNet's state-dict keys without a PeftModel's ``base_model.model.``."""
    return {k.removeprefix("base_model.model.") for k in unet.state_dict()}


def _is_sdxl_unet(unet: nn.Module) -> bool:
    """SDXL's UNet is the one with the pooled-text/size embedding (as merge.arch tells it)."""
    return "add_embedding.linear_1.weight" in _unet_keys(unet)


def _with_ldm_names(unet: nn.Module, modules: list[AdaptedModule]) -> list[AdaptedModule]:
    """The UNet's adapted modules renamed to their LDM module paths (kohya's SDXL names)."""
    layout, attn_up = unet_layout_from_diffusers(_unet_keys(unet))
    renamed = []
    for m in modules:
        ldm = diffusers_unet_module_to_ldm(m.module, layout, attn_up)
        if ldm is None:
            raise ModelError(f"the UNet: module {m.module} has no LDM name for a kohya SDXL file")
        renamed.append(replace(m, module=ldm))
    return renamed


def export_lora_kohya(
    unet_with_adapters: nn.Module,
    path: Path,
    *,
    text_encoder: TextEncoders = None,
    alpha: float,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the adapters in the kohya/A1111 layout: module paths with dots as underscores.

    Prefixes ``lora_unet_`` and ``lora_te_`` (SDXL: ``lora_te1_``, ``lora_te2_``); ``text_encoder``
    as for :func:`export_lora_peft`. SD1/SD2 UNet modules are named by their diffusers paths, SDXL
    UNet modules by their LDM/SGM paths (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), as
    kohya's own files for each family name them. Every module gets ``.alpha`` = ``alpha``; kohya
    scales by alpha / rank, so where the adapter was trained with another scaling the up factor is
    rescaled and the file's effect is exact.
    """
    unet_modules = adapted_modules(unet_with_adapters, "the UNet")
    if _is_sdxl_unet(unet_with_adapters):
        unet_modules = _with_ldm_names(unet_with_adapters, unet_modules)
    parts = [("lora_unet_", unet_modules)]
    parts += [(kohya, te) for _component, kohya, te in _text_parts(text_encoder)]
    tensors: dict[str, torch.Tensor] = {}
    for prefix, modules in parts:
        for m in modules:
            name = prefix + m.module.replace(".", "_")
            up = m.up * (m.scaling / (alpha / m.rank))
            tensors[f"{name}.lora_down.weight"] = m.down.to(dtype)
            tensors[f"{name}.lora_up.weight"] = up.to(dtype)
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    header = {"format": "pt", "ss_network_alpha": str(alpha), **metadata}
    save_safetensors(tensors, path, header)
    return path
