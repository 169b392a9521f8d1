"""Caption tools: several captions per image, tag shuffling with kept tokens, tag dropout,
DreamBooth's template; the draws are seeded per (epoch, example) and nothing else."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from difftrain import api
from difftrain.data.captions import (
    CaptionPolicy,
    apply_template,
    caption_lines,
    choice_in_epoch,
    process_tags,
    split_tags,
)
from tests.datasets import jpeg

# tags: words without the separator, outer space or line breaks (as split_tags makes them)
tag = st.text(alphabet="abcdefghij xyz-", min_size=1, max_size=8).map(str.strip).filter(bool)
tags = st.lists(tag, min_size=0, max_size=12)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


@settings(max_examples=200, deadline=None)
@given(tags=tags, keep=st.integers(0, 14), dropout=st.floats(0.0, 1.0), seed=seeds)
def test_kept_tokens_stay_first_in_order_and_are_never_dropped(tags, keep, dropout, seed):
    caption = ", ".join(tags)
    out = process_tags(
        caption, random.Random(seed), shuffle=True, keep_tokens=keep, dropout=dropout
    )
    got = split_tags(out)
    assert got[: min(keep, len(tags))] == tags[:keep]
    rest = got[min(keep, len(tags)) :]
    # the others: a sub-multiset of the caption's other tags (shuffled, some perhaps dropped)
    remaining = list(tags[keep:])
    for t in rest:
        remaining.remove(t)


@settings(max_examples=100, deadline=None)
@given(tags=st.lists(tag, min_size=1, max_size=12), keep=st.integers(0, 14), seed=seeds)
def test_shuffling_alone_keeps_every_tag(tags, keep, seed):
    out = process_tags(", ".join(tags), random.Random(seed), shuffle=True, keep_tokens=keep)
    assert sorted(split_tags(out)) == sorted(tags)


def test_dropout_one_keeps_only_the_kept_tokens_and_zero_keeps_all():
    caption = "sks, dog, grass, sunny, photo"
    rng = random.Random(0)
    assert process_tags(caption, rng, shuffle=False, keep_tokens=2, dropout=1.0) == "sks, dog"
    assert process_tags(caption, rng, shuffle=False, dropout=0.0) == caption  # verbatim


def test_dropout_drops_each_tag_at_about_its_rate():
    caption = ", ".join(f"t{i}" for i in range(20))
    kept = sum(
        len(split_tags(process_tags(caption, random.Random(s), shuffle=False, dropout=0.3)))
        for s in range(500)
    )
    assert abs(kept / (500 * 20) - 0.7) < 0.02


@settings(max_examples=100, deadline=None)
@given(
    captions=st.lists(st.lists(tag, min_size=1, max_size=6).map(", ".join), min_size=1, max_size=5),
    seed=seeds,
    epoch=st.integers(0, 10_000),
    index=st.integers(0, 10_000),
    shuffle=st.booleans(),
    dropout=st.floats(0.0, 1.0),
)
def test_the_same_seed_epoch_and_index_draw_the_same_caption(
    captions, seed, epoch, index, shuffle, dropout
):
    policy = CaptionPolicy(shuffle_tags=shuffle, keep_tokens=1, tag_dropout=dropout)
    first = policy.draw(captions, seed=seed, epoch=epoch, index=index)
    again = CaptionPolicy(shuffle_tags=shuffle, keep_tokens=1, tag_dropout=dropout).draw(
        list(captions), seed=seed, epoch=epoch, index=index
    )
    assert first == again


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 12), seed=seeds, index=st.integers(0, 10_000), cycle=st.integers(0, 50))
def test_every_caption_is_drawn_once_in_each_cycle_of_epochs(count, seed, index, cycle):
    drawn = [
        choice_in_epoch(count, seed=seed, epoch=cycle * count + e, index=index)
        for e in range(count)
    ]
    assert sorted(drawn) == list(range(count))


def test_draws_differ_across_epochs_and_examples():
    policy = CaptionPolicy(shuffle_tags=True)
    caption = ", ".join(f"t{i}" for i in range(8))
    by_epoch = {policy.draw([caption], seed=1, epoch=e, index=0) for e in range(10)}
    by_index = {policy.draw([caption], seed=1, epoch=0, index=i) for i in range(10)}
    assert len(by_epoch) > 5 and len(by_index) > 5


def test_a_policy_varies_only_with_shuffle_dropout_or_several_captions():
    assert not CaptionPolicy().varies(["one caption"])
    assert CaptionPolicy().varies(["one", "two"])
    assert CaptionPolicy(shuffle_tags=True).varies(["one"])
    assert CaptionPolicy(tag_dropout=0.1).varies(["one"])
    assert CaptionPolicy().draw(["a cat, on a mat"], seed=0, epoch=3, index=9) == "a cat, on a mat"


def test_dreambooth_template_keeps_the_drawn_caption_after_the_tag_tools():
    policy = CaptionPolicy(shuffle_tags=True, template="a photo of sks dog, {caption}")
    out = policy.draw(["grass, ball, sunny"], seed=0, epoch=0, index=0)
    assert out.startswith("a photo of sks dog, ")
    assert sorted(split_tags(out.removeprefix("a photo of sks dog, "))) == [
        "ball",
        "grass",
        "sunny",
    ]
    assert apply_template("a photo of sks dog", "grass") == "a photo of sks dog"  # replaces it
    assert apply_template(None, "grass") == "grass"


def test_caption_lines_alternatives_first_and_joined():
    text = "a red circle\n\n  a circle, red  \r\nred round shape\n"
    assert caption_lines(text) == ["a red circle", "a circle, red", "red round shape"]
    assert caption_lines(text, "first") == ["a red circle"]
    assert caption_lines(text, "joined") == ["a red circle a circle, red red round shape"]
    assert caption_lines(None) == [] and caption_lines("  \n ") == []


def test_other_separators_split_and_join():
    assert split_tags("a | b|c", "|") == ["a", "b", "c"]
    out = process_tags("a | b | c", random.Random(0), shuffle=True, keep_tokens=1, separator="|")
    assert out.startswith("a | ") and sorted(split_tags(out, "|")) == ["a", "b", "c"]


def _dataset(**captions) -> api.DatasetSpec:
    return api.DatasetSpec.model_validate({"uri": "s3://bucket/data", "captions": captions})


def test_the_spec_reads_captions_in_camel_case_with_defaults():
    spec = _dataset(shuffleTags=True, keepTokens=2, tagDropout=0.1, separator=";")
    policy = CaptionPolicy.from_spec(spec.captions, template="{caption}")
    assert policy == CaptionPolicy(True, 2, 0.1, ";", "{caption}")
    default = api.DatasetSpec(uri="s3://bucket/data")
    assert default.captions.lines == "alternatives" and default.repeats == 1
    assert not CaptionPolicy.from_spec(default.captions).varies_tags


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"captions": {"keepTokens": 1}}, "keepTokens has no effect"),
        ({"captions": {"tagDropout": 1.5}}, "captions.tagDropout"),
        ({"captions": {"keepTokens": -1, "shuffleTags": True}}, "captions.keepTokens"),
        ({"captions": {"separator": ""}}, "captions.separator"),
        ({"captions": {"lines": "all"}}, "captions.lines"),
        ({"captions": {"shufle": True}}, "captions.shufle"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_bad_caption_settings_are_refused_naming_the_field(doc, field):
    with pytest.raises(ValidationError) as err:
        api.DatasetSpec.model_validate({"uri": "s3://bucket/data", **doc})
    assert any(field in line for line in api.format_validation_error(err.value))


def test_an_unknown_placeholder_in_the_instance_prompt_is_refused():
    api.DreamBoothSpec(instance_prompt="a photo of sks dog, {caption}", prior_preservation=False)
    with pytest.raises(ValueError, match=r"instancePrompt: unknown placeholder \{class\}"):
        api.DreamBoothSpec(instance_prompt="a photo of sks {class}", prior_preservation=False)


def _folder(tmp_path, captions: dict[str, str]) -> str:
    for i, (key, text) in enumerate(captions.items()):
        (tmp_path / f"{key}.jpg").write_bytes(jpeg(i))
        (tmp_path / f"{key}.txt").write_text(text)
    return str(tmp_path)


def _load(uri: str, **dataset) -> list:
    from difftrain.data.cleaning import load_dataset
    from difftrain.storage import LocalStore

    spec = api.DatasetSpec.model_validate(
        {"uri": uri, "cleaning": {"minResolution": 32, "nearDuplicateDistance": 0}, **dataset}
    )
    return load_dataset(spec, LocalStore()).pairs


def test_a_caption_file_with_several_lines_gives_several_captions(tmp_path):
    uri = _folder(tmp_path, {"a": "a red circle\n\nround and red\n", "b": "a blue square"})
    pairs = {p.key: p for p in _load(uri)}
    assert pairs["a"].captions == ("a red circle", "round and red")
    assert pairs["a"].caption == "a red circle"  # the first: what a fixed caption trains with
    assert pairs["b"].captions == ("a blue square",)
    first = {p.key: p.captions for p in _load(uri, captions={"lines": "first"})}
    joined = {p.key: p.captions for p in _load(uri, captions={"lines": "joined"})}
    assert first["a"] == ("a red circle",) and joined["a"] == ("a red circle round and red",)


def test_a_jsonl_caption_list_gives_several_captions(tmp_path):
    rows: list[dict[str, Any]] = [
        {"file_name": "a.jpg", "text": ["a red circle", "", "round and red"]},
        {"file_name": "b.jpg", "text": "a blue square"},
    ]
    for i, row in enumerate(rows):
        (tmp_path / row["file_name"]).write_bytes(jpeg(i))
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = {p.key: p for p in _load(str(tmp_path))}
    assert pairs["a"].captions == ("a red circle", "round and red")
    assert pairs["b"].captions == ("a blue square",)


def test_cleaning_checks_every_caption_of_an_image(tmp_path):
    uri = _folder(
        tmp_path,
        {
            "banned": "a fine caption\na watermark here",
            "short": "a long enough caption\ntiny",
            "good": "a long enough caption\nanother long caption",
        },
    )
    from difftrain.data.cleaning import load_dataset
    from difftrain.storage import LocalStore

    spec = api.DatasetSpec.model_validate(
        {
            "uri": uri,
            "cleaning": {
                "minResolution": 32,
                "nearDuplicateDistance": 0,
                "bannedWords": ["watermark"],
                "minCaptionWords": 2,
            },
        }
    )
    result = load_dataset(spec, LocalStore())
    assert [p.key for p in result.pairs] == ["good"]
    assert result.report.dropped == {"short_caption": 1, "banned_words": 1}


def test_dataset_check_shows_the_captions_as_drawn(tmp_path, capsys):
    from difftrain.cli import main

    uri = _folder(tmp_path, {"a": "sks, red, circle, small\nsks, round, red", "b": "sks, blue"})
    args = ["dataset", "check", uri, "--min-resolution", "32", "--near-duplicate-distance", "0"]
    code = main([*args, "--shuffle-tags", "--keep-tokens", "1", "--repeats", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "several captions" in out and "(2 captions; captions.lines: alternatives)" in out
    assert "examples per epoch" in out and "(repeats 3)" in out
    drawn = [line.split(None, 1)[1] for line in out.splitlines() if line.startswith("    ")]
    assert len(drawn) == 6  # 2 images x 3 epochs
    assert all(line.startswith("sks, ") for line in drawn)  # the kept token stays first
    policy = CaptionPolicy(shuffle_tags=True, keep_tokens=1)
    captions = ("sks, red, circle, small", "sks, round, red")
    assert drawn[:3] == [policy.draw(captions, seed=42, epoch=e, index=0) for e in range(3)]
    assert main([*args, "--keep-tokens", "1"]) == 3  # no effect alone: refused, field named
    assert "keepTokens has no effect" in capsys.readouterr().err
