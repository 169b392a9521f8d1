"""Argo CD's Application CRD, from its Go module at the pinned release (hack/versions.env).

Only the CRD: the test API server then validates an Application as a cluster with Argo CD
would. ``hack/build-binaries.sh`` copies it from the module's source in the Go module cache (about
25 MB, fetched once per machine) into ``argocd-crds/`` beside the binaries, so no test downloads.
"""

from __future__ import annotations

from pathlib import Path

from tests.infra.environment import binary_dir


def application_crd() -> Path:
    """The Application CRD's file beside the test binaries."""
    path = binary_dir() / "argocd-crds" / "application-crd.yaml"
    if not path.is_file():
        raise AssertionError(f"{path} is missing: hack/build-binaries.sh copies it")
    return path
