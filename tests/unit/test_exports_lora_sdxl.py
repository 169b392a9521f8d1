"""SDXL LoRA exports (UNet, text_encoder, text_encoder_2) load back in diffusers with the adapted
model's outputs; the kohya file names UNet modules by kohya's SDXL (LDM/SGM) block names, which
the merge engine resolves in the diffusers and the SGM single-file layouts."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file

from difftrain.api.methods import LoraSpec
from difftrain.merge.lora import TargetIndex
from difftrain.merge.lora import modules as lora_modules
from difftrain.models.exports import export_lora_kohya, export_lora_peft
from difftrain.models.ldm import unet_name_map
from difftrain.models.safetensors_meta import read_metadata
from difftrain.models.sgm import sdxl_to_sgm
from difftrain.models.tiny_sdxl import TEXT_2_PROJECTION, build_tiny_sdxl_pipeline_folder
from difftrain.train.methods import TEXT_ENCODER_LORA_TARGETS

METADATA = {"difftrain.recipe": json.dumps({"method": "lora"}), "difftrain.base_model_sha256": "cd"}
ATOL = 1e-5
PROMPTS = ["a red circle", "sks dog on a green background"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl_pipeline_folder(tmp_path_factory.mktemp("tiny_sdxl") / "model")


def kohya_prefix(key: str) -> str:
    """``lora_unet_``, ``lora_te1_``, ... of a kohya key."""
    first, second, _rest = key.split("_", 2)
    return f"{first}_{second}_"


def perturb_lora(module: torch.nn.Module, seed: int) -> None:
    """LoRA B factors start at zero; give them values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1


@pytest.fixture(scope="module")
def adapted(tiny_sdxl: Path) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline with adapters applied as train/methods.py applies them."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights="gaussian",
            target_modules=list(LoraSpec().target_modules),
        )
    )
    for text_encoder in (pipe.text_encoder, pipe.text_encoder_2):
        inject_adapter_in_model(
            LoraConfig(
                r=2,
                lora_alpha=3,
                init_lora_weights="gaussian",
                target_modules=TEXT_ENCODER_LORA_TARGETS,
            ),
            text_encoder,
        )
    for seed, module in enumerate((pipe.unet, pipe.text_encoder, pipe.text_encoder_2), start=1):
        perturb_lora(module, seed)
    return pipe


