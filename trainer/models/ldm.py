"""State dicts between diffusers/transformers names and the LDM single-file layout, both ways.

The forward direction (diffusers -> LDM) is :mod:`difftrain.convert`, shared with the merge engine.
The inverse is not a second table: the target model's own keys are mapped forward and the LDM
tensors looked up under the names they map to, so the two directions cannot drift apart.

Text encoders: SD1 stores the transformers CLIP text model under ``cond_stage_model.transformer.``
(with the ``text_model.`` prefix that transformers 4 used); SD2 stores the OpenCLIP text tower under
``cond_stage_model.model.`` with fused attention projections. diffusers keeps SD2's first 23 of 24
OpenCLIP blocks (SD2 conditions on the penultimate layer), so an SD2 export holds the blocks the
model has; ``ln_final`` carries the final layer norm. What diffusers does not hold (OpenCLIP's
``text_projection``, the last block) is kept from a single-file base model by
:func:`open_clip_extras` and written back on export; without one, the projection is written as
the identity (SD2 conditions on hidden states and never uses it, but A1111's and ComfyUI's
OpenCLIP loaders expect the key).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from difftrain.convert import (
    TEXT_ENCODER_LDM_SD1,
    unet_key_to_ldm,
    unet_layout_from_diffusers,
    vae_key_to_ldm,
    vae_up_levels,
)
from difftrain.models.errors import ModelError

Tensors = dict[str, torch.Tensor]
OPEN_CLIP_LDM = "cond_stage_model.model."
V_PRED_KEY = "v_pred"


def _missing(what: str, keys: list[str]) -> ModelError:
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return ModelError(f"{what}: the checkpoint lacks {shown}; is it a complete SD1/SD2 file?")


# --------------------------------------------------------------------------------------------
# UNet and VAE
# --------------------------------------------------------------------------------------------


def unet_name_map(keys: Iterable[str]) -> dict[str, str]:
    """diffusers UNet key -> LDM key."""
    keys = list(keys)
    layout, attn_up = unet_layout_from_diffusers(set(keys))
    return {k: unet_key_to_ldm(k, layout, attn_up) for k in keys}


def unet_to_ldm(state: Mapping[str, torch.Tensor]) -> Tensors:
    names = unet_name_map(state)
    return {names[k]: v for k, v in state.items()}


def unet_from_ldm(ldm: Mapping[str, torch.Tensor], model_keys: Iterable[str]) -> Tensors:
    names = unet_name_map(model_keys)
    absent = [ldm_key for ldm_key in names.values() if ldm_key not in ldm]
    if absent:
        raise _missing("UNet", absent)
    return {k: ldm[ldm_key] for k, ldm_key in names.items()}


def vae_name_map(keys: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """diffusers VAE key -> (LDM key, whether LDM stores it as a 1x1 convolution)."""
    keys = list(keys)
    levels = vae_up_levels(set(keys))
    return {k: vae_key_to_ldm(k, levels) for k in keys}


def vae_to_ldm(state: Mapping[str, torch.Tensor]) -> Tensors:
    out: Tensors = {}
    for key, (ldm_key, conv) in vae_name_map(state).items():
        value = state[key]
        out[ldm_key] = value[:, :, None, None] if conv and value.dim() == 2 else value
    return out


def vae_from_ldm(ldm: Mapping[str, torch.Tensor], model_keys: Iterable[str]) -> Tensors:
    names = vae_name_map(model_keys)
    absent = [ldm_key for ldm_key, _ in names.values() if ldm_key not in ldm]
    if absent:
        raise _missing("VAE", absent)
    out: Tensors = {}
    for key, (ldm_key, conv) in names.items():
        value = ldm[ldm_key]
        # older files store the attention projections as 1x1 convolutions, newer ones as linear
        out[key] = value[:, :, 0, 0] if conv and value.dim() == 4 else value
    return out


# --------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------


def _with_text_model(key: str) -> str:
    return key if key.startswith("text_model.") else "text_model." + key


def text_to_ldm(state: Mapping[str, torch.Tensor], family: str) -> Tensors:
    """A transformers CLIPTextModel state dict in the family's LDM layout."""
    if family == "sd1":
        return {
            TEXT_ENCODER_LDM_SD1 + _with_text_model(k): v
            for k, v in state.items()
            if not k.endswith("position_ids")
        }
    if family == "sd2":
        return _text_to_open_clip(state)
    raise ModelError(f"single-file export supports SD1 and SD2 models, not {family!r}")


