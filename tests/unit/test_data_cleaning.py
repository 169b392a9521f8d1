"""Cleaning: exact drop counts by reason, deterministic duplicates, and the stored report."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from difftrain.api import CleaningSpec, DatasetSpec
from difftrain.data import (
    REASONS,
    RawPair,
    clean,
    format_report,
    iter_pairs,
    load_dataset,
    read_report,
    write_report,
)
from difftrain.data.cleaning import HammingIndex
from difftrain.storage import LocalStore
from tests.datasets import (
    clean_pairs,
    dirty_dataset,
    jpeg,
    write_folder_dataset,
    write_webdataset,
)


def words(caption: str) -> int:
    return len(caption.split())


def cleaning(**kw: Any) -> CleaningSpec:
    return CleaningSpec.model_validate(kw)


def raw(key: str, data: bytes, caption: str | None = "a good caption here") -> RawPair:
    return RawPair(key, f"{key}.jpg", data, caption)


def test_dirty_dataset_drop_counts_by_reason_are_exact(tmp_path):
    dirty = dirty_dataset()
    write_folder_dataset(tmp_path, dirty.pairs)
    spec = DatasetSpec.model_validate({"uri": str(tmp_path), "cleaning": dirty.cleaning})
    result = load_dataset(spec, LocalStore(), count_tokens=words, max_tokens=10)
    report = result.report
    assert report.dropped == dirty.dropped
    assert report.total == dirty.total == 23
    assert report.kept == dirty.kept == len(result.pairs) == 12
    assert report.truncated_captions == dirty.truncated
    assert result.examples == dirty.examples == report.examples
    kept = {p.key for p in result.pairs}
    assert {"m_watermarked", "m_long", "g000", "g001"} <= kept  # whole words; originals kept
    assert set(report.dropped) <= set(REASONS)


def test_result_does_not_depend_on_the_number_of_workers(tmp_path):
    dirty = dirty_dataset()
    write_folder_dataset(tmp_path, dirty.pairs)
    spec = DatasetSpec.model_validate({"uri": str(tmp_path), "cleaning": dirty.cleaning})
    one = load_dataset(spec, LocalStore(), workers=1, read_workers=1)
    many = load_dataset(spec, LocalStore(), workers=6, read_workers=8)
    assert one.pairs == many.pairs
    assert one.report == many.report


def test_kept_pairs_carry_size_hash_and_stripped_caption():
    data = jpeg(1, (150, 100))
    (pair,) = clean([raw("a", data, "  two words \n")], cleaning(minResolution=64)).pairs
    assert (pair.width, pair.height, pair.caption) == (150, 100, "two words")
    assert pair.sha256 == hashlib.sha256(data).hexdigest()


def test_first_occurrence_of_a_duplicate_wins_and_copies_of_dropped_pairs_survive():
    a, b = jpeg(1), jpeg(2)
    pairs = [
        raw("1-a", a, ""),  # dropped for its empty caption ...
        raw("2-a-copy", a),  # ... so its copy is the first kept occurrence
        raw("3-a-again", a),
        raw("4-b", b),
        raw("5-b-copy", b),
    ]
    result = clean(pairs, cleaning(minResolution=64))
    assert [p.key for p in result.pairs] == ["2-a-copy", "4-b"]
    assert result.report.dropped == {"empty_caption": 1, "exact_duplicate": 2}
    assert result.examples["exact_duplicate"] == ["3-a-again", "5-b-copy"]


def test_min_caption_words_zero_keeps_missing_and_empty_captions():
    pairs = [raw("a", jpeg(1), None), raw("b", jpeg(2), " ")]
    result = clean(pairs, cleaning(minResolution=64, minCaptionWords=0))
    assert [(p.key, p.caption) for p in result.pairs] == [("a", ""), ("b", "")]


def test_banned_words_are_whole_words_and_phrases_case_insensitive():
    captions = {
        "1": "A RED CAR!",
        "2": "a redcar parked",
        "3": "nsfw: a dog",
        "4": "nsfwish pictures",
        "5": "a red carpet",
    }
    pairs = [raw(k, jpeg(int(k)), c) for k, c in captions.items()]
    result = clean(pairs, cleaning(minResolution=64, bannedWords=["red car", "NSFW"]))
    assert [p.key for p in result.pairs] == ["2", "4", "5"]
    assert result.examples["banned_words"] == ["1", "3"]


def test_near_duplicates_can_be_turned_off(tmp_path):
    dirty = dirty_dataset()
    pairs = [raw("g001", dirty.pairs["g001.jpg"][0]), raw("z", dirty.pairs["z_near_copy.jpg"][0])]
    assert len(clean(pairs, cleaning(minResolution=64)).pairs) == 1
    assert len(clean(pairs, cleaning(minResolution=64, nearDuplicateDistance=0)).pairs) == 2


def test_limit_stops_reading_once_enough_pairs_are_kept(tmp_path):
    write_folder_dataset(tmp_path, clean_pairs(30))
    spec = DatasetSpec.model_validate(
        {"uri": str(tmp_path), "limit": 5, "cleaning": {"minResolution": 64}}
    )
    seen: list[int] = []
    result = load_dataset(spec, LocalStore(), progress=seen.append)
    assert [p.key for p in result.pairs] == [f"img{i:03d}" for i in range(5)]
    assert result.report.total == 5 and seen == [1, 2, 3, 4, 5]


def test_same_pairs_from_the_source_and_from_a_list(tmp_path):
    write_folder_dataset(tmp_path, clean_pairs(6))
    spec = DatasetSpec.model_validate({"uri": str(tmp_path), "cleaning": {"minResolution": 64}})
    from_list = clean(list(iter_pairs(spec, LocalStore())), spec.cleaning)
    assert from_list.pairs == load_dataset(spec, LocalStore()).pairs


@settings(max_examples=60, deadline=None)
@given(
    stored=st.lists(st.integers(0, 2**64 - 1), max_size=60),
    probes=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=10),
    flips=st.lists(st.integers(0, 63), max_size=6),
    limit=st.integers(0, 12),
)
def test_hamming_index_agrees_with_brute_force(stored, probes, flips, limit):
    index = HammingIndex()
    for value in stored:
        index.add(value)
    if stored:  # also probe near a stored value, where the answer is interesting
        near = stored[0]
        for bit in flips:
            near ^= 1 << bit
        probes.append(near)
    for probe in probes:
        found = index.nearest_within(probe, limit)
        expected = any((probe ^ s).bit_count() <= limit for s in stored)
        assert (found is not None) == expected
        if found is not None:
            assert found in stored and (found ^ probe).bit_count() <= limit


def test_report_is_committed_and_read_back(tmp_path):
    dirty = dirty_dataset()
    write_folder_dataset(tmp_path / "data", dirty.pairs)
    spec = DatasetSpec.model_validate({"uri": str(tmp_path / "data"), "cleaning": dirty.cleaning})
    result = load_dataset(spec, LocalStore())
    store = LocalStore()
    assert read_report(store, str(tmp_path / "cache")) is None
    uri = write_report(store, str(tmp_path / "cache"), result)
    assert uri == f"{tmp_path}/cache/dataset_report.json"
    doc = json.loads(Path(uri).read_text())
    assert doc["report"]["dropped"] == dirty.dropped
    assert doc["report"]["examples"]["corrupt"] == ["corrupt_text", "corrupt_truncated"]
    manifest = json.loads(Path(uri + ".manifest.json").read_text())
    assert manifest["files"][0]["size"] == Path(uri).stat().st_size
    assert read_report(store, str(tmp_path / "cache")) == result.report


def test_format_report_lists_each_reason_with_its_count_and_first_keys(tmp_path):
    dirty = dirty_dataset()
    write_folder_dataset(tmp_path, dirty.pairs)
    spec = DatasetSpec.model_validate({"uri": str(tmp_path), "cleaning": dirty.cleaning})
    table = format_report(load_dataset(spec, LocalStore(), count_tokens=words, max_tokens=10))
    lines = table.splitlines()
    assert lines[0].split() == ["total", "23"]
    assert lines[1].split() == ["kept", "12"]
    assert lines[2].split() == ["dropped", "11"]
    assert "corrupt_text, corrupt_truncated" in table
    for reason, count in dirty.dropped.items():
        (line,) = [x for x in lines if x.strip().startswith(reason + " ")]
        assert line.split()[1] == str(count)
    assert ["truncated", "captions", "1"] in [x.split() for x in lines]
    assert "near_duplicate: perceptual hash within" in table  # each reason shown is explained


def test_limit_on_a_webdataset_stops_the_shard_reader(tmp_path):
    write_webdataset(tmp_path, clean_pairs(60), shard_size=30)
    before = threading.active_count()
    spec = DatasetSpec.model_validate(
        {"uri": str(tmp_path), "limit": 3, "cleaning": {"minResolution": 64}}
    )
    result = load_dataset(spec, LocalStore())
    assert [p.key for p in result.pairs] == [f"shard-00000/img{i:03d}" for i in range(3)]
    assert threading.active_count() == before  # no reader thread left behind
