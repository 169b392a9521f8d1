"""Small image–text datasets and encoder spies for the latent-cache and Boomerang tests."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square"]


def shape_png(seed: int, width: int = 64, height: int = 64) -> tuple[bytes, str]:
    """A PNG of a coloured shape on a plain background, and its caption."""
    rng = random.Random(seed)
    colour, background = rng.sample(COLOURS, 2)
    shape = rng.choice(SHAPES)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    # An off-centre shape, so a horizontal flip changes the image.
    x0, y0 = rng.randint(2, width // 3), rng.randint(2, height // 3)
    box = (x0, y0, x0 + width // 2, y0 + height // 2)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), f"a {colour} {shape} on a {background} background"


def make_pairs(n: int, *, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[Any]:
    """``n`` CleanPairs of synthetic shape images (64 px unless ``sizes`` says otherwise)."""
    from difftrain.data import CleanPair

    pairs = []
    for i in range(n):
        width, height = sizes[i] if sizes else (64, 64)
        data, caption = shape_png(seed * 1000 + i, width, height)
        pairs.append(
            CleanPair(
                key=f"img{i:03d}",
                name=f"img{i:03d}.png",
                data=data,
                caption=caption,
                width=width,
                height=height,
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    return pairs


@dataclass
class CallCounter:
    """Wraps a real bound method and counts its calls (a spy, not a mock: the method still runs)."""

    method: Callable[..., Any]
    calls: int = 0
    items: int = 0  # batch elements seen

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.items += int(x.shape[0])
        return self.method(x, *args, **kwargs)


@dataclass
class EncoderSpies:
    vae_encode: CallCounter
    text_forward: CallCounter

    @property
    def calls(self) -> int:
        return self.vae_encode.calls + self.text_forward.calls


def spy_on_encoders(components: Any, monkeypatch: Any) -> EncoderSpies:
    """Count calls of ``vae.encode`` and ``text_encoder.forward`` on the real tiny model."""
    spies = EncoderSpies(
        CallCounter(components.vae.encode), CallCounter(components.text_encoder.forward)
    )
    monkeypatch.setattr(components.vae, "encode", spies.vae_encode)
    monkeypatch.setattr(components.text_encoder, "forward", spies.text_forward)
    return spies


def cache_tensors(root: Any) -> dict[str, Any]:
    """Every tensor of the newest index of the latent cache under the folder ``root``, by name
    ("latent/<address>", "flipped/<address>", "text/<address>")."""
    from pathlib import Path

    from safetensors.torch import load_file

    from difftrain.data.cache import LatentCache
    from difftrain.storage import LocalStore

    index = LatentCache(LocalStore(), str(root)).index()
    tensors: dict[str, Any] = {}
    for name in index.shards:
        tensors.update(load_file(str(Path(root) / "shards" / name)))
    return tensors


def cache_shard_ranks(root: Any) -> list[str]:
    """Which process encoded each shard of the newest index under the folder ``root``, sorted."""
    from pathlib import Path

    from difftrain.data.cache import LatentCache
    from difftrain.data.cache_samples import shard_metadata
    from difftrain.storage import LocalStore

    index = LatentCache(LocalStore(), str(root)).index()
    return sorted(shard_metadata(Path(root) / "shards" / n)["rank"] for n in index.shards)
