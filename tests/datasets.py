"""Synthetic image–caption datasets for tests and benchmarks, written to a folder or to MinIO.

Images are smooth random colour fields (an 8x8 grid of random colours, upscaled bicubically):
cheap to make, distinct per seed (their perceptual hashes differ by 20 bits or more) and robust to
resizing and re-encoding (a copy stays within 2 bits), like photographs.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Caption = str | None


@dataclass(frozen=True)
class S3Location:
    """A prefix in a bucket of a real MinIO, reached with a minio client."""

    client: Any  # minio.Minio
    bucket: str
    prefix: str = ""

    def uri(self, rel: str = "") -> str:
        path = "/".join(p.strip("/") for p in (self.prefix, rel) if p.strip("/"))
        return f"s3://{self.bucket}/{path}".rstrip("/")


Dest = Path | S3Location


def synthetic_image(
    seed: int, size: tuple[int, int] = (128, 128), mode: str = "RGB"
) -> Image.Image:
    """A smooth random colour field of ``size`` (width, height), distinct for each seed."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(grid, "RGB").resize(size, Image.Resampling.BICUBIC)
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    """``image`` encoded as ``fmt`` (JPEG quality 90 unless given)."""
    if fmt == "JPEG":
        params.setdefault("quality", 90)
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (128, 128), **params: Any) -> bytes:
    """A synthetic JPEG."""
    return encode(synthetic_image(seed, size), "JPEG", **params)


def put_files(dest: Dest, files: Mapping[str, bytes], workers: int = 8) -> None:
    """Write ``files`` (relative path -> bytes) under a local folder or an S3 prefix."""
    if isinstance(dest, Path):
        for rel, data in files.items():
            path = dest / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return

    def put(item: tuple[str, bytes]) -> None:
        rel, data = item
        key = dest.uri(rel).removeprefix(f"s3://{dest.bucket}/")
        dest.client.put_object(dest.bucket, key, io.BytesIO(data), len(data))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, files.items()))


def dataset_uri(dest: Dest) -> str:
    """The dataset.uri of a destination."""
    return str(dest) if isinstance(dest, Path) else dest.uri()


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def write_folder_dataset(dest: Dest, pairs: Mapping[str, tuple[bytes, Caption]]) -> str:
    """Layout 'folder': ``name`` (with extension) + ``stem.txt`` unless the caption is None."""
    files: dict[str, bytes] = {}
    for name, (data, caption) in pairs.items():
        files[name] = data
        if caption is not None:
            files[f"{_stem(name)}.txt"] = caption.encode()
    put_files(dest, files)
    return dataset_uri(dest)


def write_jsonl_dataset(
    dest: Dest,
    pairs: Mapping[str, tuple[bytes, Caption]],
    column: str = "text",
    folder: str = "",
) -> str:
    """Layout 'jsonl': images (under ``folder``) and a metadata.jsonl naming them; a None caption
    leaves the column out of that row."""
    files: dict[str, bytes] = {}
    rows = []
    for name, (data, caption) in pairs.items():
        rel = f"{folder}/{name}" if folder else name
        files[rel] = data
        row: dict[str, Any] = {"file_name": rel, "width_hint": 0}
        if caption is not None:
            row[column] = caption
        rows.append(json.dumps(row))
    files["metadata.jsonl"] = ("\n".join(rows) + "\n").encode()
    put_files(dest, files)
    return dataset_uri(dest)


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar archive of ``members`` (name, bytes), in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_webdataset(
    dest: Dest,
    pairs: Mapping[str, tuple[bytes, Caption]],
    shard_size: int = 100,
    caption_ext: str = "txt",
) -> str:
    """Layout 'webdataset': shards ``shard-00000.tar`` ... of ``shard_size`` samples each; sample
    ``name`` (with image extension) gives ``stem.<ext>`` + ``stem.txt`` (or ``.json``)."""
    items = list(pairs.items())
    files: dict[str, bytes] = {}
    for index, start in enumerate(range(0, len(items), shard_size)):
        members: list[tuple[str, bytes]] = []
        for name, (data, caption) in items[start : start + shard_size]:
            members.append((name, data))
            if caption is None:
                continue
            if caption_ext == "json":
                members.append((f"{_stem(name)}.json", json.dumps({"caption": caption}).encode()))
            else:
                members.append((f"{_stem(name)}.{caption_ext}", caption.encode()))
        files[f"shard-{index:05d}.tar"] = tar_bytes(members)
    put_files(dest, files)
    return dataset_uri(dest)


