"""Fetching a base model by hub id, for clusters that can reach a model hub."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from difftrain.api.training import BaseModelSpec
from difftrain.models.errors import ModelError
from difftrain.models.variants import check_unet_config

logger = logging.getLogger(__name__)

# Only what training loads: configs, tokenizer files and safetensors weights (pickles only on
# request). The safety checker and feature extractor are never fetched.
_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "unet/*.json",
    "vae/*.json",
    "text_encoder/*.json",
    "text_encoder_2/*.json",
]
_WEIGHTS = ["unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors"]
_PICKLES = ["unet/*.bin", "vae/*.bin", "text_encoder/*.bin"]


def download_hub_folder(spec: BaseModelSpec, dest: Path, *, endpoint: str | None = None) -> Path:
    """Download the hub model's diffusers files into ``dest`` (a ModelError when unreachable)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = spec.hub
    assert hub is not None
    weights = _WEIGHTS + (_PICKLES if spec.allow_pickle else [])
    try:
        # configs first: a UNet training cannot take is refused before its weights move
        path = snapshot_download(
            hub, revision=spec.revision, local_dir=dest, allow_patterns=_PATTERNS, endpoint=endpoint
        )
        unet_config = Path(str(path)) / "unet" / "config.json"
        if unet_config.is_file():
            check_unet_config(json.loads(unet_config.read_text()), f"baseModel.hub {hub!r}")
        path = snapshot_download(
            hub, revision=spec.revision, local_dir=dest, allow_patterns=weights, endpoint=endpoint
        )
    except HFValidationError as exc:
        raise ModelError(
            f"baseModel.hub {hub!r} is not a valid model id (expected 'org/name'): {exc}"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelError(
            f"baseModel.hub {hub!r}: revision {spec.revision!r} not found; check baseModel.revision"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(
            f"baseModel.hub {hub!r}: no such model on the hub (or it is private or gated); "
            "check the id, or upload the model to the object store and set baseModel.uri"
        ) from exc
    except (OSError, HfHubHTTPError) as exc:
        # connection refused, DNS failure, timeouts and offline mode all land here
        raise ModelError(
            f"baseModel.hub {hub!r}: cannot reach the model hub from here (offline cluster?) "
            "— upload the model to the object store and set baseModel.uri instead "
            f"({type(exc).__name__})"
        ) from exc
    logger.info("hub model downloaded", extra={"hub": hub, "revision": spec.revision})
    return Path(str(path))
