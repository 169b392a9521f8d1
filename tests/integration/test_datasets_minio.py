"""Several datasets in one job, on the real MinIO: each cleaned and cached beside itself, every
file of each counted in the report (and the resource's status, through the API server's schema),
and each epoch drawing from them by their weights, as the text encoder sees it step by step."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from kubernetes import client
from PIL import Image
from transformers import CLIPTokenizer

from difftrain import api
from difftrain.cli import main
from difftrain.data.cache import CACHE_FOLDER, INDEX_FOLDER
from difftrain.train.report import Reporters, StatusReporter
from difftrain.train.run import RunOptions, run_training
from difftrain.train.synthetic import write_shapes_dataset
from tests.integration.resources import create
from tests.minio_jobs import on_minio, store_config, upload_folder
from tests.training import TextEncoderCalls, prepare_local_inputs, tiny_job, write_job

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("crds_installed")]


def test_two_weighted_datasets_train_by_their_shares(
    kube_api, namespace, s3, tmp_path: Path, monkeypatch, capsys
):
    """Dataset a (3 images and one too small) with weight 2, dataset b (5 images, a copy of one
    of a's, and a file that is no image) with weight 1: an epoch of 3 + 6 = 9 examples is 6 of
    a's (each image twice) and 3 of b's, b giving other images in the second epoch; the copy is
    kept (duplicates are only looked for within a dataset); the report counts all 11 files.
    `difftrain dataset cache --job` caches both datasets beforehand, beside each, and the run
    finds every sample there."""
    inputs = prepare_local_inputs(tmp_path / "inputs", images=4)
    tokenizer = CLIPTokenizer.from_pretrained(inputs / "base-model" / "tokenizer")
    a = write_shapes_dataset(tmp_path / "a", 3, size=64, seed=0, backgrounds=("white",))
    Image.new("RGB", (16, 16), "red").save(a / "small.png")
    (a / "small.txt").write_text("a red square on a white background")
    b = write_shapes_dataset(tmp_path / "b", 5, size=64, seed=1, backgrounds=("black",))
    shutil.copy(a / "00000.png", b / "copy.png")
    (b / "copy.txt").write_text("a yellow triangle on a black background")
    (b / "notes.md").write_text("not an image")
    mc = s3.client()
    upload_folder(s3, inputs / "base-model", "models/tiny")
    upload_folder(s3, a, "data/a")
    upload_folder(s3, b, "data/b")
    captions = {
        "a": {(a / f"{i:05d}.txt").read_text() for i in range(3)},
        "b": {(b / f"{i:05d}.txt").read_text() for i in range(5)} | {(b / "copy.txt").read_text()},
    }

    job = tiny_job(
        inputs,
        tmp_path / "unused",
        hyperparameters={"batchSize": 3, "epochs": 2, "warmupSteps": 0, "mixedPrecision": "no"},
        checkpointing={"everySteps": 100, "keepLast": 1},
        sampling={"everySteps": 0, "numInferenceSteps": 1, "prompts": ["a photo"]},
        method="lora",
        lora={"rank": 2},
    )
    spec = on_minio(job, s3, model="models/tiny", output="runs/mix")["spec"]
    own = {k: v for k, v in spec.pop("dataset").items() if k != "uri"}
    # shuffleTags on one-tag captions: the text is as written, but encoded in each step
    varying = {**own, "captions": {"shuffleTags": True}}
    spec["datasets"] = [
        {**varying, "uri": s3.uri("data/a"), "weight": 2},
        {**varying, "uri": s3.uri("data/b")},
    ]
    spec["preprocessing"]["flipProbability"] = 0.0
    spec["output"]["formats"] = ["lora_peft"]
    job["metadata"] = {"name": "mix"}
    create(kube_api, namespace, job)  # the API server takes spec.datasets
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)

    # the job's datasets cached ahead, each beside itself, by the job's own file and store
    monkeypatch.setenv("DIFFTRAIN_STORE_ACCESS_KEY", s3.access_key)
    monkeypatch.setenv("DIFFTRAIN_STORE_SECRET_KEY", s3.secret_key)
    capsys.readouterr()
    assert (
        main(["dataset", "cache", "--job", str(write_job(tmp_path / "job.yaml", job)), "--json"])
        == 0
    )
    ahead = json.loads(capsys.readouterr().out)["datasets"]
    assert [(o["uri"], o["samples"], o["hit"]) for o in ahead] == [
        (s3.uri(f"data/a/{CACHE_FOLDER}"), 3, False),
        (s3.uri(f"data/b/{CACHE_FOLDER}"), 6, False),
    ]

    options = RunOptions(
        work_dir=tmp_path / "work",
        store_config=store_config(s3),
        job_name="mix",
        namespace=namespace,
    )
    with TextEncoderCalls() as seen:
        options.reporter = Reporters(
            seen, StatusReporter("mix", namespace, interval=0.0, api_client=kube_api)
        )
        outcome = run_training(resource, options)

    assert outcome.cache_hit is True  # every latent found where the command put it
    # 9 examples an epoch, batch 3: 3 steps an epoch, 6 in all
    assert outcome.loop.state.step == 6 and outcome.loop.state.images_seen == 18
    assert sorted(seen.by_step) == [1, 2, 3, 4, 5, 6]
    width = tokenizer.model_max_length
    padded = {
        tuple(tokenizer(c, padding="max_length", max_length=width).input_ids): (name, c)
        for name, texts in captions.items()
        for c in texts
    }
    for epoch, steps in ((0, (1, 2, 3)), (1, (4, 5, 6))):
        rows = [padded[tuple(row)] for step in steps for row in seen.by_step[step]]
        per_dataset = Counter(name for name, _ in rows)
        assert per_dataset == {"a": 6, "b": 3}, (epoch, per_dataset)  # weights 2:1
        assert Counter(c for name, c in rows if name == "a") == {c: 2 for c in captions["a"]}
    b_rows = [padded[tuple(r)][1] for s in range(1, 7) for r in seen.by_step[s]]
    b_seen = [c for c in b_rows if c in captions["b"]]
    assert sorted(b_seen) == sorted(captions["b"])  # a different half of b in each epoch

    # the report: totals and each dataset's part, every file of both counted
    report = outcome.report
    assert (report.total, report.kept) == (11, 9)
    assert report.dropped == {"unsupported_format": 1, "too_small": 1}
    assert report.examples["too_small"] == ["0:small"]
    assert [e.split(":", 1)[0] for e in report.examples["unsupported_format"]] == ["1"]
    parts = [
        (p.uri, p.weight, p.total, p.kept, p.dropped, p.examples_per_epoch) for p in report.datasets
    ]
    assert parts == [
        (s3.uri("data/a"), 2.0, 4, 3, {"too_small": 1}, 6),
        (s3.uri("data/b"), 1.0, 7, 6, {"unsupported_format": 1}, 3),
    ]
    assert [p.share for p in report.datasets] == [pytest.approx(2 / 3), pytest.approx(1 / 3)]
    committed = json.loads(mc.get_object(s3.bucket, "runs/mix/dataset/dataset_report.json").read())[
        "report"
    ]
    assert [d["kept"] for d in committed["datasets"]] == [3, 6]
    status = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, "diffusiontrainingjobs", "mix"
    )["status"]
    assert status["dataset"]["datasets"] == committed["datasets"]  # kept by the CRD's schema
    assert status["dataset"]["total"] == 11

    # each dataset's latents are cached beside it
    for prefix in ("data/a", "data/b"):
        index = f"{prefix}/{CACHE_FOLDER}/{INDEX_FOLDER}/"
        assert list(mc.list_objects(s3.bucket, index, recursive=True)), index
