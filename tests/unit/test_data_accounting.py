"""Every file accounted for: each file of a dataset, in every layout, ends up kept or counted
under one reason, and the report's total covers them all."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difftrain.api import DatasetSpec
from difftrain.data import REASONS, format_report, load_dataset
from difftrain.data.cleaning import NOTES
from difftrain.storage import LocalStore
from tests.datasets import (
    animated_gif,
    encode,
    jpeg,
    mixed_dataset,
    put_files,
    synthetic_image,
    tar_bytes,
)

CLEANING = {"minResolution": 64, "minCaptionWords": 2}


def load(uri: Path, **kw: Any):
    spec = DatasetSpec.model_validate({"uri": str(uri), "cleaning": CLEANING, **kw})
    return load_dataset(spec, LocalStore())


def test_a_folder_with_every_kind_of_file_counts_each_file_once(tmp_path):
    mixed = mixed_dataset()
    put_files(tmp_path, mixed.files)
    result = load(tmp_path)
    report = result.report
    assert sorted(p.key for p in result.pairs) == mixed.kept
    assert report.dropped == mixed.dropped
    assert report.notes == mixed.notes
    assert report.examples == mixed.examples
    assert report.total == mixed.total == report.kept + sum(report.dropped.values())
    assert set(report.dropped) <= set(REASONS) and set(report.notes) <= set(NOTES)


def test_gif_bmp_tiff_and_webp_are_read_like_jpeg(tmp_path):
    mixed = mixed_dataset()
    put_files(tmp_path, mixed.files)
    by_key = {p.key: p for p in load(tmp_path).pairs}
    for key in ("c", "e", "f", "g", "h"):
        assert (by_key[key].width, by_key[key].height) == (128, 128)
        assert by_key[key].caption.startswith("a mixed format photo")


def test_an_animated_gif_is_kept_on_its_first_frame_with_a_note(tmp_path):
    from difftrain.data.images import decode_rgb

    put_files(tmp_path, {"anim.gif": animated_gif([1, 2]), "anim.txt": b"two frames of colour"})
    result = load(tmp_path)
    assert [p.key for p in result.pairs] == ["anim"]
    assert result.report.notes == {"first_frame_only": 1}
    assert result.report.examples == {"first_frame_only": ["anim"]}
    first = decode_rgb(encode(synthetic_image(1), "GIF"), "first.gif")
    got = decode_rgb((tmp_path / "anim.gif").read_bytes(), "anim.gif")
    assert np.array_equal(np.asarray(got), np.asarray(first))
    assert "first_frame_only" in format_report(result)


def test_format_report_prints_the_new_reasons_with_their_meaning(tmp_path):
    put_files(tmp_path, mixed_dataset().files)
    table = format_report(load(tmp_path))
    for reason in ("unsupported_format", "orphan_caption", "corrupt"):
        assert f"  {reason}" in table
        assert f"{reason}: {REASONS[reason]}" in table
    assert "orphan.txt, sub/another orphan.txt" in table


def test_jsonl_counts_missing_files_unlisted_images_and_other_files(tmp_path):
    rows = [
        {"file_name": "images/a.jpg", "text": "a listed photo here"},
        {"file_name": "images/gone.jpg", "text": "a photo that is not there"},
        {"file_name": "images/b.bmp", "text": "a listed bitmap here"},
    ]
    put_files(
        tmp_path,
        {
            "metadata.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode(),
            "images/a.jpg": jpeg(1),
            "images/b.bmp": encode(synthetic_image(2), "BMP"),
            "images/unlisted.png": encode(synthetic_image(3), "PNG"),
            "images/a.txt": b"a caption file the jsonl layout does not read",
            "notes.pdf": b"%PDF-1.4",
        },
    )
    result = load(tmp_path)
    report = result.report
    assert [p.key for p in result.pairs] == ["images/a", "images/b"]
    assert report.dropped == {
        "unsupported_format": 1,
        "orphan_caption": 1,
        "missing_image": 1,
        "not_in_metadata": 1,
    }
    assert report.examples["missing_image"] == ["images/gone"]
    assert report.examples["not_in_metadata"] == ["images/unlisted.png"]
    assert report.examples["orphan_caption"] == ["images/a.txt"]
    assert report.examples["unsupported_format"] == ["notes.pdf"]
    assert report.total == 6 == report.kept + sum(report.dropped.values())


def test_webdataset_counts_samples_without_a_pair_and_files_beside_the_shards(tmp_path):
    shard = tar_bytes(
        [
            ("000.jpg", jpeg(1)),
            ("000.txt", b"a photo in a shard"),
            ("001.txt", b"a caption whose image is missing"),
            ("002.gif", encode(synthetic_image(2), "GIF")),
            ("002.json", json.dumps({"caption": "a gif in a shard"}).encode()),
            ("003.cls", b"7"),
            ("004.heic", b"\x00\x00\x00\x18ftypheic"),
            ("004.txt", b"a caption beside an unreadable image"),
        ]
    )
    put_files(
        tmp_path,
        {"s-000.tar": shard, "s-000.parquet": b"PAR1", "s-000_stats.json": b"{}"},
    )
    result = load(tmp_path, format="webdataset")
    report = result.report
    assert [p.key for p in result.pairs] == ["s-000/000", "s-000/002"]
    assert report.dropped == {"unsupported_format": 4, "orphan_caption": 1}
    assert report.examples["orphan_caption"] == ["s-000/001"]
    assert report.examples["unsupported_format"] == [
        "s-000.parquet",
        "s-000/003",
        "s-000/004",
        "s-000_stats.json",
    ]
    assert report.total == 7 == report.kept + sum(report.dropped.values())


def test_class_folders_count_caption_files_and_other_files(tmp_path):
    put_files(
        tmp_path,
        {
            "n02085620-Chihuahua/a.jpg": jpeg(1),
            "n02085620-Chihuahua/b.tif": encode(synthetic_image(2), "TIFF"),
            "n02085620-Chihuahua/a.txt": b"a caption the layout does not read",
            "n02085620-Chihuahua/Thumbs.db": b"\x00",
        },
    )
    result = load(tmp_path, format="classes", captionTemplate="a photo of a {class}")
    assert [p.caption for p in result.pairs] == ["a photo of a Chihuahua"] * 2
    assert result.report.dropped == {"unsupported_format": 1, "orphan_caption": 1}
    assert result.report.total == 4


# One kind of file each, with the reason (None: kept) the report must give it.
KINDS: dict[str, tuple[str, Any]] = {
    "jpeg": ("jpg", None),
    "png": ("png", None),
    "gif": ("gif", None),
    "bmp": ("bmp", None),
    "tiff": ("tif", None),
    "uncaptioned": ("jpg", "missing_caption"),
    "corrupt": ("jpg", "corrupt"),
    "icon": ("png", "unsupported_format"),
    "orphan": ("txt", "orphan_caption"),
    "other": ("bin", "unsupported_format"),
}


def _file(kind: str, seed: int) -> bytes:
    image = synthetic_image(seed, (72, 72))
    return {
        "jpeg": lambda: encode(image),
        "png": lambda: encode(image, "PNG"),
        "gif": lambda: encode(image, "GIF"),
        "bmp": lambda: encode(image, "BMP"),
        "tiff": lambda: encode(image, "TIFF"),
        "uncaptioned": lambda: encode(image),
        "corrupt": lambda: encode(image)[:150],
        "icon": lambda: encode(image, "ICO"),
        "orphan": lambda: b"a caption without any image",
        "other": lambda: bytes(range(seed % 200, seed % 200 + 40)),
    }[kind]()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=12))
def test_for_any_mix_of_files_total_is_kept_plus_every_drop(kinds):
    files: dict[str, bytes] = {}
    expected: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        ext, reason = KINDS[kind]
        name = f"f{i:02d}"
        files[f"{name}.{ext}"] = _file(kind, 1000 + i * 7)
        if kind not in ("orphan", "other", "uncaptioned"):  # an image's caption file
            files[f"{name}.txt"] = f"caption of file number {i}".encode()
        expected[reason or "kept"] = expected.get(reason or "kept", 0) + 1
    files["anchor.jpg"] = jpeg(1)  # a folder needs at least one image to be a dataset
    files["anchor.txt"] = b"the anchor image"
    expected["kept"] = expected.get("kept", 0) + 1
    with tempfile.TemporaryDirectory() as folder:
        put_files(Path(folder), files)
        spec = DatasetSpec.model_validate(
            {"uri": folder, "cleaning": {**CLEANING, "nearDuplicateDistance": 0}}
        )
        report = load_dataset(spec, LocalStore()).report
    assert report.total == report.kept + sum(report.dropped.values()) == len(kinds) + 1
    assert {"kept": report.kept, **report.dropped} == expected


def test_dataset_check_prints_and_writes_every_reason(tmp_path, capsys):
    from difftrain.cli import main

    mixed = mixed_dataset()
    put_files(tmp_path / "data", mixed.files)
    flags = ["--min-resolution", "64", "--min-caption-words", "2"]
    assert main(["dataset", "check", str(tmp_path / "data"), *flags]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["total", str(mixed.total)]
    for reason, count in mixed.dropped.items():
        (line,) = [x for x in lines if x.startswith(f"  {reason} ")]
        assert line.split()[1] == str(count)
        assert f"{reason}: {REASONS[reason]}" in lines
    (note,) = [x for x in lines if x.startswith("first_frame_only ")]
    assert note.split()[1:] == ["1", "d_animated"]
    assert main(["dataset", "check", str(tmp_path / "data"), *flags, "--json"]) == 0
    wire = json.loads(capsys.readouterr().out)
    assert wire["notes"] == {"first_frame_only": 1} and wire["dropped"] == mixed.dropped
