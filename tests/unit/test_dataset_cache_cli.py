"""``difftrain dataset cache``: builds the cache a training job finds, then reports a hit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difftrain.cli import main
from difftrain.models.tiny import build_tiny_pipeline_folder
from tests.latent_fixtures import shape_png


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def dataset_dir(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(4):
        data, caption = shape_png(i)
        (root / f"img{i}.png").write_bytes(data)
        (root / f"img{i}.txt").write_text(caption, encoding="utf-8")
    (root / "broken.png").write_bytes(b"not an image")  # dropped by cleaning, not cached
    (root / "broken.txt").write_text("a red circle", encoding="utf-8")
    return root


def cache_cli(dataset_dir, model_dir, *extra: str) -> list[str]:
    return [
        "dataset",
        "cache",
        str(dataset_dir),
        "--model",
        str(model_dir),
        "--resolution",
        "64",
        "--min-resolution",
        "32",
        "--near-duplicate-distance",
        "0",
        "--json",
        *extra,
    ]


def test_first_run_builds_and_second_run_hits(dataset_dir, model_dir, capsys):
    assert main(cache_cli(dataset_dir, model_dir)) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["hit"] is False
    assert first["samples"] == 4 and first["encoded"] == 4
    assert first["uri"] == f"{dataset_dir}/.difftrain-cache"
    assert (dataset_dir / ".difftrain-cache" / "index" / first["key"]).is_file()
    assert first["size_bytes"] > 0
    report = json.loads(Path(first["report_uri"]).read_text(encoding="utf-8"))["report"]
    assert report["total"] == 5 and report["kept"] == 4
    assert first["report_uri"].startswith(first["uri"])

    assert main(cache_cli(dataset_dir, model_dir)) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["hit"] is True and second["encoded"] == 0
    assert second["key"] == first["key"] and second["samples"] == 4

    # Another preprocessing setting gives other latents, beside the first ones.
    assert main(cache_cli(dataset_dir, model_dir, "--flip-probability", "0.5")) == 0
    flipped = json.loads(capsys.readouterr().out)
    assert flipped["hit"] is False and flipped["encoded"] == 4
    assert flipped["key"] != first["key"]

    # One image more: only it is encoded.
    data, caption = shape_png(9)
    (dataset_dir / "img9.png").write_bytes(data)
    (dataset_dir / "img9.txt").write_text(caption, encoding="utf-8")
    assert main(cache_cli(dataset_dir, model_dir)) == 0
    grown = json.loads(capsys.readouterr().out)
    assert grown["hit"] is False and grown["encoded"] == 1 and grown["samples"] == 5


def test_boomerang_variants_are_cached_with_their_sources(dataset_dir, model_dir, capsys):
    args = cache_cli(
        dataset_dir, model_dir, "--boomerang-copies", "2", "--boomerang-strength", "0.3"
    )
    assert main(args) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["samples"] == 12 and outcome["augmented"] == 8
    report = json.loads(Path(outcome["report_uri"]).read_text(encoding="utf-8"))["report"]
    assert report["augmented"] == 8


def test_cache_root_elsewhere(dataset_dir, model_dir, tmp_path, capsys):
    root = tmp_path / "elsewhere"
    assert main(cache_cli(dataset_dir, model_dir, "--cache-root", str(root))) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert (root / "index" / outcome["key"]).is_file()
    assert not (dataset_dir / ".difftrain-cache").exists()


def test_table_output_names_key_result_and_size(dataset_dir, model_dir, capsys):
    args = [a for a in cache_cli(dataset_dir, model_dir) if a != "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "encoded 4 new" in out and "samples 4" in out and "key " in out and "size " in out


def test_a_missing_model_is_a_clear_error(dataset_dir, tmp_path, capsys):
    code = main(cache_cli(dataset_dir, tmp_path / "no-such-model"))
    err = capsys.readouterr().err
    assert code == 3
    assert "no-such-model" in err and "Traceback" not in err


def test_bad_preprocessing_is_refused_by_field(dataset_dir, model_dir, capsys):
    code = main(cache_cli(dataset_dir, model_dir, "--flip-probability", "2"))
    err = capsys.readouterr().err
    assert code == 3
    assert "flipProbability" in err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "/m"], "give a dataset URI or --job JOB.yaml, not both"),
        (["/data", "--job", "job.yaml"], "give a dataset URI or --job JOB.yaml, not both"),
        (["/data"], "--model is needed with a dataset URI"),
        (["--job", "job.yaml", "--cache-root", "/c"], "--cache-root is for one URI"),
    ],
)
def test_a_uri_or_a_job_is_needed(args, words, capsys):
    assert main(["dataset", "cache", *args]) == 3
    assert words in capsys.readouterr().err


def test_a_job_file_that_is_no_job_is_refused_naming_the_field(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(
        "apiVersion: difftrain.dev/v1alpha1\nkind: DiffusionTrainingJob\n"
        "spec: {baseModel: {uri: /m}, output: {uri: /o}}\n"
    )
    assert main(["dataset", "cache", "--job", str(job)]) == 3
    assert "set exactly one of dataset (one dataset) and datasets" in capsys.readouterr().err


def test_a_jobs_datasets_are_each_cached_beside_themselves(
    dataset_dir, model_dir, tmp_path, capsys
):
    """--job: every entry of spec.datasets with the job's preprocessing and model; again, a hit."""
    other = tmp_path / "other"
    other.mkdir()
    data, caption = shape_png(7)
    (other / "x.png").write_bytes(data)
    (other / "x.txt").write_text(caption, encoding="utf-8")
    cleaning = {"minResolution": 32, "nearDuplicateDistance": 0}
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "apiVersion": "difftrain.dev/v1alpha1",
                "kind": "DiffusionTrainingJob",
                "spec": {
                    "baseModel": {"uri": str(model_dir)},
                    "datasets": [
                        {"uri": str(dataset_dir), "cleaning": cleaning, "weight": 2},
                        {"uri": str(other), "cleaning": cleaning},
                    ],
                    "preprocessing": {"resolution": 64},
                    "output": {"uri": str(tmp_path / "out")},
                },
            }
        )
    )
    for hit in (False, True):
        assert main(["dataset", "cache", "--job", str(job), "--json"]) == 0
        outcomes = json.loads(capsys.readouterr().out)["datasets"]
        assert [(o["uri"], o["samples"], o["hit"]) for o in outcomes] == [
            (f"{dataset_dir}/.difftrain-cache", 4, hit),
            (f"{other}/.difftrain-cache", 1, hit),
        ]
