"""LoRA files: their modules, and which checkpoint weight each module updates.

Two layouts are read: kohya/A1111 (``lora_unet_…``/``lora_te…`` with ``.lora_down.weight``,
``.lora_up.weight`` and ``.alpha``) and diffusers/PEFT (``unet.….lora_A.weight`` and
``.lora_B.weight``, or the older ``.lora.down.weight``/``.lora.up.weight``). kohya names are module
paths with dots replaced by underscores; they are matched against the checkpoint's own keys
flattened the same way, so no name has to be guessed. SD1/SD2 kohya files name the diffusers UNet
modules; for a checkpoint in the LDM layout their block prefix is translated first. SDXL kohya
files name the LDM/SGM UNet modules (``lora_unet_input_blocks_4_1_…``); for a checkpoint in the
diffusers layout each UNet weight is also indexed under its LDM name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from difftrain.convert import unet_layout_from_diffusers
from difftrain.merge.arch import (
    UNET_LDM,
    UNetLayout,
    component_of,
    diffusers_unet_module_to_ldm,
    unet_layout,
)


class LoraError(ValueError):
    """A LoRA that cannot be applied to or merged with the given model."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: the keys of its factors and of its alpha, if stored."""

    name: str
    down: str
    up: str
    alpha: str | None


def modules(keys: set[str], layout: str) -> dict[str, LoraModule]:
    """The modules of a LoRA file, by module name."""
    found: dict[str, LoraModule] = {}
    if layout == "lora_kohya":
        suffixes = (".lora_down.weight", ".lora_up.weight")
    else:
        suffixes = (".lora_A.weight", ".lora_B.weight")
    for key in sorted(keys):
        for down_suffix, up_suffix in (suffixes, (".lora.down.weight", ".lora.up.weight")):
            if key.endswith(down_suffix):
                name = key[: -len(down_suffix)]
                up = name + up_suffix
                if up not in keys:
                    raise LoraError(f"LoRA module {name!r} has {key!r} but no {up!r}")
                alpha = next((a for a in (f"{name}.alpha",) if a in keys), None)
                found[name] = LoraModule(name, key, up, alpha)
    if not found:
        raise LoraError("no LoRA modules found (expected lora_down/lora_up or lora_A/lora_B keys)")
    return found


def _flat(path: str) -> str:
    return path.replace(".", "_")


_TE_LDM_PREFIXES = {
    # kohya prefix, PEFT prefix, LDM prefix of the CLIP text model (transformers names inside)
    "sd1": [("lora_te_", "text_encoder.", "cond_stage_model.transformer.")],
    "sdxl": [("lora_te1_", "text_encoder.", "conditioner.embedders.0.transformer.")],
}


_TE_DIFFUSERS_PREFIXES = [
    # component prefix of a text encoder's keys, kohya prefixes of its modules (SD1/SD2, SDXL)
    ("text_encoder.", ("lora_te_", "lora_te1_")),
    ("text_encoder_2.", ("lora_te2_",)),
]


