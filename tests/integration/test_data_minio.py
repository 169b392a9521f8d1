"""The dataset pipeline against the real MinIO: same report as from a folder, every layout,
shards streamed, and clear failures for an empty prefix, a missing bucket and wrong keys."""

from __future__ import annotations

import io
from typing import IO

import pytest

from difftrain.api import EXIT_CONFIG_ERROR, DatasetSpec
from difftrain.cli import main
from difftrain.data import DatasetError, iter_pairs, load_dataset, read_report, write_report
from difftrain.storage import Credentials, LocalStore, S3Store, StorageError, StoreConfig
from tests.datasets import (
    S3Location,
    clean_pairs,
    dirty_dataset,
    jpeg,
    mixed_dataset,
    put_files,
    write_class_dataset,
    write_folder_dataset,
    write_jsonl_dataset,
    write_webdataset,
)


def store_for(s3, secret: str | None = None) -> S3Store:
    creds = Credentials(s3.access_key, secret or s3.secret_key)
    return S3Store(StoreConfig(endpoint=s3.endpoint, credentials=creds, secure=False))


def spec(uri: str, **kw) -> DatasetSpec:
    return DatasetSpec.model_validate({"uri": uri, **kw})


def words(caption: str) -> int:
    return len(caption.split())


def test_dirty_dataset_gives_the_same_report_from_minio_as_from_a_folder(s3, tmp_path):
    dirty = dirty_dataset()
    uri = write_folder_dataset(S3Location(s3.client(), s3.bucket, "dirty"), dirty.pairs)
    write_folder_dataset(tmp_path, dirty.pairs)
    remote = load_dataset(
        spec(uri, cleaning=dirty.cleaning), store_for(s3), count_tokens=words, max_tokens=10
    )
    local = load_dataset(
        spec(str(tmp_path), cleaning=dirty.cleaning),
        LocalStore(),
        count_tokens=words,
        max_tokens=10,
    )
    assert remote.report.dropped == dirty.dropped
    assert remote.report.examples == dirty.examples
    assert remote.report == local.report
    assert [(p.key, p.sha256, p.caption) for p in remote.pairs] == [
        (p.key, p.sha256, p.caption) for p in local.pairs
    ]
    assert remote.pairs[0].name == f"{uri}/{remote.pairs[0].key}.jpg"


def test_report_is_committed_to_minio_and_read_back(s3):
    dirty = dirty_dataset()
    uri = write_folder_dataset(S3Location(s3.client(), s3.bucket, "data"), dirty.pairs)
    store = store_for(s3)
    result = load_dataset(spec(uri, cleaning=dirty.cleaning), store)
    prefix = f"s3://{s3.bucket}/data/.difftrain-cache/abc"
    assert write_report(store, prefix, result) == f"{prefix}/dataset_report.json"
    assert store.exists(f"{prefix}/dataset_report.json.manifest.json")
    assert read_report(store, prefix) == result.report
    # the report and cache beside the data (a hidden folder) are not read as part of it
    assert [p.key for p in iter_pairs(spec(uri), store)] == sorted(
        k.rsplit(".", 1)[0] for k in dirty.pairs
    )


@pytest.mark.parametrize("layout", ["folder", "jsonl", "webdataset", "classes"])
def test_every_layout_is_read_from_minio(s3, layout):
    dest = S3Location(s3.client(), s3.bucket, f"ds-{layout}")
    pairs = clean_pairs(5)
    kw = {}
    if layout == "folder":
        uri = write_folder_dataset(dest, pairs)
    elif layout == "jsonl":
        uri = write_jsonl_dataset(dest, pairs, column="caption", folder="images")
        kw = {"captionColumn": "caption"}
    elif layout == "webdataset":
        uri = write_webdataset(dest, pairs, shard_size=2)
    else:
        images = {name: data for name, (data, _) in pairs.items()}
        uri = write_class_dataset(dest, {"n02085620-Chihuahua": images})
        kw = {"captionTemplate": "a photo of a {class}"}
    got = list(iter_pairs(spec(uri, **kw), store_for(s3)))
    assert [p.data for p in got] == [data for data, _ in pairs.values()]
    expected = (
        ["a photo of a Chihuahua"] * 5
        if layout == "classes"
        else [caption for _, caption in pairs.values()]
    )
    assert [p.caption for p in got] == expected


class CountingS3Store(S3Store):
    """The real S3 store, counting the bytes its streams hand out."""

    read_bytes = 0

    def open_stream(self, uri: str, offset: int = 0) -> IO[bytes]:
        inner = super().open_stream(uri, offset)
        store = self

        class Counting(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, buffer) -> int:
                data = inner.read(len(buffer))
                buffer[: len(data)] = data
                store.read_bytes += len(data)
                return len(data)

            def close(self) -> None:
                inner.close()
                super().close()

        return Counting()  # type: ignore[return-value]


