"""The container images: operator without torch, both non-root (the Dockerfile's promises)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.infra.environment import REPO


def _stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = m.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_both_images_run_as_a_non_root_user():
    stages = _stages()
    for target in ("operator", "trainer"):
        users = [line.split()[1] for line in stages[target] if line.startswith("USER ")]
        assert users, f"{target} sets no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{target} runs as {users[-1]}"
    # the trainer's dependencies include the train extra, the operator's do not
    assert any("pyproject.toml train" in line for line in stages["deps-trainer"])
    assert not any("pyproject.toml train" in line for line in stages["deps-operator"])
    # each image is its runtime stage (the dependencies' venv, which tests/infra/images.py
    # tags and keeps) with our wheel on top
    for target, deps in (("operator", "deps-operator"), ("trainer", "deps-trainer")):
        assert f"COPY --from={deps} /opt/difftrain /opt/difftrain" in stages[f"{target}-runtime"]
        arg = f"{target.upper()}_RUNTIME"
        assert f"ARG {arg}={target}-runtime" in _dockerfile()
        assert re.search(rf"^FROM\s+\$\{{{arg}\}}\s+AS\s+{target}$", _dockerfile(), re.M)


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_the_operator_command_needs_no_torch():
    """The operator image installs no torch: the CLI must start the operator without it."""
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers', 'accelerate', 'peft'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "from difftrain.cli import build_parser\n"
        "args = build_parser().parse_args(['operator', '--standalone'])\n"
        "assert args.func.__name__ == '_cmd_operator'\n"
        "import difftrain_operator.handlers\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
