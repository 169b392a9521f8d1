"""Sources: each layout yields the right pairs in a stable order; bad layouts are named."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import IO, Any

import pytest

from difftrain.api import DatasetSpec
from difftrain.data import DatasetError, RawPair, detect_format, iter_pairs
from difftrain.data.sources import class_name
from difftrain.storage import LocalStore
from tests.datasets import (
    clean_pairs,
    jpeg,
    put_files,
    tar_bytes,
    write_class_dataset,
    write_folder_dataset,
    write_jsonl_dataset,
    write_webdataset,
)


def spec(uri: str | Path, **kw) -> DatasetSpec:
    return DatasetSpec.model_validate({"uri": str(uri), **kw})


def read(uri: str | Path, *, workers: int = 4, **kw: Any) -> list[RawPair]:
    return list(iter_pairs(spec(uri, **kw), LocalStore(), workers=workers))


def test_folder_pairs_images_with_same_stem_captions(tmp_path):
    pairs = clean_pairs(5)
    pairs["sub/extra.png"] = (jpeg(9), "in a sub-folder")
    pairs["nocap.webp"] = (jpeg(10), None)
    write_folder_dataset(tmp_path, pairs)
    got = read(tmp_path)
    assert [p.key for p in got] == sorted(
        ["img000", "img001", "img002", "img003", "img004", "sub/extra", "nocap"]
    )
    by_key = {p.key: p for p in got}
    assert by_key["img003"].data == pairs["img003.jpg"][0]
    assert by_key["img003"].caption == "a synthetic photo number 3"
    assert by_key["sub/extra"].caption == "in a sub-folder"
    assert by_key["nocap"].caption is None
    assert by_key["img003"].name == str(tmp_path / "img003.jpg")


def test_order_is_the_same_whatever_the_number_of_readers(tmp_path):
    write_folder_dataset(tmp_path, clean_pairs(40))
    one = [(p.key, p.data) for p in read(tmp_path, workers=1)]
    many = [(p.key, p.data) for p in read(tmp_path, workers=8)]
    assert one == many
    assert [k for k, _ in one] == sorted(k for k, _ in one)


def test_hidden_files_and_folders_are_not_part_of_the_dataset(tmp_path):
    write_folder_dataset(tmp_path, clean_pairs(2))
    put_files(
        tmp_path, {".difftrain-cache/x.jpg": jpeg(1), "._img000.jpg": b"mac", "notes.md": b""}
    )
    got = read(tmp_path)
    assert [p.key for p in got] == ["img000", "img001", "notes.md"]  # notes.md: counted, unread
    assert [p.skipped for p in got] == [None, None, "unsupported_format"]


def test_two_images_with_one_stem_keep_unique_keys(tmp_path):
    put_files(tmp_path, {"cat.jpg": jpeg(1), "cat.png": jpeg(2), "cat.txt": b"a cat"})
    got = read(tmp_path)
    assert [p.key for p in got] == ["cat.jpg", "cat.png"]
    assert {p.caption for p in got} == {"a cat"}


def test_jsonl_reads_file_name_and_the_caption_column(tmp_path):
    pairs = clean_pairs(3)
    pairs["missing-caption.jpg"] = (jpeg(7), None)
    write_jsonl_dataset(tmp_path, pairs, column="caption", folder="images")
    got = read(tmp_path, captionColumn="caption")
    assert [p.key for p in got] == [
        "images/img000",
        "images/img001",
        "images/img002",
        "images/missing-caption",
    ]
    assert got[1].caption == "a synthetic photo number 1"
    assert got[1].data == pairs["img001.jpg"][0]
    assert got[3].caption is None


def test_jsonl_row_naming_a_missing_image_is_counted_as_missing_not_read(tmp_path):
    write_jsonl_dataset(tmp_path, clean_pairs(1))
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(meta.read_text() + json.dumps({"file_name": "gone.jpg", "text": "x y"}) + "\n")
    got = {p.key: p for p in read(tmp_path)}
    assert got["gone"].skipped == "missing_image" and got["gone"].caption == "x y"
    assert got["gone"].name == str(tmp_path / "gone.jpg")
    assert got["img000"].skipped is None


def test_jsonl_wrong_caption_column_is_named_with_the_columns_found(tmp_path):
    write_jsonl_dataset(tmp_path, clean_pairs(2), column="caption")
    with pytest.raises(DatasetError, match=r"caption column 'text'.*caption, file_name"):
        read(tmp_path)


def test_jsonl_malformed_line_is_named(tmp_path):
    write_jsonl_dataset(tmp_path, clean_pairs(2))
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(meta.read_text() + "{not json\n")
    with pytest.raises(DatasetError, match=r"metadata\.jsonl line 3: not valid JSON"):
        read(tmp_path)


@pytest.mark.parametrize("caption_ext", ["txt", "caption", "json"])
def test_webdataset_groups_members_by_key_across_shards(tmp_path, caption_ext):
    pairs = clean_pairs(7)
    pairs["img007.png"] = (jpeg(8), None)
    write_webdataset(tmp_path, pairs, shard_size=3, caption_ext=caption_ext)
    got = read(tmp_path)
    assert [p.key for p in got] == [
        "shard-00000/img000",
        "shard-00000/img001",
        "shard-00000/img002",
        "shard-00001/img003",
        "shard-00001/img004",
        "shard-00001/img005",
        "shard-00002/img006",
        "shard-00002/img007",
    ]
    assert got[4].caption == "a synthetic photo number 4"
    assert got[4].data == pairs["img004.jpg"][0]
    assert got[7].caption is None
    assert got[4].name == f"{tmp_path}/shard-00001.tar#img004.jpg"


def test_webdataset_sample_without_an_image_is_counted_as_an_orphan_caption(tmp_path):
    put_files(tmp_path, {"s.tar": tar_bytes([("a.txt", b"orphan caption"), ("b.jpg", jpeg(1))])})
    got = read(tmp_path)
    assert [(p.key, p.skipped, p.caption) for p in got] == [
        ("s/a", "orphan_caption", "orphan caption"),
        ("s/b", None, None),
    ]


def test_a_broken_shard_is_named(tmp_path):
    put_files(tmp_path, {"bad.tar": b"\x00garbage" * 20 + b"x" * 600})
    with pytest.raises(DatasetError, match=r"bad\.tar is not a readable tar archive"):
        read(tmp_path, format="webdataset")


class CountingStore(LocalStore):
    """The local store, counting the bytes its streams have handed out."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def open_stream(self, uri: str, offset: int = 0) -> IO[bytes]:
        store = self

        class Counting(io.RawIOBase):
            def __init__(self, inner: IO[bytes]) -> None:
                self.inner = inner

            def readable(self) -> bool:
                return True

            def readinto(self, buffer) -> int:
                data = self.inner.read(len(buffer))
                buffer[: len(data)] = data
                store.read_bytes += len(data)
                return len(data)

            def close(self) -> None:
                self.inner.close()
                super().close()

        return Counting(super().open_stream(uri, offset))  # type: ignore[return-value]


