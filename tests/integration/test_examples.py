"""The examples a platform team copies, each accepted by the real API server: the store Secret and
jobs (applied for real), Kueue's queue objects with a queued job (Kueue's CRDs and webhooks
installed), the kustomization and the Argo CD Application over it (Argo CD's CRD installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.infra.argocd import application_crd

pytestmark = pytest.mark.usefixtures("crds_installed")


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _dry_run(control_plane, *args: str) -> list[dict]:
    """Server-side dry run: validated (schema, CEL, webhooks) and defaulted, stored nowhere."""
    out = control_plane.kubectl(
        "apply", "--server-side", "--dry-run=server", "-o", "json", *args
    ).stdout
    doc = json.loads(out)
    return doc["items"] if doc.get("kind") == "List" else [doc]


def test_the_kueue_queues_and_the_queued_job_are_accepted_with_kueue_installed(
    control_plane, namespace, kueue, examples_dir
):
    folder = examples_dir / "kueue"
    kinds = [d["kind"] for f in sorted(folder.glob("*.yaml")) for d in _documents(f)]
    assert sorted(kinds) == ["ClusterQueue", "DiffusionTrainingJob", "LocalQueue", "ResourceFlavor"]
    accepted = _dry_run(control_plane, "-n", namespace, "-f", str(folder))
    assert sorted(o["kind"] for o in accepted) == sorted(kinds)
    job = next(o for o in accepted if o["kind"] == "DiffusionTrainingJob")
    local = next(o for o in accepted if o["kind"] == "LocalQueue")
    assert job["spec"]["queueName"] == local["metadata"]["name"]


def test_the_kustomization_renders_the_teams_jobs_and_is_accepted(control_plane, examples_dir):
    folder = examples_dir / "gitops"
    rendered = _documents_of(control_plane.kubectl("kustomize", str(folder)).stdout)
    assert {(o["kind"], o["metadata"]["namespace"]) for o in rendered} == {
        ("Secret", "ml-team"),
        ("DiffusionTrainingJob", "ml-team"),
    }
    assert all(o["metadata"]["labels"]["team"] == "ml" for o in rendered)
    control_plane.kubectl_ok("create", "namespace", "ml-team")
    accepted = _dry_run(control_plane, "-k", str(folder))
    assert sorted(o["kind"] for o in accepted) == ["DiffusionTrainingJob", "Secret"]
    job = next(o for o in accepted if o["kind"] == "DiffusionTrainingJob")
    assert job["spec"]["hyperparameters"]["batchSize"] == 8  # defaulted by the server's schema


def test_the_argo_cd_application_over_the_kustomization_is_accepted(control_plane, examples_dir):
    control_plane.kubectl("apply", "--server-side", "-f", str(application_crd()))
    control_plane.wait_established("applications.argoproj.io")
    control_plane.kubectl_ok("create", "namespace", "argocd")
    app_file = examples_dir / "gitops" / "argocd-application.yaml"
    (app,) = _dry_run(control_plane, "-f", str(app_file))
    assert app["kind"] == "Application"
    source = app["spec"]["source"]
    assert (examples_dir.parent / source["path"] / "kustomization.yaml").is_file()
    assert app["spec"]["destination"]["namespace"] == "ml-team"


def _documents_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]
