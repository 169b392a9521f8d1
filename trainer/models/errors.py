"""The error raised for a base model that cannot be loaded or a model that cannot be exported."""

from __future__ import annotations


class ModelError(ValueError):
    """A base model or export problem the user fixes in the spec; the message names the field."""
