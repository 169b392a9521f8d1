"""The streaming merge engine on real files: results, provenance, refusals and LoRAs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from difftrain import api
from difftrain.merge.engine import MergeError, merge
from tests.sd_checkpoints import TINY_UNET, checkpoint_shapes, write_checkpoint


def spec(tmp_path: Path, models: list[Path], **extra) -> api.ModelMergeSpec:
    body = {
        "models": [{"uri": str(m)} for m in models],
        "output": {"uri": str(tmp_path / "out.safetensors")},
        **extra,
    }
    parsed = api.parse_spec("ModelMerge", body)
    assert isinstance(parsed, api.ModelMergeSpec)
    return parsed


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory) -> dict[str, Path]:
    """Three tiny SD1 checkpoints in the LDM layout (real key names, small shapes)."""
    root = tmp_path_factory.mktemp("ckpt")
    shapes = checkpoint_shapes("sd1", tiny=True)
    return {
        name: write_checkpoint(root / f"{name}.safetensors", shapes, seed)
        for seed, name in enumerate(["a", "b", "base"])
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weighted_sum_streams_the_same_result_as_in_memory_arithmetic(tmp_path, tiny_sd1):
    result = merge(
        spec(
            tmp_path,
            [tiny_sd1["a"], tiny_sd1["b"]],
            alpha=0.3,
            outputDtype="fp32",
            vaeSource="merge",
        )
    )
    a, b = load_file(tiny_sd1["a"]), load_file(tiny_sd1["b"])
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == set(a)
    for key, value in out.items():
        if a[key].is_floating_point():
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, 0.7 * a[key].float() + 0.3 * b[key].float())
        else:  # position_ids: integers are copied, never averaged
            assert torch.equal(value, a[key])
    assert result.tensors == len(a)


@pytest.mark.parametrize(("alpha", "which"), [(0.0, "a"), (1.0, "b")])
def test_weight_0_returns_a_and_1_returns_b(tmp_path, tiny_sd1, alpha, which):
    merge(spec(tmp_path, [tiny_sd1["a"], tiny_sd1["b"]], alpha=alpha, vaeSource="merge"))
    out, src = load_file(tmp_path / "out.safetensors"), load_file(tiny_sd1[which])
    for key in src:
        assert torch.equal(out[key], src[key]), key


def test_provenance_recipe_hashes_and_manifest(tmp_path, tiny_sd1):
    result = merge(spec(tmp_path, [tiny_sd1["a"], tiny_sd1["b"]], alpha=0.5, outputDtype="bf16"))
    path = tmp_path / "out.safetensors"
    assert result.sha256 == sha256(path)
    assert result.short_hash == result.sha256[:10]
    assert result.size_bytes == path.stat().st_size
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
        assert (
            fh.get_tensor(
                "model.diffusion_model.conv_in.weight"
                if False
                else "model.diffusion_model.input_blocks.0.0.weight"
            ).dtype
            == torch.bfloat16
        )
    recipe = json.loads(meta["difftrain.recipe"])
    assert recipe["method"] == "weighted_sum"
    assert recipe["parameters"] == {"alpha": 0.5}
    assert [i["sha256"] for i in recipe["inputs"]] == [sha256(tiny_sd1["a"]), sha256(tiny_sd1["b"])]
    assert recipe["inputs"][0]["architecture"] == "SD1.x (ldm)"
    manifest = json.loads((tmp_path / "out.safetensors.manifest.json").read_text())
    assert manifest["files"][0]["sha256"] == result.sha256


def test_vae_comes_from_the_first_model_by_default(tmp_path, tiny_sd1):
    merge(spec(tmp_path, [tiny_sd1["a"], tiny_sd1["b"]], alpha=0.5))
    out, a = load_file(tmp_path / "out.safetensors"), load_file(tiny_sd1["a"])
    vae_keys = [k for k in a if k.startswith("first_stage_model.")]
    assert vae_keys
    assert all(torch.equal(out[k], a[k]) for k in vae_keys)
    unet_key = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(out[unet_key], a[unet_key])


def test_components_limit_what_is_merged(tmp_path, tiny_sd1):
    merge(spec(tmp_path, [tiny_sd1["a"], tiny_sd1["b"]], components=["unet"]))
    out, a = load_file(tmp_path / "out.safetensors"), load_file(tiny_sd1["a"])
    te = [k for k in a if k.startswith("cond_stage_model.") and a[k].is_floating_point()]
    assert all(torch.equal(out[k], a[k]) for k in te)


def test_dare_through_the_engine_repeats_exactly(tmp_path, tiny_sd1):
    models = [tiny_sd1["a"], tiny_sd1["b"]]
    extra = {"method": "dare", "base": {"uri": str(tiny_sd1["base"])}, "dropRate": 0.5, "seed": 7}
    first = merge(spec(tmp_path, models, **extra)).sha256
    again = merge(spec(tmp_path, models, **extra)).sha256
    other = merge(spec(tmp_path, models, **{**extra, "seed": 8})).sha256
    assert first == again
    assert other != first


def test_partial_keys_are_copied_from_the_first_input_that_has_them(tmp_path, tiny_sd1):
    b = load_file(tiny_sd1["b"])
    b["model_ema.decay"] = torch.tensor(0.9999)
    save_file(b, tmp_path / "b_ema.safetensors")
    merge(spec(tmp_path, [tiny_sd1["a"], tmp_path / "b_ema.safetensors"]))
    with safe_open(tmp_path / "out.safetensors", "pt") as fh:
        assert fh.get_tensor("model_ema.decay").item() == pytest.approx(0.9999, rel=1e-3)
        assert "model_ema.decay" in json.loads(fh.metadata()["difftrain.partial_keys"])


def test_block_weighted_takes_each_block_from_its_ratio(tmp_path, tiny_sd1):
    # tiny UNet: 2 levels x (1 resnet + 1) = 4 input blocks, middle, 4 output blocks
    with pytest.raises(MergeError, match="has 9 blocks"):
        merge(
            spec(
                tmp_path,
                [tiny_sd1["a"], tiny_sd1["b"]],
                method="block_weighted",
                blockWeights=[0.5] * 25,
            )
        )
    weights = [0.0] * 9
    weights[1] = 1.0  # IN01 comes from b
    merge(
        spec(
            tmp_path,
            [tiny_sd1["a"], tiny_sd1["b"]],
            method="block_weighted",
            blockWeights=weights,
            alpha=0.0,
        )
    )
    out, a, b = (load_file(p) for p in (tmp_path / "out.safetensors", tiny_sd1["a"], tiny_sd1["b"]))
    for key in a:
        if key.startswith("model.diffusion_model.input_blocks.1."):
            assert torch.equal(out[key], b[key]), key
        elif key.startswith("model.diffusion_model."):
            assert torch.equal(out[key], a[key]), key


@pytest.mark.parametrize(
    ("other", "words"),
    [
        ({"family": "sd2"}, "SD1.x (ldm) but models[1] is SD2.x (ldm)"),
        ({"in_channels": 9}, "SD1.x inpainting"),
    ],
)
def test_incompatible_architectures_are_refused_before_writing(tmp_path, tiny_sd1, other, words):
    shapes = checkpoint_shapes(
        other.get("family", "sd1"), in_channels=other.get("in_channels", 4), tiny=True
    )
    b = write_checkpoint(tmp_path / "other.safetensors", shapes, 3)
    with pytest.raises(MergeError) as info:
        merge(spec(tmp_path, [tiny_sd1["a"], b]))
    assert words in str(info.value)
    assert not (tmp_path / "out.safetensors").exists()
    assert not list(tmp_path.glob(".out*"))


def test_shape_mismatch_names_the_first_differing_keys(tmp_path, tiny_sd1):
    b = load_file(tiny_sd1["b"])
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    b[key] = torch.zeros(48, 32, 1, 1, dtype=torch.float16)
    save_file(b, tmp_path / "b_bad.safetensors")
    with pytest.raises(MergeError) as info:
        merge(spec(tmp_path, [tiny_sd1["a"], tmp_path / "b_bad.safetensors"]))
    assert f"{key}: [32, 32, 1, 1] in models[0], [48, 32, 1, 1] in models[1]" in str(info.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_pickle_and_non_safetensors_inputs_are_refused(tmp_path, tiny_sd1):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not even a pickle")
    with pytest.raises(MergeError, match="allowPickle"):
        merge(spec(tmp_path, [tiny_sd1["a"], pickle]))
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a model at all")
    with pytest.raises(MergeError, match="not a safetensors file"):
        merge(spec(tmp_path, [tiny_sd1["a"], text]))


def test_lora_cannot_be_weight_summed_with_a_checkpoint(tmp_path, tiny_sd1):
    lora = tmp_path / "l.safetensors"
    save_file(
        {
            "lora_unet_x.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
        },
        lora,
    )
    with pytest.raises(MergeError, match="use lora_into_checkpoint or lora_merge"):
        merge(spec(tmp_path, [tiny_sd1["a"], lora]))


# ---------------------------------------------------------------------------------------------
# LoRA into a checkpoint, checked against diffusers applying the same LoRA
# ---------------------------------------------------------------------------------------------


def _tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    unet.train(False)
    return unet


def _unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        out: torch.Tensor = unet(sample, 10, encoder_hidden_states=text).sample
    return out


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    """A tiny UNet (diffusers layout file), a PEFT LoRA on it, and the adapted output."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    unet = _tiny_unet()
    save_file(unet.state_dict(), root / "unet.safetensors")
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
        )
    )
    lora = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(lora, root / "lora_peft.safetensors")
    return root, lora


