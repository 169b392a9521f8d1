"""Each image of a dataset in the real MinIO is downloaded once per job: cleaning's read leaves a
local copy that every later read of the job uses (the latent cache's encoding, the batches of an
uncached run's every epoch), checked against the sha256 cleaning judged."""

from __future__ import annotations

from pathlib import Path

import pytest

from difftrain.api import DatasetSpec
from difftrain.data.copies import SCRATCH_ENV, ImageCopies, copies_limit, with_copies
from difftrain.data.image_bytes import read_image
from difftrain.storage import S3Store
from difftrain.train.run import RunOptions, run_training
from difftrain.train.shared_data import clean_dataset
from tests.datasets import S3Location, put_files
from tests.latent_fixtures import shape_png
from tests.minio_jobs import store_config
from tests.store_reads import CountsReads
from tests.training import prepare_local_inputs, tiny_job

pytestmark = pytest.mark.integration


class CountingS3Store(CountsReads, S3Store):
    """The real S3 store, counting the reads of each object."""


def put_dataset(s3, prefix: str, count: int) -> None:
    files: dict[str, bytes] = {}
    for i in range(count):
        data, caption = shape_png(i)
        files[f"img{i}.png"] = data
        files[f"img{i}.txt"] = f"{caption}, picture {i}".encode()
    put_files(S3Location(s3.client(), s3.bucket, prefix), files)


def test_cleanings_read_leaves_the_copies_later_reads_use(s3, tmp_path: Path):
    put_dataset(s3, "copies", 4)
    counting = CountingS3Store(store_config(s3))
    store = with_copies(counting, tmp_path / "work")
    assert isinstance(store, ImageCopies)
    spec = DatasetSpec(uri=s3.uri("copies"), cleaning={"minResolution": 32})
    pairs = clean_dataset(spec, store).pairs
    assert len(pairs) == 4
    after_cleaning = dict(counting.reads)
    assert all(n == 1 for n in after_cleaning.values()) and len(after_cleaning) == 8
    first = [read_image(store, p) for p in pairs]
    assert counting.reads == after_cleaning, "kept images are read from their copies"

    # a copy that is not the image cleaning judged is never used: the store is read instead
    store.path(pairs[0].name).write_bytes(b"not the image")
    assert read_image(store, pairs[0]) == first[0]
    assert counting.reads[pairs[0].name] == 2

    # with no room for copies every read goes to the store, as before
    tight = ImageCopies(counting, tmp_path / "tight", limit=0)
    tight_pairs = clean_dataset(spec, tight).pairs
    assert [read_image(tight, p) for p in tight_pairs] == first
    assert not list((tmp_path / "tight").rglob("*")), "no copy written"


def test_a_local_dataset_is_read_where_it_is(tmp_path: Path):
    from difftrain.storage import LocalStore

    local = LocalStore()
    assert with_copies(local, tmp_path) is local


def test_copies_take_a_share_of_the_pods_scratch_limit_and_half_the_free_space(tmp_path: Path):
    free_half = copies_limit(tmp_path, {})
    assert free_half > 0
    assert copies_limit(tmp_path, {SCRATCH_ENV: str(8 << 30)}) == min(free_half, 2 << 30)
    assert copies_limit(tmp_path, {SCRATCH_ENV: "0"}) == free_half  # no limit given


@pytest.mark.parametrize("several", [False, True], ids=["dataset", "datasets"])
def test_an_uncached_run_downloads_each_image_once_over_its_epochs(
    s3, tmp_path: Path, monkeypatch, several: bool
):
    """8 images, 24 drawn over three epochs, each downloaded once; with spec.datasets the 8 are
    two datasets of 4 (weights 1:1), every dataset's store read through the copies."""
    inputs = prepare_local_inputs(tmp_path / "inputs", images=8)
    folder = inputs / "dataset"
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    if several:
        halves = {"a": sorted(files)[:8], "b": sorted(files)[8:]}  # 4 images + captions each
        for name, rels in halves.items():
            put_files(
                S3Location(s3.client(), s3.bucket, f"uncached/{name}"), {r: files[r] for r in rels}
            )
    else:
        put_files(S3Location(s3.client(), s3.bucket, "uncached"), files)
    job = tiny_job(
        inputs,
        tmp_path / "out",
        hyperparameters={"batchSize": 4, "maxSteps": 6, "warmupSteps": 1, "mixedPrecision": "no"},
        preprocessing={"resolution": 64, "flipProbability": 0.5, "cacheLatents": False},
        checkpointing={"everySteps": 100, "keepLast": 1},
    )
    job["spec"]["dataset"]["uri"] = s3.uri("uncached")
    if several:
        one = job["spec"].pop("dataset")
        job["spec"]["datasets"] = [{**one, "uri": s3.uri(f"uncached/{n}")} for n in ("a", "b")]
    job["spec"]["storage"] = {"endpoint": s3.endpoint, "secure": False, "secretRef": {"name": "k"}}
    stores: list[CountingS3Store] = []

    def counting_store(uri: str, config):
        store = CountingS3Store(config) if uri.startswith("s3://") else None
        if store is None:
            from difftrain.storage import LocalStore

            return LocalStore()
        stores.append(store)
        return store

    monkeypatch.setattr("difftrain.train.run.open_store", counting_store)
    from difftrain import api

    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    outcome = run_training(
        resource, RunOptions(work_dir=tmp_path / "work", store_config=store_config(s3))
    )
    assert outcome.loop.state.step == 6  # 24 images drawn from 8: three epochs
    images = {uri: n for store in stores for uri, n in store.reads.items() if uri.endswith(".png")}
    assert len(images) == 8 and set(images.values()) == {1}, images
    copies = list((tmp_path / "work" / "image-copies").rglob("*"))
    assert sum(p.is_file() for p in copies) == 8