class TargetIndex:
    """Finds the checkpoint weight key that a LoRA module updates."""

    def __init__(self, checkpoint_keys: set[str], layout: str, family: str) -> None:
        self.keys = checkpoint_keys
        self.layout = layout
        self.family = family
        self.flat: dict[str, str] = {}
        weights = [k for k in checkpoint_keys if k.endswith(".weight")]
        if layout == "ldm":
            for key in weights:
                path = key[: -len(".weight")]
                if key.startswith(UNET_LDM):
                    self.flat["lora_unet_" + _flat(path[len(UNET_LDM) :])] = key
                for kohya, _peft, prefix in _TE_LDM_PREFIXES.get(family, []):
                    if key.startswith(prefix):
                        self.flat[kohya + _flat(path[len(prefix) :])] = key
            self.unet: UNetLayout | None = unet_layout(checkpoint_keys, "ldm")
            per = self.unet.layers + 1
            self.attn_up = {
                i
                for i in range(self.unet.levels)
                if any(k.startswith(f"{UNET_LDM}output_blocks.{i * per}.1.") for k in weights)
            }
        else:
            for key in weights:
                path = key[: -len(".weight")]
                stripped = path.removeprefix("unet.")
                self.flat["lora_unet_" + _flat(stripped)] = key
                for component, kohyas in _TE_DIFFUSERS_PREFIXES:
                    if path.startswith(component):
                        inner = path[len(component) :]
                        # kohya names carry transformers 4's text_model.; transformers 5 saves
                        # CLIPTextModel without it
                        full = "text_model." + inner.removeprefix("text_model.")
                        for kohya in kohyas:
                            self.flat[kohya + _flat(inner)] = key
                            self.flat[kohya + _flat(full)] = key
            self._index_ldm_unet_names(weights)
            self.unet = None
            self.attn_up = set()

    def _index_ldm_unet_names(self, weights: list[str]) -> None:
        """Index the diffusers UNet's weights under their LDM names too (SDXL kohya files)."""
        unet = {
            k: k.removeprefix("unet.") for k in weights if component_of(k, "diffusers") == "unet"
        }
        if not any(k.startswith("down_blocks.0.resnets.") for k in unet.values()):
            return  # no SD-style UNet among the keys (a text encoder alone)
        layout, attn_up = unet_layout_from_diffusers(set(unet.values()))
        for key, stripped in unet.items():
            ldm = diffusers_unet_module_to_ldm(stripped[: -len(".weight")], layout, attn_up)
            if ldm is not None:
                self.flat.setdefault("lora_unet_" + _flat(ldm), key)

    def target(self, module: str) -> str | None:
        """The weight key for a LoRA module name (kohya or PEFT), or None."""
        if module.startswith("lora_"):
            if module in self.flat:
                return self.flat[module]
            if self.layout == "ldm" and module.startswith("lora_unet_") and self.unet:
                ldm = _kohya_diffusers_unet_to_ldm(
                    module[len("lora_unet_") :], self.unet, self.attn_up
                )
                if ldm is not None:
                    return self.flat.get("lora_unet_" + _flat(ldm))
            return None
        # PEFT / diffusers names are dotted module paths
        if module.startswith("unet."):
            path = module[len("unet.") :]
            if self.layout == "ldm":
                if not self.unet:
                    return None
                ldm = diffusers_unet_module_to_ldm(path, self.unet, self.attn_up)
                return f"{UNET_LDM}{ldm}.weight" if ldm else None
            for candidate in (f"{path}.weight", f"unet.{path}.weight"):
                if candidate in self.keys:
                    return candidate
            return None
        if module.startswith("text_encoder."):
            if self.layout == "ldm":
                for _kohya, peft, prefix in _TE_LDM_PREFIXES.get(self.family, []):
                    if module.startswith(peft):
                        key = prefix + module[len(peft) :] + ".weight"
                        return key if key in self.keys else None
                return None
            key = module + ".weight"
            return key if key in self.keys else None
        return None


_KOHYA_BLOCK = re.compile(
    r"(down_blocks|up_blocks)_(\d+)_(attentions|resnets)_(\d+)_(.+)$"
    r"|(down_blocks|up_blocks)_(\d+)_(downsamplers|upsamplers)_0_conv$"
    r"|mid_block_(attentions|resnets)_(\d+)_(.+)$"
)
_RESNET_PARTS = ("conv_shortcut", "time_emb_proj", "conv1", "conv2", "norm1", "norm2")


def _kohya_diffusers_unet_to_ldm(flat: str, unet: UNetLayout, attn_up: set[int]) -> str | None:
    """Dotted LDM path for a kohya UNet module named after the diffusers module (SD1/SD2 files)."""
    m = _KOHYA_BLOCK.match(flat)
    if not m:
        for top in (
            "conv_in",
            "conv_out",
            "conv_norm_out",
            "time_embedding_linear_1",
            "time_embedding_linear_2",
        ):
            if flat == top:
                dotted = top.replace("time_embedding_", "time_embedding.")
                return diffusers_unet_module_to_ldm(dotted, unet, attn_up)
        return None
    if m.group(1):
        kind, rest = m.group(3), m.group(5)
        if kind == "resnets":
            part = next((p for p in _RESNET_PARTS if rest == p), None)
            if part is None:
                return None
            rest = part
        dotted = f"{m.group(1)}.{m.group(2)}.{kind}.{m.group(4)}.{rest}"
    elif m.group(6):
        dotted = f"{m.group(6)}.{m.group(7)}.{m.group(8)}.0.conv"
    else:
        kind, rest = m.group(9), m.group(11)
        if kind == "resnets" and rest not in _RESNET_PARTS:
            return None
        dotted = f"mid_block.{kind}.{m.group(10)}.{rest}"
    ldm = diffusers_unet_module_to_ldm(dotted, unet, attn_up)
    # inside attentions the remainder is still flat; LDM and diffusers share those names
    return ldm
