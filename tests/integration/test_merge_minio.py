"""Merges read from and write to a real MinIO: streamed inputs, committed output, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from difftrain import api
from difftrain.merge.engine import merge
from difftrain.storage import Credentials, StorageError, StoreConfig
from tests.sd_checkpoints import checkpoint_shapes, write_checkpoint


@pytest.fixture
def uploaded(s3, tmp_path):
    shapes = checkpoint_shapes("sd1", tiny=True)
    mc = s3.client()
    local = {}
    for seed, name in enumerate(["a", "b"]):
        path = write_checkpoint(tmp_path / f"{name}.safetensors", shapes, seed)
        mc.fput_object(s3.bucket, f"models/{name}.safetensors", str(path))
        local[name] = path
    return local


def config(s3, secret: str | None = None) -> StoreConfig:
    return StoreConfig(
        endpoint=s3.endpoint,
        secure=False,
        credentials=Credentials(s3.access_key, secret or s3.secret_key),
    )


def merge_spec(s3, **extra) -> api.ModelMergeSpec:
    body = {
        "models": [
            {"uri": s3.uri("models/a.safetensors")},
            {"uri": s3.uri("models/b.safetensors")},
        ],
        "output": {"uri": s3.uri("merged/out.safetensors")},
        "storage": {"endpoint": s3.endpoint, "secure": False, "secretRef": {"name": "creds"}},
        "outputDtype": "fp32",
        "alpha": 0.25,
        **extra,
    }
    parsed = api.parse_spec("ModelMerge", body)
    assert isinstance(parsed, api.ModelMergeSpec)
    return parsed


def test_merge_round_trips_through_minio(s3, uploaded, tmp_path):
    result = merge(merge_spec(s3), config(s3))
    mc = s3.client()
    names = sorted(o.object_name for o in mc.list_objects(s3.bucket, "merged/", recursive=True))
    assert names == ["merged/out.safetensors", "merged/out.safetensors.manifest.json"]
    mc.fget_object(s3.bucket, "merged/out.safetensors", str(tmp_path / "out.safetensors"))
    data = (tmp_path / "out.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == result.sha256
    out, a, b = (load_file(p) for p in (tmp_path / "out.safetensors", uploaded["a"], uploaded["b"]))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    torch.testing.assert_close(out[key], 0.75 * a[key].float() + 0.25 * b[key].float())
    manifest = json.loads(mc.get_object(s3.bucket, "merged/out.safetensors.manifest.json").read())
    assert manifest["files"][0]["sha256"] == result.sha256
    assert (
        result.input_sha256["models[0]"] == hashlib.sha256(uploaded["a"].read_bytes()).hexdigest()
    )


def test_wrong_credentials_and_missing_bucket_are_named(s3, uploaded):
    with pytest.raises(StorageError, match="access refused") as info:
        merge(merge_spec(s3), config(s3, secret="wrong-secret"))
    assert s3.endpoint in str(info.value)
    missing = merge_spec(
        s3,
        models=[
            {"uri": "s3://no-such-bucket/a.safetensors"},
            {"uri": s3.uri("models/b.safetensors")},
        ],
    )
    with pytest.raises(StorageError, match=r"'no-such-bucket' .* does not exist"):
        merge(missing, config(s3))


def test_cli_merges_a_model_merge_resource(s3, uploaded, tmp_path):
    resource = {
        "apiVersion": api.API_VERSION,
        "kind": "ModelMerge",
        "metadata": {"name": "mix"},
        "spec": merge_spec(s3).to_wire(),
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(resource))
    env = dict(
        os.environ,
        DIFFTRAIN_STORE_ACCESS_KEY=s3.access_key,
        DIFFTRAIN_STORE_SECRET_KEY=s3.secret_key,
    )
    result = subprocess.run(
        [sys.executable, "-m", "difftrain.cli", "merge", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["outputUri"] == s3.uri("merged/out.safetensors")
    assert summary["shortHash"] == summary["sha256"][:10]
    env["DIFFTRAIN_STORE_SECRET_KEY"] = "wrong"
    result = subprocess.run(
        [sys.executable, "-m", "difftrain.cli", "merge", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == api.EXIT_CONFIG_ERROR  # no retry can fix refused credentials
    assert "merge refused" in result.stderr and "access refused" in result.stderr
    termination = tmp_path / "termination-log"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "difftrain.cli",
            "merge",
            str(path),
            "--termination-log",
            str(termination),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "access refused" in termination.read_text()
    assert "Traceback" not in result.stderr
