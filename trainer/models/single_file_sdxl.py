"""Loading an SDXL single file in the SGM layout (what A1111, ComfyUI and Forge use) for training.

The networks' configs come from the file's metadata when it records them (files this package
exports do), else from the tensor shapes (:mod:`difftrain.models.ldm_configs`, SDXL base's
schedule and VAE scale); the tensors go through :func:`difftrain.models.sgm.sgm_to_sdxl`. The
inpainting UNet and the refiner are refused before anything is built. The first tokenizer is found
as for SD1/SD2 (``baseModel.tokenizerUri``, the header, a ``tokenizer/`` folder beside the file);
the second is the header's, a ``tokenizer_2/`` folder beside the first, or else the first with
SDXL's padding token ``!`` (SDXL's two tokenizers share CLIP's vocabulary and differ only there).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from difftrain.api.training import BaseModelSpec
from difftrain.models.components import Components
from difftrain.models.errors import ModelError
from difftrain.models.fetch import write_atomic
from difftrain.models.ldm import V_PRED_KEY
from difftrain.models.ldm_configs import (
    SDXL_SCHEDULER_CONFIG,
    SDXL_VAE_SCALING,
    sdxl_text_configs,
    unet_config,
    vae_config,
)
from difftrain.models.sdxl_refusals import refuse_unsupported_sdxl
from difftrain.storage import Store, sha256_file

logger = logging.getLogger(__name__)

TOKENIZER_2_KEY = "difftrain.tokenizer_2."
SDXL_PAD_TOKEN = "!"


def load_sdxl_single_file(
    uri: str,
    spec: BaseModelSpec,
    store: Store,
    *,
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    work_dir: Path,
    dtype: torch.dtype,
) -> Components:
    """Build SDXL's networks from an SGM-layout file's ``tensors`` (already read from ``path``)."""
    from difftrain.models.loading import training_scheduler
    from difftrain.models.sgm import sgm_to_sdxl
    from difftrain.models.single_file import _meta_config, _tokenizer

    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    refuse_unsupported_sdxl(uri, shapes)
    try:
        text_cfgs = None
        recorded = _meta_config(metadata, "text_encoder") and _meta_config(
            metadata, "text_encoder_2"
        )
        if not recorded:
            text_cfgs = sdxl_text_configs(shapes)
        text_cfg = _meta_config(metadata, "text_encoder") or (text_cfgs or ({}, {}))[0]
        text_2_cfg = _meta_config(metadata, "text_encoder_2") or (text_cfgs or ({}, {}))[1]
        unet_cfg = _meta_config(metadata, "unet") or unet_config(shapes, "sdxl")
        vae_cfg = _meta_config(metadata, "vae") or {
            **vae_config(shapes),
            "scaling_factor": SDXL_VAE_SCALING,
            "force_upcast": True,  # SDXL's VAE overflows in fp16
        }
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_cfg)
            vae = AutoencoderKL.from_config(vae_cfg)
        # the text encoders on the CPU: their position ids are a buffer no file holds
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2_cfg))
        states = sgm_to_sdxl(
            tensors,
            unet_keys=unet.state_dict().keys(),
            vae_keys=vae.state_dict().keys(),
            text_keys=text_encoder.state_dict().keys(),
            text_2_keys=text_encoder_2.state_dict().keys(),
        )
        unet.load_state_dict(_cast(states.unet, dtype), assign=True)
        vae.load_state_dict(_cast(states.vae, dtype), assign=True)
        texts = ((text_encoder, states.text_encoder), (text_encoder_2, states.text_encoder_2))
        for module, state in texts:
            missing, _ = module.load_state_dict(_cast(state, dtype), strict=False)
            absent = [k for k in missing if not k.endswith("position_ids")]
            if absent:
                raise ModelError(f"the text encoder lacks {sorted(absent)[:3]}")
            module.to(dtype)
    except ModelError as exc:
        raise ModelError(f"baseModel.uri {uri}: {exc}") from exc
    except (RuntimeError, ValueError) as exc:  # shape mismatches from load_state_dict
        raise ModelError(
            f"baseModel.uri {uri}: its tensors do not fit an SDXL model: {exc}"
        ) from exc
    prediction_type = _prediction_type(spec, set(tensors), metadata)
    scheduler_config = {
        **(_meta_config(metadata, "scheduler") or SDXL_SCHEDULER_CONFIG),
        "prediction_type": prediction_type,
    }
    tokenizer = _tokenizer(uri, spec, metadata, store, work_dir / "tokenizer")
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=training_scheduler(scheduler_config, prediction_type),
        scheduler_config=scheduler_config,
        prediction_type=prediction_type,
        family="sdxl",
        identity=sha256_file(path),  # the file's own sha256, which anyone can check
        source=uri,
        text_encoder_2=text_encoder_2,
        tokenizer_2=_tokenizer_2(uri, spec, metadata, store, tokenizer, work_dir / "tokenizer_2"),
    )
    logger.info(
        "single-file base model loaded",
        extra={"source": uri, "family": "sdxl", "prediction_type": prediction_type},
    )
    return components


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _prediction_type(spec: BaseModelSpec, keys: set[str], metadata: dict[str, str]) -> str:
    if spec.prediction_type != "auto":
        return spec.prediction_type
    recorded = metadata.get("modelspec.prediction_type", "")
    if V_PRED_KEY in keys or recorded.startswith("v"):
        return "v_prediction"
    return "epsilon"  # SDXL base and its fine-tunes


def _tokenizer_2(
    uri: str,
    spec: BaseModelSpec,
    metadata: dict[str, str],
    store: Store,
    first: CLIPTokenizer,
    dest: Path,
) -> CLIPTokenizer:
    from difftrain.models.single_file import _tokenizer_from

    embedded = {
        k[len(TOKENIZER_2_KEY) :]: v for k, v in metadata.items() if k.startswith(TOKENIZER_2_KEY)
    }
    if embedded:
        for name, text in embedded.items():
            write_atomic(dest / Path(name).name, text.encode("utf-8"))
        found: CLIPTokenizer = CLIPTokenizer.from_pretrained(dest)
        return found
    beside = spec.tokenizer_uri.rstrip("/") if spec.tokenizer_uri else uri
    sibling = beside.rsplit("/", 1)[0] + "/tokenizer_2" if "/" in beside else "tokenizer_2"
    try:
        named = _tokenizer_from(sibling, store, dest)
    except (OSError, ValueError):
        named = None
    if named is not None:
        return named
    derived: Any = copy.deepcopy(first)
    if SDXL_PAD_TOKEN in derived.get_vocab():
        derived.pad_token = SDXL_PAD_TOKEN
    logger.info(
        "SDXL tokenizer_2 derived from the first tokenizer (padding with %r): no %s/",
        derived.pad_token,
        sibling,
    )
    out: CLIPTokenizer = derived
    return out