@pytest.fixture(scope="module")
def exported(
    adapted: StableDiffusionXLPipeline, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("sdxl_lora")
    encoders = [adapted.text_encoder, adapted.text_encoder_2]
    peft = export_lora_peft(
        adapted.unet,
        out / "peft" / "pytorch_lora_weights.safetensors",
        text_encoder=encoders,
        metadata=METADATA,
    )
    kohya = export_lora_kohya(
        adapted.unet,
        out / "kohya.safetensors",
        text_encoder=encoders,
        alpha=4.0,
        metadata=METADATA,
    )
    return {"peft": peft, "kohya": kohya}


def outputs(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """The UNet's and both text encoders' outputs on fixed inputs."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tokenizer, encoder in (
            ("text_encoder", pipe.tokenizer, pipe.text_encoder),
            ("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2),
        ):
            ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
            result = encoder(ids.input_ids, output_hidden_states=True)
            out[f"{name}.hidden"] = result.hidden_states[-2]
            out[f"{name}.last"] = result[0]
        out["text_encoder_2.pooled"] = result.text_embeds
        gen = torch.Generator().manual_seed(3)
        context_dim = pipe.unet.config.cross_attention_dim
        out["unet"] = pipe.unet(
            torch.randn(2, 4, 32, 32, generator=gen),
            torch.tensor([10, 700]),
            torch.randn(2, 77, context_dim, generator=gen),
            added_cond_kwargs={
                "text_embeds": torch.randn(2, TEXT_2_PROJECTION, generator=gen),
                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 64, 8, 0, 64, 64]]),
            },
        ).sample
    return out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def library_warnings() -> Iterator[list[str]]:
    """What diffusers, peft and transformers log as warnings or raise with ``warnings``."""
    # diffusers' and transformers' library loggers do not propagate, so caplog would not see them
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            yield handler.messages
        handler.messages.extend(str(w.message) for w in raised)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_sdxl_lora_loads_with_load_lora_weights_and_gives_the_adapted_outputs(
    tiny_sdxl: Path,
    adapted: StableDiffusionXLPipeline,
    exported: dict[str, Path],
    layout: str,
) -> None:
    path = exported[layout]
    meta = read_metadata(path)
    assert all(meta[k] == v for k, v in METADATA.items())
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    before = outputs(fresh)
    expected = outputs(adapted)
    for name in expected:
        assert (expected[name] - before[name]).abs().max() > 1e-3, f"the adapter of {name} matters"
    with library_warnings() as messages:
        if layout == "peft":
            fresh.load_lora_weights(str(path.parent))  # finds pytorch_lora_weights.safetensors
        else:
            fresh.load_lora_weights(str(path))
    about_keys = [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()]
    assert about_keys == []
    got = outputs(fresh)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=0, msg=name)


def test_sdxl_peft_file_has_the_three_components(exported: dict[str, Path]) -> None:
    keys = set(load_file(exported["peft"]))
    assert {k.split(".", 1)[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    config = json.loads(read_metadata(exported["peft"])["lora_adapter_metadata"])
    assert {k.split(".", 1)[0] for k in config} == {"unet", "text_encoder", "text_encoder_2"}


def test_sdxl_kohya_file_names_modules_as_kohya_does(exported: dict[str, Path]) -> None:
    tensors = load_file(exported["kohya"])
    prefixes = {kohya_prefix(k) for k in tensors}
    assert prefixes == {"lora_unet_", "lora_te1_", "lora_te2_"}
    names = {k.split(".", 1)[0] for k in tensors}
    for name in names:
        assert {k for k in tensors if k.split(".", 1)[0] == name} == {
            f"{name}.lora_down.weight",
            f"{name}.lora_up.weight",
            f"{name}.alpha",
        }
    # kohya's SDXL files name the UNet's LDM/SGM modules (SD1/SD2 files: the diffusers ones). The
    # tiny UNet (two levels, one resnet each, attention on level 1, two transformer blocks per
    # attention) has its attentions at input_blocks.3.1 (down_blocks.1.attentions.0),
    # middle_block.1 and output_blocks.0.1 / 1.1 (up_blocks.0.attentions.0 / 1).
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    assert unet_names == {
        f"lora_unet_{block}_transformer_blocks_{i}_{attn}_{proj}"
        for block in (
            "input_blocks_3_1",
            "middle_block_1",
            "output_blocks_0_1",
            "output_blocks_1_1",
        )
        for i in (0, 1)
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out_0")
    }
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0" in names
    assert "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_v" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {4.0}


def test_merge_engine_resolves_every_module_of_the_sdxl_kohya_file(
    tiny_sdxl: Path, exported: dict[str, Path]
) -> None:
    """Every key is a module's factor or alpha, and every module names a weight of the model."""
    keys = set(load_file(exported["kohya"]))
    found = lora_modules(keys, "lora_kohya")
    covered = {k for m in found.values() for k in (m.down, m.up, m.alpha) if k is not None}
    assert covered == keys
    assert all(m.alpha is not None for m in found.values())
    # the SDXL model in the diffusers layout: each component's keys under its folder's name
    checkpoint = {
        f"{component}.{key}"
        for component in ("unet", "text_encoder", "text_encoder_2")
        for weights in (tiny_sdxl / component).glob("*.safetensors")
        for key in load_file(weights)
    }
    index = TargetIndex(checkpoint, "diffusers", "sdxl")
    targets = {name: index.target(name) for name in found}
    assert [name for name, target in targets.items() if target is None] == []
    component = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    for name, target in targets.items():
        assert target is not None and target.startswith(component[kohya_prefix(name)] + "."), name
    assert (
        targets["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"]
        == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    )
    assert (
        targets["lora_unet_output_blocks_1_1_transformer_blocks_1_attn2_to_out_0"]
        == "unet.up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_out.0.weight"
    )


def component_states(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tiny SDXL folder's UNet, VAE and text encoders' state dicts."""
    return {
        component: {
            k: v
            for f in (folder / component).glob("*.safetensors")
            for k, v in load_file(f).items()
        }
        for component in ("unet", "vae", "text_encoder", "text_encoder_2")
    }


def test_merge_engine_resolves_the_sdxl_kohya_unet_modules_in_the_sgm_single_file(
    tiny_sdxl: Path, exported: dict[str, Path]
) -> None:
    """In the SGM layout every UNet module updates the weight it updates in the diffusers layout."""
    tensors = load_file(exported["kohya"])
    found = lora_modules(set(tensors), "lora_kohya")
    states = component_states(tiny_sdxl)
    sgm = sdxl_to_sgm(
        states["unet"], states["vae"], states["text_encoder"], states["text_encoder_2"]
    )
    in_sgm = TargetIndex(set(sgm), "ldm", "sdxl")
    diffusers_keys = {f"{c}.{k}" for c, state in states.items() for k in state}
    in_diffusers = TargetIndex(diffusers_keys, "diffusers", "sdxl")
    to_ldm = unet_name_map(states["unet"])
    unet_modules = [m for name, m in found.items() if name.startswith("lora_unet_")]
    assert len(unet_modules) == 64
    for m in unet_modules:
        target = in_sgm.target(m.name)
        diffusers_target = in_diffusers.target(m.name)
        assert target is not None and diffusers_target is not None, m.name
        assert target == to_ldm[diffusers_target.removeprefix("unet.")], m.name
        # the factors fit the weight: (out, rank) @ (rank, in)
        assert tuple(sgm[target].shape) == (tensors[m.up].shape[0], tensors[m.down].shape[1])
