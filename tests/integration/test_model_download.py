"""A base model in the real MinIO is downloaded once per work folder, even by concurrent processes.

The store is the real S3Store, subclassed only to record which objects it opens.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from difftrain.api.training import BaseModelSpec
from difftrain.models import build_tiny_pipeline_folder, load_base_model
from difftrain.models.components import file_sha256
from difftrain.models.exports import export_single_file
from difftrain.models.fetch import LOCK_NAME, MARKER_NAME
from difftrain.models.loading import fetch_folder
from difftrain.models.single_file import fetch_file
from difftrain.storage import Credentials, S3Store, StorageError, StoreConfig
from tests.integration.test_models_minio import upload
from tests.sd_checkpoints import checkpoint_shapes, write_checkpoint
from tests.weights import assert_same_weights


class CountingStore(S3Store):
    """The real store, recording every ``open_stream``; ``fail_after`` opens, it fails."""

    def __init__(
        self, config: StoreConfig, *, delay_s: float = 0.0, fail_after: int | None = None
    ) -> None:
        super().__init__(config)
        self.opened: list[str] = []
        self.delay_s = delay_s
        self.fail_after = fail_after

    def open_stream(self, uri: str, offset: int = 0) -> IO[bytes]:
        if self.fail_after is not None and len(self.opened) >= self.fail_after:
            raise StorageError(f"{uri}: connection reset (injected)", permanent=False)
        self.opened.append(uri)
        time.sleep(self.delay_s)  # a slow download: concurrent processes overlap
        return super().open_stream(uri, offset)


def config_of(s3: Any) -> StoreConfig:
    return StoreConfig(
        endpoint=s3.endpoint, secure=False, credentials=Credentials(s3.access_key, s3.secret_key)
    )


def cold_reads(uri: str, wanted: list[str]) -> Counter[str]:
    """What one fetch into an empty folder opens: each file, and unet/config.json checked first."""
    prefix = uri + "/"
    return Counter([prefix + "unet/config.json"] + [prefix + name for name in wanted])


def copied_files(work: Path) -> dict[str, str]:
    """sha256 of each file the work folder holds for loading (bookkeeping files left out)."""
    return {
        p.relative_to(work).as_posix(): file_sha256(p)
        for p in sorted(work.rglob("*"))
        if p.is_file() and p.name not in {LOCK_NAME, MARKER_NAME}
    }


def test_a_folder_loaded_twice_into_one_work_dir_is_downloaded_once(s3, tmp_path: Path) -> None:
    folder = build_tiny_pipeline_folder(tmp_path / "tiny")
    upload(s3, folder, "models/tiny")
    uri, work = s3.uri("models/tiny"), tmp_path / "work"
    spec = BaseModelSpec(uri=uri)

    first_store = CountingStore(config_of(s3))
    first = load_base_model(spec, first_store, work_dir=work)
    _, wanted = fetch_folder(uri, spec, CountingStore(config_of(s3)), work / "probe")
    assert Counter(first_store.opened) == cold_reads(uri, wanted)

    again_store = CountingStore(config_of(s3))
    again = load_base_model(spec, again_store, work_dir=work)
    assert again_store.opened == []
    assert again.identity == first.identity
    assert_same_weights(again.unet, first.unet)
    assert_same_weights(again.text_encoder, first.text_encoder)


def test_a_reuploaded_object_is_downloaded_again(s3, tmp_path: Path) -> None:
    folder = build_tiny_pipeline_folder(tmp_path / "tiny", seed=0)
    other = build_tiny_pipeline_folder(tmp_path / "other", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    # the same shapes, so the same size: only the ETag tells the two uploads apart
    assert (folder / weights).stat().st_size == (other / weights).stat().st_size
    assert file_sha256(folder / weights) != file_sha256(other / weights)
    upload(s3, folder, "models/tiny")
    uri, work = s3.uri("models/tiny"), tmp_path / "work"
    spec = BaseModelSpec(uri=uri)
    load_base_model(spec, CountingStore(config_of(s3)), work_dir=work)

    S3Store(config_of(s3)).put_file(other / weights, f"{uri}/{weights}")
    store = CountingStore(config_of(s3))
    reloaded = load_base_model(spec, store, work_dir=work)
    # the changed file only, after the UNet's config is checked in the store
    assert Counter(store.opened) == Counter([f"{uri}/unet/config.json", f"{uri}/{weights}"])
    assert file_sha256(work / "base" / weights) == file_sha256(other / weights)
    expected = load_base_model(BaseModelSpec(uri=str(other)), None, work_dir=tmp_path / "w")
    assert_same_weights(reloaded.unet, expected.unet)


def test_an_interrupted_download_is_not_taken_as_complete(s3, tmp_path: Path) -> None:
    folder = build_tiny_pipeline_folder(tmp_path / "tiny")
    upload(s3, folder, "models/tiny")
    uri, work = s3.uri("models/tiny"), tmp_path / "work"
    spec = BaseModelSpec(uri=uri)
    with pytest.raises(StorageError, match="injected"):
        fetch_folder(uri, spec, CountingStore(config_of(s3), fail_after=4), work)
    assert not (work / MARKER_NAME).exists()

    store = CountingStore(config_of(s3))
    _, wanted = fetch_folder(uri, spec, store, work)
    assert Counter(store.opened) == cold_reads(uri, wanted)
    assert copied_files(work) == {name: file_sha256(folder / name) for name in wanted}
    assert not [p for p in work.rglob("*.part-*")]


def _fetch_in_child(kind: str, config: StoreConfig, uri: str, dest: str, start: Any) -> list[str]:
    """One rank: wait for the other, fetch ``uri`` into the shared ``dest``; the objects opened."""
    store = CountingStore(config, delay_s=0.1)
    spec = BaseModelSpec(uri=uri)
    start.wait(timeout=120)
    if kind == "folder":
        fetch_folder(uri, spec, store, Path(dest))
    else:
        fetch_file(uri, spec, store, Path(dest))
    return store.opened


@pytest.fixture(scope="module")
def ranks() -> Iterator[tuple[Any, list[Any]]]:
    """Two spawned processes, one pool each (so each fetch has its own), kept for the module."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(1) as one, ctx.Pool(1) as two:
        yield manager, [one, two]


