"""Cleaning facts kept per object version: a later run judges objects it has seen without reading
them, reads only new or changed ones, and cleaning's memory does not grow with the images."""

from __future__ import annotations

import gc
import io
import os
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from difftrain.api import DatasetSpec
from difftrain.data.cache import CACHE_FOLDER, LatentCache, cache_space, wanted_samples
from difftrain.data.facts import FACTS_FOLDER
from difftrain.storage import LocalStore
from difftrain.train.shared_data import clean_dataset
from tests.datasets import clean_pairs, jpeg, write_folder_dataset, write_webdataset
from tests.store_reads import CountsReads


class CountingStore(CountsReads, LocalStore):
    """The local store, counting the reads of each object."""


def clean(uri: str, store: LocalStore, **cleaning):
    spec = DatasetSpec.model_validate({"uri": uri, "cleaning": {"minResolution": 8, **cleaning}})
    return clean_dataset(spec, store, facts_root=f"{uri}/{CACHE_FOLDER}")


def summary(result):
    return [(p.key, p.caption, p.sha256, p.width, p.height) for p in result.pairs], result.report


def test_a_second_cleaning_reads_no_object_it_has_seen(tmp_path):
    pairs = clean_pairs(6)
    pairs["img900.jpg"] = pairs["img000.jpg"]  # an exact duplicate
    pairs["img901.jpg"] = (jpeg(99, (4, 4)), "a tiny image of a thing")  # too small
    uri = write_folder_dataset(tmp_path / "ds", pairs)
    cold = CountingStore()
    first = clean(uri, cold)
    assert len(cold.dataset_reads()) == 16  # every image and caption
    assert first.report.dropped == {"exact_duplicate": 1, "too_small": 1}

    warm = CountingStore()
    second = clean(uri, warm)
    assert warm.dataset_reads() == {}, "nothing seen before is downloaded again"
    assert summary(second) == summary(first)

    # one new pair: its image and caption are read, and nothing else
    (Path(uri) / "img006.jpg").write_bytes(jpeg(1234, (120, 120)))
    (Path(uri) / "img006.txt").write_text("a new synthetic photo here", encoding="utf-8")
    third = CountingStore()
    grown = clean(uri, third)
    assert third.dataset_reads() == {f"{uri}/img006.jpg": 1, f"{uri}/img006.txt": 1}
    assert [p.key for p in grown.pairs] == [p.key for p in first.pairs] + ["img006"]

    # a rewritten image is a new version: read again, judged by its new content
    target = Path(uri) / "img001.jpg"
    target.write_bytes(pairs["img002.jpg"][0])  # the same bytes as img002 now
    os.utime(target, ns=(1, 1))  # another modification time, whatever the clock says
    fourth = CountingStore()
    changed = clean(uri, fourth)
    assert fourth.dataset_reads() == {str(target): 1}
    assert changed.report.dropped["exact_duplicate"] == 2  # img002 now copies img001


def test_near_duplicate_checks_read_images_whose_facts_have_no_hash(tmp_path):
    uri = write_folder_dataset(tmp_path / "ds", clean_pairs(3))
    clean(uri, CountingStore(), nearDuplicateDistance=0)  # no pHash computed
    again = CountingStore()
    clean(uri, again, nearDuplicateDistance=0)
    assert again.dataset_reads() == {}
    hashing = CountingStore()
    clean(uri, hashing, nearDuplicateDistance=4)
    assert sorted(u for u in hashing.dataset_reads() if u.endswith(".jpg")) == [
        f"{uri}/img00{i}.jpg" for i in range(3)
    ]
    last = CountingStore()
    clean(uri, last, nearDuplicateDistance=4)
    assert last.dataset_reads() == {}


def test_a_known_webdataset_shard_is_not_streamed(tmp_path):
    uri = write_webdataset(tmp_path / "wds", clean_pairs(6), shard_size=3)
    first = clean(uri, CountingStore())
    warm = CountingStore()
    second = clean(uri, warm)
    assert warm.dataset_reads() == {}
    assert summary(second) == summary(first)
    assert [p.span for p in second.pairs] == [p.span for p in first.pairs]
    assert all(p.span is not None for p in second.pairs)


def test_facts_are_kept_as_a_few_generations(tmp_path):
    uri = write_folder_dataset(tmp_path / "ds", clean_pairs(2))
    for i in range(5):  # every run learns something new
        (Path(uri) / f"new{i}.jpg").write_bytes(jpeg(500 + i, (100, 100)))
        (Path(uri) / f"new{i}.txt").write_text("a new synthetic photo here", encoding="utf-8")
        clean(uri, LocalStore())
    assert len(list(Path(uri, CACHE_FOLDER, FACTS_FOLDER).glob("*.json"))) == 3


# --- memory ------------------------------------------------------------------------------------


def _noise_png(seed: int, side: int = 128) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()  # ~49 KB: the bytes, not the records, dominate


def _peak_of_cleaning_and_lookup(root: Path, n: int) -> int:
    folder = root / f"ds{n}"
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"img{i:04d}.png").write_bytes(_noise_png(i))
        (folder / f"img{i:04d}.txt").write_text(f"noise number {i} here", encoding="utf-8")
    spec = DatasetSpec.model_validate({"uri": str(folder), "cleaning": {"minResolution": 64}})
    from difftrain.api import PreprocessingSpec

    gc.collect()
    tracemalloc.start()
    try:
        cleaned = clean_dataset(spec, LocalStore(), facts_root=str(folder / CACHE_FOLDER))
        space = cache_space(PreprocessingSpec(resolution=64), "model")
        found = LatentCache(LocalStore(), str(folder / CACHE_FOLDER)).lookup(
            wanted_samples(cleaned.pairs, space), flips=False
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(cleaned.pairs) == n and len(found.latents) == n
    return peak


def test_cleaning_memory_does_not_grow_with_the_images(tmp_path):
    """4x the images (and 4x their bytes, ~9 MB against ~2.4 MB) but about the same peak: only a
    bounded window of images is held while cleaning streams through them."""
    _peak_of_cleaning_and_lookup(tmp_path, 4)  # first imports and caches, not measured
    small = _peak_of_cleaning_and_lookup(tmp_path, 48)
    large = _peak_of_cleaning_and_lookup(tmp_path, 192)
    print(f"peak traced memory: {small / 2**20:.2f} MiB for 48 images, "
          f"{large / 2**20:.2f} MiB for 192 ({large / small:.2f}x)")  # fmt: skip
    assert large < 1.5 * small, (small, large)
