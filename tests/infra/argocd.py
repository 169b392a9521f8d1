"""Argo CD's Application CRD, from its Go module at the pinned release (hack/versions.env).

Only the CRD: the test API server then validates an Application as a cluster with Argo CD
would. The module is fetched through the Go module proxy into the Go module cache once per machine
(about 25 MB); nothing is vendored into the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = "github.com/argoproj/argo-cd/v3"


def pinned_version() -> str:
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        if line.startswith("ARGOCD_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("hack/versions.env has no ARGOCD_VERSION")


def application_crd() -> Path:
    """The Application CRD's file in the Go module cache (downloaded when missing)."""
    version = pinned_version()
    result = subprocess.run(
        ["go", "mod", "download", "-json", f"{MODULE}@{version}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "GOFLAGS": "-mod=mod"},
        cwd="/",
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"go mod download {MODULE}@{version} failed:\n{result.stdout}")
    path = Path(json.loads(result.stdout)["Dir"]) / "manifests" / "crds" / "application-crd.yaml"
    assert path.is_file(), path
    return path