def write_class_dataset(dest: Dest, classes: Mapping[str, Mapping[str, bytes]]) -> str:
    """Layout 'classes': ``<class folder>/<name>`` images, no captions."""
    put_files(
        dest,
        {f"{cls}/{name}": data for cls, images in classes.items() for name, data in images.items()},
    )
    return dataset_uri(dest)


def clean_pairs(count: int, seed: int = 0, prefix: str = "img") -> dict[str, tuple[bytes, Caption]]:
    """``count`` good JPEGs of 96-160 px with five-word captions."""
    return {
        f"{prefix}{i:03d}.jpg": (
            jpeg(seed + i, (96 + (i * 37) % 64, 96 + (i * 53) % 64)),
            f"a synthetic photo number {i}",
        )
        for i in range(count)
    }


@dataclass(frozen=True)
class DirtyDataset:
    """A folder dataset seeded with one or two pairs for every drop reason."""

    pairs: dict[str, tuple[bytes, Caption]]
    cleaning: dict[str, Any]  # CleaningSpec fields (wire names)
    dropped: dict[str, int]
    examples: dict[str, list[str]]
    kept: int
    truncated: int  # with count_tokens = number of words, max_tokens = 10
    total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", len(self.pairs))


def dirty_dataset() -> DirtyDataset:
    """Good pairs plus: a truncated JPEG, a text file named .jpg, two tiny images, an extreme
    aspect ratio, an exact and a near duplicate (resized, re-encoded), and a missing, an empty,
    a too-short and a banned-word caption. Keys sort so every original precedes its copy."""
    good = clean_pairs(10, seed=100, prefix="g")
    original = synthetic_image(101, (140, 120))
    good["g001.jpg"] = (encode(original), good["g001.jpg"][1])
    near = encode(original.resize((112, 96), Image.Resampling.LANCZOS), quality=80)
    pairs: dict[str, tuple[bytes, Caption]] = dict(good)
    truncated_jpeg = jpeg(200, (128, 128))
    pairs.update(
        {
            "corrupt_truncated.jpg": (
                truncated_jpeg[: len(truncated_jpeg) // 2],
                "a cut off photo",
            ),
            "corrupt_text.jpg": (b"this is a text file, not a JPEG\n", "a text file named jpg"),
            "tiny_1.jpg": (jpeg(201, (40, 40)), "a very small photo"),
            "tiny_2.png": (encode(synthetic_image(202, (50, 30)), "PNG"), "a small png photo"),
            "wide.jpg": (jpeg(203, (400, 100)), "a very wide panorama photo"),
            "z_exact_copy.jpg": (good["g000.jpg"][0], "the same bytes again"),
            "z_near_copy.jpg": (near, "a resized and re-encoded copy"),
            "m_nocap.jpg": (jpeg(204), None),
            "m_empty.jpg": (jpeg(205), "   "),
            "m_short.jpg": (jpeg(206), "cat"),
            "m_banned.jpg": (jpeg(207), "a Watermark over a dog"),
            "m_watermarked.jpg": (jpeg(208), "a watermarked old photo"),
            "m_long.jpg": (
                jpeg(209),
                "one two three four five six seven eight nine ten eleven twelve",
            ),
        }
    )
    dropped = {
        "corrupt": 2,
        "too_small": 2,
        "extreme_aspect_ratio": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "short_caption": 1,
        "banned_words": 1,
    }
    examples = {
        "corrupt": ["corrupt_text", "corrupt_truncated"],
        "too_small": ["tiny_1", "tiny_2"],
        "extreme_aspect_ratio": ["wide"],
        "exact_duplicate": ["z_exact_copy"],
        "near_duplicate": ["z_near_copy"],
        "missing_caption": ["m_nocap"],
        "empty_caption": ["m_empty"],
        "short_caption": ["m_short"],
        "banned_words": ["m_banned"],
    }
    return DirtyDataset(
        pairs=pairs,
        cleaning={
            "minResolution": 64,
            "maxAspectRatio": 3.0,
            "nearDuplicateDistance": 4,
            "minCaptionWords": 2,
            "bannedWords": ["watermark"],
        },
        dropped=dropped,
        examples=examples,
        kept=len(pairs) - sum(dropped.values()),
        truncated=1,
    )


def animated_gif(seeds: Iterable[int], size: tuple[int, int] = (128, 128)) -> bytes:
    """An animated GIF, one synthetic frame per seed."""
    frames = [synthetic_image(s, size) for s in seeds]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


@dataclass(frozen=True)
class MixedDataset:
    """A folder dataset holding every kind of file a user's upload may have, and what the report
    must say of it: each file counted once, an image with its caption file as one."""

    files: dict[str, bytes]  # relative path -> bytes
    dropped: dict[str, int]
    examples: dict[str, list[str]]
    notes: dict[str, int]
    kept: list[str]  # keys, sorted
    total: int


def mixed_dataset() -> MixedDataset:
    """Images in every format Pillow reads here (an animated GIF among them), an ICO named .png,
    a caption without an image, files that are no image at all, and two unreadable images."""
    from difftrain.data.images import AVIF

    def caption(i: int) -> bytes:
        return f"a mixed format photo number {i}".encode()

    images = {
        "a.jpg": jpeg(300),
        "b.png": encode(synthetic_image(301), "PNG"),
        "c.gif": encode(synthetic_image(302), "GIF"),
        "d_animated.gif": animated_gif([303, 304, 305]),
        "e.bmp": encode(synthetic_image(306), "BMP"),
        "f.tif": encode(synthetic_image(307), "TIFF"),
        "g.tiff": encode(synthetic_image(308, mode="CMYK"), "TIFF"),
        "h.webp": encode(synthetic_image(309), "WEBP"),
        "i.avif": encode(synthetic_image(310), "AVIF") if AVIF else b"not decodable here",
        "j_icon.png": encode(synthetic_image(311, (64, 64)), "ICO"),
        "k_text.jpg": b"a text file named .jpg\n",
        "l_cut.gif": encode(synthetic_image(312), "GIF")[:200],
    }
    files = dict(images)
    files.update({f"{_stem(name)}.txt": caption(i) for i, name in enumerate(images)})
    files.update(
        {
            "orphan.txt": caption(99),
            "sub/another orphan.txt": caption(98),
            "README.md": b"# my dataset\n",
            "labels.csv": b"file,label\na.jpg,1\n",
            "clip.mp4": b"\x00\x00\x00\x18ftypmp42",
            "photo.heic": b"\x00\x00\x00\x18ftypheic",
        }
    )
    kept = ["a", "b", "c", "d_animated", "e", "f", "g", "h"] + (["i"] if AVIF else [])
    unsupported = ["README.md", "clip.mp4", "j_icon", "labels.csv", "photo.heic"]
    orphans = ["orphan.txt", "sub/another orphan.txt"]
    if not AVIF:  # .avif is then no image file: counted unread, and its caption has no image
        unsupported = sorted([*unsupported, "i.avif"])
        orphans = sorted([*orphans, "i.txt"])
    dropped = {
        "unsupported_format": len(unsupported),
        "orphan_caption": len(orphans),
        "corrupt": 2,
    }
    examples = {
        "unsupported_format": unsupported[:5],
        "orphan_caption": orphans,
        "corrupt": ["k_text", "l_cut"],
        "first_frame_only": ["d_animated"],
    }
    total = len(kept) + sum(dropped.values())
    return MixedDataset(files, dropped, examples, {"first_frame_only": 1}, sorted(kept), total)
