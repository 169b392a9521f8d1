"""`difftrain dataset check` on local folders: the report table, and one-line errors (exit 3)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from difftrain.api import EXIT_CONFIG_ERROR
from difftrain.cli import main
from tests.datasets import dirty_dataset, write_folder_dataset

DIRTY_FLAGS = [
    "--min-resolution",
    "64",
    "--min-caption-words",
    "2",
    "--banned-word",
    "watermark",
]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "difftrain.cli", *args], capture_output=True, text=True, timeout=120
    )


def check_in_process(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["dataset", "check", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_lines(stdout: str) -> dict[str, int]:
    """'  reason   count   keys' lines -> {reason: count}."""
    counts = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def test_check_prints_counts_by_reason(tmp_path):
    dirty = dirty_dataset()
    write_folder_dataset(tmp_path, dirty.pairs)
    result = run_cli("dataset", "check", str(tmp_path), *DIRTY_FLAGS)
    assert result.returncode == 0, result.stderr
    counts = report_lines(result.stdout)
    assert counts == {"total": 23, "kept": 12, "dropped": 11, **dirty.dropped}
    assert "corrupt_text, corrupt_truncated" in result.stdout


def test_check_json_and_report_file(tmp_path, capsys):
    dirty = dirty_dataset()
    write_folder_dataset(tmp_path / "data", dirty.pairs)
    out = tmp_path / "reports"
    code, stdout, stderr = check_in_process(
        capsys, str(tmp_path / "data"), *DIRTY_FLAGS, "--json", "--report-to", str(out)
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["dropped"] == dirty.dropped and report["examples"] == dirty.examples
    stored = json.loads((out / "dataset_report.json").read_text())
    assert stored["report"] == report


def test_check_flags_change_the_cleaning(tmp_path, capsys):
    dirty = dirty_dataset()
    write_folder_dataset(tmp_path, dirty.pairs)
    flags = [*DIRTY_FLAGS, "--near-duplicate-distance", "0", "--keep-exact-duplicates"]
    counts = report_lines(check_in_process(capsys, str(tmp_path), *flags)[1])
    assert "near_duplicate" not in counts and "exact_duplicate" not in counts
    assert counts["kept"] == 14


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{empty}"], "is empty: no files under this prefix"),
        (["{empty}/missing"], "does not exist"),
        (["s3://bucket/prefix"], "give its address with --endpoint"),
        (["{empty}", "--min-resolution", "0"], "cleaning.minResolution: Input should be greater"),
    ],
)
def test_bad_input_is_one_line_and_exit_3(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    code, _, stderr = check_in_process(capsys, *argv)
    assert code == EXIT_CONFIG_ERROR
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dataset check: ") and message in lines[0]


def test_a_missing_folder_shows_no_traceback_from_the_real_command(tmp_path):
    result = run_cli("dataset", "check", str(tmp_path / "missing"))
    assert result.returncode == EXIT_CONFIG_ERROR
    assert result.stderr.strip().splitlines() == [
        f"dataset check: dataset.uri {tmp_path / 'missing'} does not exist: give an existing folder"
    ]


def test_dataset_command_is_listed_in_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["dataset", "--help"])
    assert info.value.code == 0 and "check" in capsys.readouterr().out
