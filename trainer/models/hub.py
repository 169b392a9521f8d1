"""Fetching a base model by hub id, for clusters that can reach a model hub.

Downloads go into a hub cache (``DIFFTRAIN_HUB_CACHE``; the operator mounts one into every
trainer pod, a PersistentVolumeClaim when the chart names one): the processes of a pod, its
retries and, with a shared claim, other pods and jobs reuse what is there, and when the hub is
unreachable a model already in the cache is loaded from it. Only what training loads is fetched:
configs, the tokenizer, and the weights of the one variant in use (safetensors; pickles only on
request). A token for gated or private models comes from ``HF_TOKEN``, which the operator fills
from ``baseModel.tokenSecretRef``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from pathlib import Path

from difftrain.api.training import BaseModelSpec
from difftrain.models.errors import ModelError
from difftrain.models.variants import check_unet_config

logger = logging.getLogger(__name__)

HUB_CACHE_ENV = "DIFFTRAIN_HUB_CACHE"
# configs and tokenizer files; the safety checker and feature extractor are never fetched
CONFIG_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "unet/*.json",
    "vae/*.json",
    "text_encoder/*.json",
    "text_encoder_2/*.json",
]
WEIGHT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def hub_files(files: list[str], spec: BaseModelSpec) -> tuple[list[str], list[str]]:
    """Of a hub repository's files, the configs and the weights training loads (one variant)."""
    from difftrain.models.loading import select_weight_files

    configs = [f for f in files if any(fnmatch.fnmatch(f, p) for p in CONFIG_PATTERNS)]
    weights: list[str] = []
    for folder in WEIGHT_FOLDERS:
        names = [f[len(folder) + 1 :] for f in files if f.startswith(folder + "/")]
        names = [n for n in names if "/" not in n]
        chosen = select_weight_files(names, variant=spec.variant, allow_pickle=spec.allow_pickle)
        weights += [f"{folder}/{n}" for n in chosen if not n.endswith(".json")]
    return configs, weights


def _offline(hub: str, exc: Exception) -> ModelError:
    return ModelError(
        f"baseModel.hub {hub!r}: cannot reach the model hub from here (offline cluster?) and the "
        "model is not in the hub cache — upload the model to the object store and set "
        f"baseModel.uri instead ({type(exc).__name__})"
    )


def download_hub_folder(spec: BaseModelSpec, dest: Path, *, endpoint: str | None = None) -> Path:
    """The hub model's diffusers folder in the hub cache (``dest`` when none is configured)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = spec.hub
    assert hub is not None
    cache = os.environ.get(HUB_CACHE_ENV) or str(dest)
    where = f"baseModel.hub {hub!r}"

    def snapshot(patterns: list[str] | None, *, local: bool = False) -> Path:
        path = snapshot_download(
            hub,
            revision=spec.revision,
            cache_dir=cache,
            endpoint=endpoint,
            allow_patterns=patterns,
            local_files_only=local,
        )
        return Path(str(path))

    try:
        try:
            listing = snapshot_download(
                hub, revision=spec.revision, cache_dir=cache, endpoint=endpoint, dry_run=True
            )
            files = [entry.filename for entry in listing]
        except (OSError, HfHubHTTPError) as exc:
            if isinstance(exc, RepositoryNotFoundError | RevisionNotFoundError):
                raise
            # the hub is unreachable: a model already in the cache still loads
            try:
                path = snapshot(None, local=True)
            except (LocalEntryNotFoundError, OSError, HfHubHTTPError):
                raise _offline(hub, exc) from exc
            logger.warning("model hub unreachable; the model loads from the hub cache")
            return path
        configs, weights = hub_files(files, spec)
        # configs first: a UNet training cannot take is refused before its weights move
        path = snapshot(configs)
        unet_config = path / "unet" / "config.json"
        if unet_config.is_file():
            check_unet_config(json.loads(unet_config.read_text()), where)
        path = snapshot(configs + weights)
    except HFValidationError as exc:
        raise ModelError(f"{where} is not a valid model id (expected 'org/name'): {exc}") from exc
    except RevisionNotFoundError as exc:
        raise ModelError(
            f"{where}: revision {spec.revision!r} not found; check baseModel.revision"
        ) from exc
    except GatedRepoError as exc:
        raise ModelError(
            f"{where}: a gated model; accept its terms on the hub and set baseModel.tokenSecretRef "
            "to a Secret key holding a token with access"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(
            f"{where}: no such model on the hub (or it is private: set baseModel.tokenSecretRef "
            "to a Secret key holding a token); check the id, or upload the model to the object "
            "store and set baseModel.uri"
        ) from exc
    except (OSError, HfHubHTTPError) as exc:
        # connection lost mid-download, timeouts
        raise _offline(hub, exc) from exc
    logger.info(
        "hub model downloaded", extra={"hub": hub, "revision": spec.revision, "cache": cache}
    )
    return path
