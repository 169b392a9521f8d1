"""Tiny training jobs that read and write the real MinIO of the test environment: the inputs'
folders uploaded, the job's URIs and storage block pointed at the bucket, the run's store config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difftrain.storage import Credentials, StoreConfig
from tests.datasets import S3Location, put_files


def upload_folder(s3: Any, folder: Path, prefix: str) -> None:
    """Every file under ``folder`` to ``prefix`` of the test's bucket, at the same relative path."""
    files = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    put_files(S3Location(s3.client(), s3.bucket, prefix), files)


def on_minio(
    job: dict[str, Any], s3: Any, *, model: str, output: str, secret: str = "keys"
) -> dict[str, Any]:
    """``job`` with its base model, output and storage in the test's bucket (``model`` and
    ``output`` are prefixes there); the dataset's URI is left to the test."""
    spec = job["spec"]
    spec["baseModel"] = {"uri": s3.uri(model)}
    spec["output"] = {**spec.get("output", {}), "uri": s3.uri(output)}
    spec["storage"] = {"endpoint": s3.endpoint, "secure": False, "secretRef": {"name": secret}}
    return job


def store_config(s3: Any) -> StoreConfig:
    """How a run reaches the test's MinIO (the keys a pod would get from the secretRef)."""
    return StoreConfig(
        endpoint=s3.endpoint,
        credentials=Credentials(s3.access_key, s3.secret_key),
        secure=False,
    )