def fetch_concurrently(
    ranks: tuple[Any, list[Any]], kind: str, s3: Any, uri: str, dest: Path
) -> Counter[str]:
    """The two processes fetch ``uri`` into ``dest`` at the same moment; all their opens."""
    manager, pools = ranks
    start = manager.Barrier(len(pools))
    args = (kind, config_of(s3), uri, str(dest), start)
    pending = [pool.apply_async(_fetch_in_child, args) for pool in pools]
    return Counter(uri for result in pending for uri in result.get(timeout=300))


def test_two_processes_fetching_one_folder_into_one_work_dir_download_it_once(
    s3, tmp_path: Path, ranks: tuple[Any, list[Any]]
) -> None:
    folder = build_tiny_pipeline_folder(tmp_path / "tiny")
    upload(s3, folder, "models/tiny")
    uri, dest = s3.uri("models/tiny"), tmp_path / "work" / "base"
    _, wanted = fetch_folder(uri, BaseModelSpec(uri=uri), S3Store(config_of(s3)), tmp_path / "p")

    opened = fetch_concurrently(ranks, "folder", s3, uri, dest)
    assert opened == cold_reads(uri, wanted)
    assert copied_files(dest) == {name: file_sha256(folder / name) for name in wanted}
    assert not [p for p in dest.rglob("*.part-*")]


def test_a_single_file_is_downloaded_once_per_work_dir(s3, tmp_path: Path) -> None:
    folder = build_tiny_pipeline_folder(tmp_path / "tiny")
    local = load_base_model(BaseModelSpec(uri=str(folder)), None, work_dir=tmp_path / "w")
    path = export_single_file(local, tmp_path / "m.safetensors", metadata={}, dtype=torch.float32)
    uri = s3.uri("ckpt/model.safetensors")
    S3Store(config_of(s3)).put_file(path, uri)
    spec, work = BaseModelSpec(uri=uri), tmp_path / "work"

    first_store = CountingStore(config_of(s3))
    first = load_base_model(spec, first_store, work_dir=work)
    assert first_store.opened == [uri, uri]  # the header, checked first, then the download
    again_store = CountingStore(config_of(s3))
    again = load_base_model(spec, again_store, work_dir=work)
    assert again_store.opened == []
    assert again.identity == first.identity == file_sha256(path)
    assert_same_weights(again.unet, first.unet)


def test_two_processes_fetching_one_single_file_into_one_work_dir_download_it_once(
    s3, tmp_path: Path, ranks: tuple[Any, list[Any]]
) -> None:
    path = write_checkpoint(tmp_path / "sd.safetensors", checkpoint_shapes("sd1", tiny=True), 0)
    uri = s3.uri("ckpt/sd.safetensors")
    S3Store(config_of(s3)).put_file(path, uri)
    dest = tmp_path / "work" / "base"

    opened = fetch_concurrently(ranks, "file", s3, uri, dest)
    assert opened == Counter({uri: 2})  # one process: the header, then the download
    assert copied_files(dest) == {"sd.safetensors": file_sha256(path)}