def test_webdataset_is_streamed_not_downloaded_whole(tmp_path):
    # 200 samples of 64 KiB: a 13 MB shard. The first pair must come out long before its end.
    pairs = {f"{i:05d}.jpg": (bytes([i % 256]) * 65536, f"caption {i}") for i in range(200)}
    write_webdataset(tmp_path, pairs, shard_size=200)
    size = (tmp_path / "shard-00000.tar").stat().st_size
    store = CountingStore()
    stream = iter_pairs(spec(tmp_path), store, workers=1)
    first = next(stream)
    read_at_first = store.read_bytes
    rest = list(stream)
    assert first.key == "shard-00000/00000" and len(rest) == 199
    assert read_at_first < size / 4, (read_at_first, size)
    assert store.read_bytes >= size - 10240  # the whole shard was read in the end


def test_class_folders_get_captions_from_the_template(tmp_path):
    write_class_dataset(
        tmp_path,
        {
            "n02085620-Chihuahua": {"a.jpg": jpeg(1), "b.jpg": jpeg(2)},
            "001.Black_footed_Albatross": {"c.jpg": jpeg(3)},
        },
    )
    got = read(tmp_path, captionTemplate="a photo of a {class}")
    assert [(p.key, p.caption) for p in got] == [
        ("001.Black_footed_Albatross/c", "a photo of a Black footed Albatross"),
        ("n02085620-Chihuahua/a", "a photo of a Chihuahua"),
        ("n02085620-Chihuahua/b", "a photo of a Chihuahua"),
    ]


def test_class_folders_without_a_template_are_refused(tmp_path):
    write_class_dataset(tmp_path, {"dog": {"a.jpg": jpeg(1)}})
    with pytest.raises(DatasetError, match=r"captionTemplate with \{class\}"):
        read(tmp_path, format="classes")
    with pytest.raises(DatasetError, match=r"captionTemplate with \{class\}"):
        read(tmp_path, format="classes", captionTemplate="a photo")


def test_class_name_strips_dataset_ids():
    assert class_name("n02085620-Chihuahua") == "Chihuahua"
    assert class_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert class_name("golden_retriever") == "golden retriever"


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("folder", "folder"),
        ("jsonl", "jsonl"),
        ("webdataset", "webdataset"),
        ("classes", "classes"),
    ],
)
def test_auto_detection(tmp_path, layout, expected):
    pairs = clean_pairs(2)
    if layout == "folder":
        write_folder_dataset(tmp_path, pairs)
    elif layout == "jsonl":
        write_jsonl_dataset(tmp_path, pairs, folder="train")
    elif layout == "webdataset":
        write_webdataset(tmp_path, pairs)
    else:
        write_class_dataset(tmp_path, {"dog": {"a.jpg": jpeg(1)}, "cat": {"b.jpg": jpeg(2)}})
    kw: dict[str, Any] = {"captionTemplate": "a {class}"} if layout == "classes" else {}
    assert detect_format(spec(tmp_path, **kw), LocalStore()) == expected
    assert len(read(tmp_path, **kw)) == 2


def test_a_single_shard_uri_is_read(tmp_path):
    write_webdataset(tmp_path, clean_pairs(3))
    assert len(read(tmp_path / "shard-00000.tar")) == 3


def test_empty_missing_and_imageless_folders_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset.uri .* is empty: no files under this prefix"):
        read(tmp_path)
    with pytest.raises(DatasetError, match=r"does not exist"):
        read(tmp_path / "nope")
    put_files(tmp_path, {"labels.csv": b"a,b\n"})
    with pytest.raises(DatasetError, match=r"holds no images .* \(found e\.g\. labels\.csv"):
        read(tmp_path)


def test_relative_and_slashed_local_paths_give_the_same_keys(tmp_path, monkeypatch):
    write_folder_dataset(tmp_path / "data", clean_pairs(2))
    monkeypatch.chdir(tmp_path)
    for uri in ("data", "./data/", "data//", str(tmp_path / "data") + "/"):
        assert [p.key for p in read(uri)] == ["img000", "img001"], uri
