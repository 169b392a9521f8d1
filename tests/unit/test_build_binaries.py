"""hack/build-binaries.sh: ready binaries named by the environment are used instead of building."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.infra.environment import ASSET_DIRS, BINARIES, BUILD_SCRIPT


def test_ready_binaries_are_used_and_nothing_is_built(tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in BINARIES:
        exe = assets / name
        exe.write_text("#!/bin/sh\necho ready\n")
        exe.chmod(0o755)
    for name in ASSET_DIRS:
        (assets / name).mkdir()
    # a `go` that fails loudly: if the script tried to build anything, it would exit non-zero
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    go = fake_bin / "go"
    go.write_text("#!/bin/sh\necho 'go must not be called' >&2\nexit 99\n")
    go.chmod(0o755)
    env = dict(os.environ)
    env.update(
        KUBEBUILDER_ASSETS=str(assets),
        DIFFTRAIN_CACHE=str(tmp_path / "cache"),
        PATH=f"{fake_bin}:{env['PATH']}",
    )
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = Path(result.stdout.strip().splitlines()[-1])
    for name in BINARIES:
        assert (out / name).resolve() == (assets / name).resolve()
    for name in ASSET_DIRS:
        assert (out / name).resolve() == (assets / name).resolve()
    assert "building" not in result.stderr
