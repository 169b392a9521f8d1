"""The object store is a real MinIO server: objects round-trip and bad credentials are refused."""

from __future__ import annotations

import io
import os

import pytest
from minio import Minio
from minio.error import S3Error


def test_objects_round_trip(s3):
    mc = s3.client()
    payload = os.urandom(3 * 1024 * 1024 + 17)  # crosses a multipart boundary of nothing, but big
    keys = ["data/a.jpg", "data/a.txt", "data/sub/b.png", "other/c.bin"]
    for key in keys:
        mc.put_object(s3.bucket, key, io.BytesIO(payload), len(payload))
    listed = sorted(
        o.object_name for o in mc.list_objects(s3.bucket, prefix="data/", recursive=True)
    )
    assert listed == ["data/a.jpg", "data/a.txt", "data/sub/b.png"]
    resp = mc.get_object(s3.bucket, "data/sub/b.png")
    try:
        assert resp.read() == payload
    finally:
        resp.close()
        resp.release_conn()
    mc.remove_object(s3.bucket, "data/a.jpg")
    remaining = sorted(o.object_name for o in mc.list_objects(s3.bucket, recursive=True))
    assert remaining == ["data/a.txt", "data/sub/b.png", "other/c.bin"]


def test_each_test_gets_a_fresh_empty_bucket(s3):
    mc = s3.client()
    assert mc.bucket_exists(s3.bucket)
    assert list(mc.list_objects(s3.bucket, recursive=True)) == []


def test_wrong_credentials_are_refused(s3):
    bad = Minio(s3.endpoint, access_key=s3.access_key, secret_key="not-the-secret", secure=False)
    with pytest.raises(S3Error) as info:
        list(bad.list_objects(s3.bucket))
    assert info.value.code == "SignatureDoesNotMatch"
