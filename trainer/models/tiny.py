"""A tiny Stable-Diffusion-1-shaped model built from configs: for tests and the local run.

Nothing is downloaded. The tokenizer is a real CLIP byte-level BPE tokenizer whose merges form the
words of the synthetic shapes captions (``TINY_WORDS``) as single tokens, so a caption such as
"a red circle on a blue background" is a handful of tokens the text encoder can learn; any other
text falls back to characters. The networks are random-initialised from seeded configs with the
same structure as SD1 (cross-attention and plain down/up blocks, a KL autoencoder with four latent
channels, a CLIP text transformer), small enough to train on a CPU in minutes.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from difftrain.models.components import Components

TINY_WORDS: tuple[str, ...] = (
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "magenta",
    "white", "black", "gray", "grey", "brown",
    # shapes
    "circle", "square", "triangle", "star", "cross", "ring", "rectangle", "diamond", "heart",
    "disc", "dot", "stripe", "stripes", "shape", "shapes",
    # sizes and places
    "small", "large", "big", "tiny", "left", "right", "top", "bottom", "center", "middle",
    # caption glue
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "image", "painting",
    "drawing", "background", "plain", "style",
    # DreamBooth: rare identifier and class nouns
    "sks", "dog", "cat", "person", "man", "woman", "toy",
)  # fmt: skip

# A prompt of the local run and the tests fits well within CLIP's 77 positions.
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"

TINY_UNET_CONFIG: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
# Two levels: one downsampling, so 64-px images have 32-px latents.
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_LENGTH,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}
# SD1's training schedule (scaled-linear betas over 1000 steps).
TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's printable stand-in character for every byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word: merge the best-ranked adjacent pair until none applies."""
    parts = [*word[:-1], word[-1] + END]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        ranked = [(rank, i) for rank, i in pairs if rank is not None]
        if not ranked:
            break
        _, i = min(ranked)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiny_merges(words: Iterable[str] = TINY_WORDS) -> list[tuple[str, str]]:
    """Merges under which every word is one token.

    Each word first gets a left-to-right chain of merges. A pair inside one word can be the start
    of another word's chain and be merged first, leaving the word in pieces; the pieces are then
    joined by merges appended at the end. An appended merge has the worst rank, so it only fires
    where no other merge applies, and words already whole are unaffected: the loop converges.
    """
    merges: list[tuple[str, str]] = []
    for word in words:
        token = word[0]
        for i, char in enumerate(word[1:], start=1):
            pair = (token, char + END if i == len(word) - 1 else char)
            if pair not in merges:
                merges.append(pair)
            token = pair[0] + pair[1]
    while True:
        ranks = {pair: rank for rank, pair in enumerate(merges)}
        broken = [(w, p) for w in words if len(p := _bpe(w, ranks)) > 1]
        if not broken:
            return merges
        for _, parts in broken:
            token = parts[0]
            for part in parts[1:]:
                if (token, part) not in merges:
                    merges.append((token, part))
                token += part


def write_tiny_tokenizer(path: Path, *, max_length: int = MAX_LENGTH) -> None:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) that knows ``TINY_WORDS``."""
    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = tiny_merges()
    tokens = chars + [c + END for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (path / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def _vocab_size(tokenizer_dir: Path) -> int:
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    return len(vocab)


def build_tiny_pipeline_folder(
    path: Path,
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 32,
    use_linear_projection: bool = False,
    vae_steps: int = 0,
    vae_norm_groups: int = TINY_VAE_CONFIG["norm_num_groups"],
    unet_attention: tuple[bool, ...] = (True, False),
    context_length: int = MAX_LENGTH,
    zero_terminal_snr: bool = False,
) -> Path:
    """Write a complete diffusers StableDiffusionPipeline folder with tiny random-initialised parts.

    ``sample_size`` is the UNet's latent size; images are twice as large (64 px by default).
    ``use_linear_projection`` gives SD2's linear attention projections instead of SD1's 1x1
    convolutions (the text encoder stays a transformers CLIP model either way).
    The same seed gives the same weights, so the same files. ``vae_steps`` > 0 pre-trains the
    VAE to reconstruct generated shapes (see tiny_vae.py): slower to build, but its latents keep
    the images' colours, so a diffusion model trained on them can learn from captions.
    ``vae_norm_groups``: the VAE's GroupNorm groups. The default 8 (two channels a group) lets
    a normalisation discard most of a flat image's colour, and 200 pre-training steps leave a VAE
    that turns blue or green into teal; 1 (a LayerNorm over channels and pixels) keeps the
    colour in the channels' ratios, and the same steps reconstruct every palette colour.
    ``unet_attention``: which UNet levels (the latent size first, then half of it) have
    self- and cross-attention blocks (the middle block always has); SD1's layout has them at the
    latent size, where self-attention over every latent pixel costs most of a CPU step.
    ``context_length`` below CLIP's 77 shortens the text context: the short captions of the
    shapes data then fill most of it, and cross-attention learns to use them sooner.
    ``zero_terminal_snr`` rescales the schedule's betas so that its last timestep is pure noise
    (Lin et al. 2023) and samples from its last timestep (``trailing`` spacing); it needs
    v-prediction. SD1's schedule leaves some of the image at t=999, so a model trained on it
    learns to keep the mean colour it is given, and its samples drawn from pure noise keep the
    noise's: colour noise, whatever the prompt.
    """
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError("zero_terminal_snr needs prediction_type='v_prediction'")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(path / "tokenizer", max_length=context_length)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    generator_state = torch.random.get_rng_state()
    try:
        # Modules initialise from the global generator; seed it per component so the weights of
        # one part do not depend on how many parameters another has.
        torch.manual_seed(seed)
        if len(unet_attention) != len(TINY_UNET_CONFIG["block_out_channels"]):
            raise ValueError(f"unet_attention: one flag per UNet level, not {unet_attention!r}")
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in unet_attention]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(unet_attention)]
        unet = UNet2DConditionModel(
            **{**TINY_UNET_CONFIG, "down_block_types": down, "up_block_types": up},
            sample_size=sample_size,
            use_linear_projection=use_linear_projection,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            **{
                **TINY_VAE_CONFIG,
                "sample_size": sample_size * 2,
                "norm_num_groups": vae_norm_groups,
            }
        )
        if vae_steps > 0:
            from difftrain.models.tiny_vae import pretrain_vae

            pretrain_vae(vae, steps=vae_steps, seed=seed + 1, image_size=sample_size * 2)
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            **{**TINY_TEXT_CONFIG, "max_position_embeddings": context_length},
            vocab_size=_vocab_size(path / "tokenizer"),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
    finally:
        torch.random.set_rng_state(generator_state)
    zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    scheduler = DDPMScheduler(
        **TINY_SCHEDULER_CONFIG,
        prediction_type=prediction_type,
        **(zero_snr if zero_terminal_snr else {}),
    )

    unet.save_pretrained(path / "unet", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(path / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return path


def _diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


def build_tiny_components(*, seed: int = 0, prediction_type: str = "epsilon") -> Components:
    """The tiny model in memory, loaded the way a base model is (through a temporary folder)."""
    from difftrain.api.training import BaseModelSpec
    from difftrain.models.loading import load_base_model

    with tempfile.TemporaryDirectory(prefix="difftrain-tiny-") as tmp:
        folder = build_tiny_pipeline_folder(
            Path(tmp) / "model", seed=seed, prediction_type=prediction_type
        )
        spec = BaseModelSpec(uri=str(folder))
        components = load_base_model(spec, None, work_dir=Path(tmp) / "work")
    components.source = f"tiny:seed={seed}"
    return components
