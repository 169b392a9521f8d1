"""Single-file checkpoints in the LDM layout (in progress)."""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.api.training import BaseModelSpec
from difftrain.models.components import Components
from difftrain.models.errors import ModelError
from difftrain.storage import Store


def load_single_file(
    uri: str, spec: BaseModelSpec, store: Store, *, work_dir: Path, dtype: torch.dtype
) -> Components:
    """Load an LDM-layout .safetensors file (not implemented yet)."""
    raise ModelError(f"baseModel.uri {uri}: single-file checkpoints are not supported yet")
