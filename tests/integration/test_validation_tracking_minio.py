"""The validation loss and the samples' CLIP score in the resource's status (the real API
server's schema), the CLIP model fetched from the real MinIO, and TensorBoard's event files
committed there beside the samples."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from kubernetes import client

from difftrain import api
from difftrain.storage import FILE_MANIFEST_SUFFIX
from difftrain.train.report import ConsoleReporter, Reporters, StatusReporter
from difftrain.train.run import RunOptions, run_training
from tests.integration.resources import create
from tests.minio_jobs import on_minio, store_config, upload_folder
from tests.training import prepare_local_inputs, tiny_job, write_tiny_clip_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("crds_installed")]
PLURAL = "diffusiontrainingjobs"


def test_validation_in_status_and_tensorboard_files_in_minio(
    kube_api, namespace, s3, tmp_path: Path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    inputs = prepare_local_inputs(tmp_path / "inputs", images=16)
    clip = write_tiny_clip_model(tmp_path / "clip")
    (clip / "pytorch_model.bin").write_bytes(b"a pickle beside the safetensors: never fetched")
    mc = s3.client()
    for folder, prefix in (
        (inputs / "base-model", "models/tiny"),
        (inputs / "dataset", "data"),
        (clip, "models/clip"),
    ):
        upload_folder(s3, folder, prefix)
    job = tiny_job(
        inputs,
        tmp_path / "unused",
        hyperparameters={"batchSize": 2, "maxSteps": 4, "warmupSteps": 1, "mixedPrecision": "no"},
        checkpointing={"everySteps": 2, "keepLast": 1},
        sampling={
            "everySteps": 2,
            "numInferenceSteps": 1,
            "prompts": ["a red circle", "a blue square"],
            "clipModelUri": s3.uri("models/clip"),
        },
        validation={"fraction": 0.25, "everySteps": 2, "timesteps": [300, 700], "maxImages": 2},
    )
    spec = on_minio(job, s3, model="models/tiny", output="runs/val")["spec"]
    spec["dataset"]["uri"] = s3.uri("data")
    job["metadata"] = {"name": "val"}
    create(kube_api, namespace, job)
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    seen: list[api.ValidationStatus] = []
    scored: list[api.ClipScoreStatus] = []

    class Seen(ConsoleReporter):
        def validation(self, status: api.ValidationStatus) -> None:
            seen.append(status)

        def clip_score(self, status: api.ClipScoreStatus) -> None:
            scored.append(status)

    options = RunOptions(
        work_dir=tmp_path / "work",
        store_config=store_config(s3),
        job_name="val",
        namespace=namespace,
        reporter=Reporters(
            Seen(bar=False), StatusReporter("val", namespace, interval=0.0, api_client=kube_api)
        ),
    )
    outcome = run_training(resource, options)

    # the status holds the newest validation loss, as the CRD's schema keeps it
    status = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, PLURAL, "val"
    )["status"]
    assert [v.step for v in seen] == [2, 4]
    assert status["validation"] == {
        "loss": pytest.approx(seen[-1].loss),
        "step": 4,
        "images": 2,
        "weights": "trained",
    }
    # and the newest samples' CLIP score, from the model fetched out of MinIO (no pickle)
    assert [(c.step, c.images) for c in scored] == [(2, 2), (4, 2)]
    assert status["clipScore"] == {
        "score": pytest.approx(scored[-1].score),
        "step": 4,
        "images": 2,
        "weights": "trained",
    }
    fetched = {p.name for p in (tmp_path / "work" / "clip-model").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= fetched
    assert "pytorch_model.bin" not in fetched

    # every event file is committed with its manifest (size and sha256 of what was uploaded)
    prefix = "runs/val/tracking/tensorboard/difftrain/"
    names = [o.object_name for o in mc.list_objects(s3.bucket, prefix, recursive=True)]
    events = [n for n in names if "tfevents" in n and not n.endswith(FILE_MANIFEST_SUFFIX)]
    assert events, names
    local = tmp_path / "tb"
    for name in events:
        data = mc.get_object(s3.bucket, name).read()
        manifest = json.loads(mc.get_object(s3.bucket, name + FILE_MANIFEST_SUFFIX).read())
        entry = manifest["files"][0]
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        target = local / name.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    assert mc.stat_object(s3.bucket, "runs/val/samples/step-00000004/grid.png")

    acc = EventAccumulator(str(local), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx(outcome.loop.losses, rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("validation/loss")] == [
        (v.step, pytest.approx(v.loss, rel=1e-6)) for v in seen
    ]
    assert [(e.step, e.value) for e in acc.Scalars("samples/clip_score")] == [
        (c.step, pytest.approx(c.score, rel=1e-6)) for c in scored
    ]
    assert [e.step for e in acc.Images("samples")] == [2, 4]