def text_from_ldm(
    ldm: Mapping[str, torch.Tensor], family: str, model_keys: Iterable[str]
) -> Tensors:
    """The CLIPTextModel state dict (for ``model_keys``) from an LDM checkpoint."""
    keys = [k for k in model_keys if not k.endswith("position_ids")]
    if family == "sd2":
        converted = _text_from_open_clip(ldm)
    else:
        converted = {
            k[len(TEXT_ENCODER_LDM_SD1) :].removeprefix("text_model."): v
            for k, v in ldm.items()
            if k.startswith(TEXT_ENCODER_LDM_SD1)
        }
    absent = [k for k in keys if k.removeprefix("text_model.") not in converted]
    if absent:
        raise _missing("text encoder", absent)
    return {k: converted[k.removeprefix("text_model.")] for k in keys}


_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _text_to_open_clip(state: Mapping[str, torch.Tensor]) -> Tensors:
    plain = {k.removeprefix("text_model."): v for k, v in state.items()}
    p = OPEN_CLIP_LDM
    out: Tensors = {
        f"{p}token_embedding.weight": plain["embeddings.token_embedding.weight"],
        f"{p}positional_embedding": plain["embeddings.position_embedding.weight"],
        f"{p}ln_final.weight": plain["final_layer_norm.weight"],
        f"{p}ln_final.bias": plain["final_layer_norm.bias"],
    }
    layers = {int(m.group(1)) for k in plain if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for ours, theirs in _OPEN_CLIP_LAYER.items():
            for param in ("weight", "bias"):
                out[f"{dst}{ours}.{param}"] = plain[f"{src}{theirs}.{param}"]
        for param, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out[f"{dst}attn.{name}"] = torch.cat(
                [plain[f"{src}self_attn.{q}_proj.{param}"] for q in ("q", "k", "v")]
            )
    return out


def _text_from_open_clip(ldm: Mapping[str, torch.Tensor]) -> Tensors:
    p = OPEN_CLIP_LDM
    out: Tensors = {}
    renames = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
    }
    for theirs, ours in renames.items():
        if p + theirs in ldm:
            out[ours] = ldm[p + theirs]
    for key, value in ldm.items():
        m = re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            i, module, param = m.groups()
            dst = f"encoder.layers.{i}."
            if module in _OPEN_CLIP_LAYER:
                out[f"{dst}{_OPEN_CLIP_LAYER[module]}.{param}"] = value
        m = re.match(
            re.escape(p) + r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key
        )
        if m:
            i, param = m.groups()
            for name, part in zip(("q", "k", "v"), value.chunk(3), strict=True):
                out[f"encoder.layers.{i}.self_attn.{name}_proj.{param}"] = part
    return out


def open_clip_extras(ldm: Mapping[str, torch.Tensor], layers: int) -> Tensors:
    """The SD2 text tower's tensors beyond the ``layers`` blocks a CLIPTextModel holds."""
    p = OPEN_CLIP_LDM
    extras: Tensors = {}
    for key, value in ldm.items():
        if not key.startswith(p):
            continue
        m = re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", key)
        if (m and int(m.group(1)) >= layers) or key[len(p) :] in ("text_projection", "logit_scale"):
            extras[key] = value
    return extras


def with_open_clip_extras(tensors: Tensors, extras: Mapping[str, torch.Tensor]) -> Tensors:
    """An SD2 export's text tower completed: the base's extras, else an identity projection."""
    out = {**tensors, **{k: v for k, v in extras.items() if k not in tensors}}
    projection = OPEN_CLIP_LDM + "text_projection"
    if projection not in out:
        width = out[OPEN_CLIP_LDM + "ln_final.weight"].shape[0]
        out[projection] = torch.eye(width, dtype=out[OPEN_CLIP_LDM + "ln_final.weight"].dtype)
    return out


def ldm_family(keys: Iterable[str]) -> str:
    """'sd1', 'sd2', 'sdxl' from an LDM checkpoint's text-encoder keys (or 'unknown')."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys) or (
        "model.diffusion_model.label_emb.0.0.weight" in keys
    ):
        return "sdxl"
    if any(k.startswith(OPEN_CLIP_LDM) for k in keys):
        return "sd2"
    if any(k.startswith(TEXT_ENCODER_LDM_SD1) for k in keys):
        return "sd1"
    return "unknown"
