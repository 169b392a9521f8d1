"""Base models: the tiny test model, loading (folders, single files, hub ids) and exports."""

from difftrain.models.components import Components, file_sha256
from difftrain.models.errors import ModelError
from difftrain.models.exports import (
    export_diffusers,
    export_lora_kohya,
    export_lora_peft,
    export_single_file,
)
from difftrain.models.loading import load_base_model
from difftrain.models.tiny import (
    TINY_WORDS,
    build_tiny_components,
    build_tiny_pipeline_folder,
    write_tiny_tokenizer,
)

__all__ = [
    "TINY_WORDS",
    "Components",
    "ModelError",
    "build_tiny_components",
    "build_tiny_pipeline_folder",
    "export_diffusers",
    "export_lora_kohya",
    "export_lora_peft",
    "export_single_file",
    "file_sha256",
    "load_base_model",
    "write_tiny_tokenizer",
]