def _kohya_from_peft(lora: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in lora.items():
        module = key.removeprefix("unet.").rsplit(".lora_", 1)[0]
        name = "lora_unet_" + module.replace(".", "_")
        if ".lora_A." in key:
            out[f"{name}.lora_down.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(alpha)
        else:
            out[f"{name}.lora_up.weight"] = value
    return out


def test_peft_lora_merged_into_checkpoint_matches_diffusers(tmp_path, trained_lora):
    root, lora = trained_lora
    reference = _tiny_unet()
    reference.load_lora_adapter(dict(lora), prefix="unet", adapter_name="x")
    expected = _unet_output(reference)

    merge(
        spec(
            tmp_path,
            [root / "unet.safetensors", root / "lora_peft.safetensors"],
            method="lora_into_checkpoint",
            outputDtype="fp32",
        )
    )
    merged = _tiny_unet(seed=99)
    merged.load_state_dict(load_file(tmp_path / "out.safetensors"))
    torch.testing.assert_close(_unet_output(merged), expected, atol=2e-5, rtol=1e-4)
    # and the LoRA did change the model
    assert not torch.allclose(_unet_output(_tiny_unet()), expected, atol=1e-3)


def test_kohya_lora_merged_into_checkpoint_matches_diffusers(tmp_path, trained_lora):
    from diffusers import StableDiffusionPipeline

    root, lora = trained_lora
    kohya = _kohya_from_peft(lora, alpha=2.0)  # rank 4, alpha 2: scale 0.5
    save_file(kohya, tmp_path / "lora_kohya.safetensors")
    reference = _tiny_unet()
    state, alphas = StableDiffusionPipeline.lora_state_dict(dict(kohya))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, reference, adapter_name="k")
    expected = _unet_output(reference)

    merge(
        spec(
            tmp_path,
            [root / "unet.safetensors", tmp_path / "lora_kohya.safetensors"],
            method="lora_into_checkpoint",
            outputDtype="fp32",
        )
    )
    merged = _tiny_unet(seed=99)
    merged.load_state_dict(load_file(tmp_path / "out.safetensors"))
    torch.testing.assert_close(_unet_output(merged), expected, atol=2e-5, rtol=1e-4)


def test_kohya_lora_into_an_ldm_checkpoint_matches_diffusers(tmp_path, trained_lora):
    """SD1 kohya files name diffusers modules; the LDM checkpoint's block names differ."""
    from difftrain.convert import unet_key_to_ldm, unet_layout_from_diffusers

    root, lora = trained_lora
    kohya = _kohya_from_peft(lora, alpha=4.0)
    save_file(kohya, tmp_path / "lora_kohya.safetensors")
    diff_sd = load_file(root / "unet.safetensors")
    layout, attn_up = unet_layout_from_diffusers(set(diff_sd))
    to_ldm = {k: unet_key_to_ldm(k, layout, attn_up) for k in diff_sd}
    save_file({to_ldm[k]: v for k, v in diff_sd.items()}, tmp_path / "ldm.safetensors")

    merge(
        spec(
            tmp_path,
            [tmp_path / "ldm.safetensors", tmp_path / "lora_kohya.safetensors"],
            method="lora_into_checkpoint",
            outputDtype="fp32",
        )
    )
    out = load_file(tmp_path / "out.safetensors")
    merged = _tiny_unet(seed=99)
    merged.load_state_dict({k: out[v] for k, v in to_ldm.items()})

    reference = _tiny_unet()
    reference.load_lora_adapter(dict(lora), prefix="unet", adapter_name="x")
    torch.testing.assert_close(_unet_output(merged), _unet_output(reference), atol=2e-5, rtol=1e-4)


def test_lora_for_another_model_is_refused(tmp_path, tiny_sd1):
    lora = tmp_path / "l.safetensors"
    save_file(
        {
            "lora_unet_no_such_module.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_no_such_module.lora_up.weight": torch.zeros(4, 2),
        },
        lora,
    )
    with pytest.raises(MergeError, match="match no weight of models"):
        merge(spec(tmp_path, [tiny_sd1["a"], lora], method="lora_into_checkpoint"))
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# LoRA with LoRA
# ---------------------------------------------------------------------------------------------


def _random_lora(path: Path, seed: int, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_f, in_f) in {"lora_unet_a": (6, 5), "lora_unet_b": (4, 3)}.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen)
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, path)
    return sd


