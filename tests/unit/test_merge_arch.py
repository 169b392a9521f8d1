"""Architecture detection on key sets with the real names and shapes of SD1.5, SD2 and SDXL."""

from __future__ import annotations

import pytest

from difftrain.merge.arch import describe, unet_layout
from difftrain.merge.tensorio import CODES, Header, TensorInfo
from tests.sd_checkpoints import checkpoint_shapes


def header(
    family: str,
    in_channels: int = 4,
    metadata: dict[str, str] | None = None,
    extra: dict[str, tuple[int, ...]] | None = None,
) -> Header:
    shapes = checkpoint_shapes(family, in_channels=in_channels)
    tensors = {k: TensorInfo(k, CODES[dt], s, 0, 0) for k, (s, dt) in shapes.items()}
    for k, s in (extra or {}).items():
        tensors[k] = TensorInfo(k, "F32", s, 0, 0)
    return Header(tensors, metadata or {}, 0, 0)


@pytest.mark.parametrize(
    ("family", "label", "tensors", "blocks"),
    [
        ("sd1", "SD1.x (ldm)", 1131, 25),
        ("sd2", "SD2.x (ldm)", 1228, 25),
        ("sdxl", "SDXL (ldm)", 2514, 19),
    ],
)
def test_families_are_recognised_from_real_key_sets(family, label, tensors, blocks):
    h = header(family)
    assert len(h.tensors) == tensors
    info = describe(h)
    assert info.label() == label
    assert info.in_channels == 4
    assert unet_layout(set(h.tensors), "ldm").blocks == blocks


def test_sd15_has_the_real_size_and_a_768_wide_cross_attention():
    h = header("sd1")
    params = sum(_numel(t.shape) for t in h.tensors.values())
    assert 1.06e9 < params < 1.07e9
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert h.tensors[key].shape == (320, 768)
    assert h.tensors["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_inpainting_and_v_prediction_are_detected():
    assert describe(header("sd1", in_channels=9)).label() == "SD1.x inpainting (ldm)"
    v = describe(header("sd2", extra={"v_pred": ()}))
    assert v.prediction == "v_prediction"
    assert v.label() == "SD2.x v-prediction (ldm)"
    v2 = describe(header("sd1", metadata={"modelspec.prediction_type": "v"}))
    assert v2.prediction == "v_prediction"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_sd1_text_encoder_keys_have_the_real_files_names():
    """Real SD1 files name the CLIP weights cond_stage_model.transformer.text_model.*, whatever
    the installed transformers calls them."""
    from difftrain.convert import text_encoder_key_to_ldm_sd1

    expected = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert text_encoder_key_to_ldm_sd1("encoder.layers.0.mlp.fc1.weight") == expected
    assert text_encoder_key_to_ldm_sd1("text_model.encoder.layers.0.mlp.fc1.weight") == expected