def test_webdataset_shard_is_streamed_from_minio(s3):
    pairs = {f"{i:05d}.jpg": (bytes([i % 256]) * 65536, f"caption {i}") for i in range(160)}
    uri = write_webdataset(S3Location(s3.client(), s3.bucket, "wds"), pairs, shard_size=160)
    store = CountingS3Store(store_for(s3).config)
    size = store.size(f"{uri}/shard-00000.tar")
    stream = iter_pairs(spec(uri), store, workers=1)
    first = next(stream)
    at_first = store.read_bytes
    assert first.caption == "caption 0" and len(list(stream)) == 159
    assert at_first < size / 4, (at_first, size)


def test_empty_prefix_missing_bucket_and_wrong_keys_are_named(s3):
    s3.client().put_object(s3.bucket, "other/a.jpg", io.BytesIO(jpeg(1)), len(jpeg(1)))
    with pytest.raises(DatasetError) as empty:
        list(iter_pairs(spec(f"s3://{s3.bucket}/nothing-here"), store_for(s3)))
    assert f"s3://{s3.bucket}/nothing-here" in str(empty.value)
    assert s3.endpoint in str(empty.value) and "is empty" in str(empty.value)
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' at .* does not exist"):
        list(iter_pairs(spec("s3://no-such-bucket/data"), store_for(s3)))
    with pytest.raises(StorageError, match=r"access refused \(SignatureDoesNotMatch\)") as bad:
        list(iter_pairs(spec(f"s3://{s3.bucket}/other"), store_for(s3, secret="wrong-secret")))
    assert s3.bucket in str(bad.value) and s3.endpoint in str(bad.value)


def cli_check(s3, monkeypatch, capsys, uri: str, secret: str | None = None, *flags: str):
    monkeypatch.setenv("DIFFTRAIN_STORE_ACCESS_KEY", s3.access_key)
    monkeypatch.setenv("DIFFTRAIN_STORE_SECRET_KEY", secret or s3.secret_key)
    code = main(["dataset", "check", uri, "--endpoint", s3.endpoint, "--insecure", *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_check_on_minio_prints_the_counts(s3, monkeypatch, capsys):
    dirty = dirty_dataset()
    uri = write_folder_dataset(S3Location(s3.client(), s3.bucket, "dirty"), dirty.pairs)
    flags = ("--min-resolution", "64", "--min-caption-words", "2", "--banned-word", "watermark")
    code, out, err = cli_check(s3, monkeypatch, capsys, uri, None, *flags)
    assert code == 0, err
    assert f"dataset {uri}" in out
    for reason, count in dirty.dropped.items():
        (line,) = [x for x in out.splitlines() if x.strip().startswith(reason + " ")]
        assert line.split()[1] == str(count)


@pytest.mark.parametrize(
    ("where", "secret", "message"),
    [
        ("s3://{bucket}/empty-prefix", None, "is empty: no files under this prefix"),
        ("s3://no-such-bucket/data", None, "bucket 'no-such-bucket' at {endpoint} does not exist"),
        ("s3://{bucket}/data", "wrong-secret", "access refused (SignatureDoesNotMatch)"),
    ],
)
def test_cli_failures_are_one_line_with_exit_3(s3, monkeypatch, capsys, where, secret, message):
    s3.client().put_object(s3.bucket, "data/a.jpg", io.BytesIO(jpeg(1)), len(jpeg(1)))
    uri = where.format(bucket=s3.bucket)
    code, _, err = cli_check(s3, monkeypatch, capsys, uri, secret)
    assert code == EXIT_CONFIG_ERROR
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dataset check: ")
    assert message.format(endpoint=s3.endpoint) in lines[0]


def test_report_over_a_mixed_bucket_counts_every_object(s3, monkeypatch, capsys):
    """Every object under the prefix ends up kept or under one reason, from MinIO as from a
    folder; GIF, BMP, TIFF, WebP (and AVIF) are read; `dataset check` prints each reason."""
    mixed = mixed_dataset()
    dest = S3Location(s3.client(), s3.bucket, "mixed")
    put_files(dest, mixed.files)
    uri = dest.uri()
    store = store_for(s3)
    objects = list(store.list(f"{uri}/"))
    assert len(objects) == len(mixed.files)
    result = load_dataset(spec(uri, cleaning={"minResolution": 64, "minCaptionWords": 2}), store)
    report = result.report
    assert sorted(p.key for p in result.pairs) == mixed.kept
    assert report.dropped == mixed.dropped and report.notes == mixed.notes
    assert report.examples == mixed.examples
    captions_paired = sum(1 for k in mixed.files if k.endswith(".txt")) - mixed.dropped.get(
        "orphan_caption", 0
    )
    # each object once: an image with its caption file as one, every other object on its own
    assert report.total == len(objects) - captions_paired == mixed.total
    assert report.total == report.kept + sum(report.dropped.values())

    code, out, err = cli_check(
        s3, monkeypatch, capsys, uri, None, "--min-resolution", "64", "--min-caption-words", "2"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert [x.split() for x in lines[1:3]] == [
        ["total", str(mixed.total)],
        ["kept", str(len(mixed.kept))],
    ]
    for reason, count in mixed.dropped.items():
        (line,) = [x for x in lines if x.strip().startswith(reason + " ")]
        assert line.split()[1] == str(count)
        assert any(x.startswith(f"{reason}: ") for x in lines)  # and what it means
    assert "first_frame_only" in out and "d_animated" in out