def _delta(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
    return (sd[f"{name}.alpha"].item() / down.shape[0]) * up @ down


@pytest.mark.parametrize("mode", ["concat", "svd"])
def test_lora_merge_concat_and_svd_reproduce_the_weighted_sum_of_updates(tmp_path, mode):
    l1 = _random_lora(tmp_path / "l1.safetensors", 1, rank=2, alpha=1.0)
    l2 = _random_lora(tmp_path / "l2.safetensors", 2, rank=3, alpha=3.0)
    extra = {"method": "lora_merge", "loraMergeMode": mode, "outputDtype": "fp32"}
    if mode == "svd":
        extra["loraRank"] = 5
    body = spec(tmp_path, [tmp_path / "l1.safetensors", tmp_path / "l2.safetensors"], **extra)
    body.models[0].weight, body.models[1].weight = 0.7, 0.4
    merge(body)
    out = load_file(tmp_path / "out.safetensors")
    for name in ("lora_unet_a", "lora_unet_b"):
        expected = 0.7 * _delta(l1, name) + 0.4 * _delta(l2, name)
        torch.testing.assert_close(_delta(out, name), expected, atol=1e-4, rtol=1e-4)


def test_lora_merge_sum_needs_equal_ranks(tmp_path):
    _random_lora(tmp_path / "l1.safetensors", 1, rank=2, alpha=1.0)
    _random_lora(tmp_path / "l2.safetensors", 2, rank=3, alpha=3.0)
    with pytest.raises(MergeError, match="equal ranks"):
        merge(
            spec(
                tmp_path,
                [tmp_path / "l1.safetensors", tmp_path / "l2.safetensors"],
                method="lora_merge",
            )
        )


def test_a_committed_input_contributes_the_sha256_of_its_manifest(tmp_path, tiny_sd1):
    first = merge(spec(tmp_path, [tiny_sd1["a"], tiny_sd1["b"]]))
    (tmp_path / "mix.safetensors").write_bytes((tmp_path / "out.safetensors").read_bytes())
    manifest = json.loads((tmp_path / "out.safetensors.manifest.json").read_text())
    (tmp_path / "mix.safetensors.manifest.json").write_text(json.dumps(manifest))
    second = merge(spec(tmp_path, [tmp_path / "mix.safetensors", tiny_sd1["a"]]))
    assert second.input_sha256["models[0]"] == first.sha256 == sha256(tmp_path / "mix.safetensors")
    # a manifest that does not fit the file (another size) is ignored and the file is hashed
    manifest["files"][0]["size"] += 1
    manifest["files"][0]["sha256"] = "0" * 64
    (tmp_path / "mix.safetensors.manifest.json").write_text(json.dumps(manifest))
    third = merge(spec(tmp_path, [tmp_path / "mix.safetensors", tiny_sd1["a"]]))
    assert third.input_sha256["models[0]"] == first.sha256
    # with every input committed, the output is hashed while it is written: same full-file sha256
    for path in (tmp_path / "mix.safetensors", tiny_sd1["a"]):
        entry = {"name": path.name, "size": path.stat().st_size, "sha256": sha256(path)}
        Path(f"{path}.manifest.json").write_text(json.dumps({"files": [entry]}))
    fourth = merge(spec(tmp_path, [tmp_path / "mix.safetensors", tiny_sd1["a"]]))
    Path(f"{tiny_sd1['a']}.manifest.json").unlink()
    assert fourth.sha256 == sha256(tmp_path / "out.safetensors")
    assert fourth.input_sha256 == {"models[0]": first.sha256, "models[1]": sha256(tiny_sd1["a"])}


def test_epsilon_and_v_prediction_models_are_refused(tmp_path, tiny_sd1):
    shapes = checkpoint_shapes("sd1", tiny=True)
    v = write_checkpoint(
        tmp_path / "v.safetensors", shapes, 5, metadata={"modelspec.prediction_type": "v"}
    )
    e = write_checkpoint(
        tmp_path / "e.safetensors", shapes, 6, metadata={"modelspec.prediction_type": "epsilon"}
    )
    with pytest.raises(MergeError, match="epsilon and v-prediction"):
        merge(spec(tmp_path, [e, v]))


def test_folders_and_missing_inputs_are_refused_by_name(tmp_path, tiny_sd1):
    folder = tmp_path / "sd15-diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(MergeError, match="is a folder"):
        merge(spec(tmp_path, [tiny_sd1["a"], folder]))
    with pytest.raises(MergeError, match=r"models\[1\] .*nope.safetensors does not exist"):
        merge(spec(tmp_path, [tiny_sd1["a"], tmp_path / "nope.safetensors"]))


def test_a_merge_leaves_the_callers_grad_mode_alone(tmp_path, tiny_sd1):
    """Merging runs without autograd but must not switch it off for the rest of the process
    (a trainer in the same process needs it)."""
    import torch

    assert torch.is_grad_enabled()
    merge(spec(tmp_path, [tiny_sd1["a"], tiny_sd1["b"]]))
    assert torch.is_grad_enabled()
