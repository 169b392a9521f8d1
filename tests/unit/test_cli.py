"""The difftrain command: its help, and what users see for good and bad resource files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from difftrain.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "difftrain.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("crds", "validate"):
        assert command in result.stdout


def test_validate_accepts_the_examples_and_skips_what_is_not_ours(tmp_path):
    files = sorted(EXAMPLES.rglob("*.yaml"))
    result = run_cli("validate", *map(str, files))
    assert result.returncode == 0, result.stderr
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    ours = [d for d in docs if d["apiVersion"].startswith("difftrain.dev/")]
    assert result.stdout.count("is valid") == len(ours) >= 9
    assert "Secret minio-credentials skipped (not a difftrain.dev resource)" in result.stdout
    assert "ClusterQueue ml-gpus skipped" in result.stdout
    wrong_kind = tmp_path / "wrong-kind.yaml"
    wrong_kind.write_text("apiVersion: difftrain.dev/v1alpha1\nkind: Secret\nmetadata: {name: x}\n")
    refused = run_cli("validate", str(wrong_kind))
    assert refused.returncode == 1 and "kind: expected one of" in refused.stderr


def test_validate_names_the_field_and_shows_no_traceback(tmp_path):
    doc = yaml.safe_load((EXAMPLES / "lora-job.yaml").read_text())
    del doc["spec"]["lora"]
    doc["spec"]["hyperparameters"]["batchSize"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = run_cli("validate", str(bad))
    assert result.returncode == 1
    assert "spec.hyperparameters.batchSize: Input should be greater than or equal to 1" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_validate_reports_unreadable_and_malformed_files(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    assert main(["validate", str(tmp_path / "missing.yaml"), str(broken)]) == 1
    err = capsys.readouterr().err
    assert "missing.yaml: cannot read" in err
    assert "broken.yaml: not valid YAML" in err


def test_crds_prints_both_definitions(capsys):
    assert main(["crds"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert sorted(d["spec"]["names"]["kind"] for d in docs) == [
        "DiffusionTrainingJob",
        "ModelMerge",
    ]


def test_operator_without_cluster_credentials_says_so(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["KUBECONFIG"] = str(tmp_path / "missing-kubeconfig")
    env["HOME"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "difftrain.cli", "operator", "--standalone"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "no cluster credentials" in result.stderr
    assert "Traceback" not in result.stderr
