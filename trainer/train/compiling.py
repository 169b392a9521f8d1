"""``torch.compile`` of the denoiser, with a fallback to eager execution when compilation fails.

The compiled function replaces the module's ``forward`` on the instance (not the module: its
``state_dict`` keys, DDP wrapping and exports stay as they are). Compilation happens on the first
calls, forward and backward, so the loop tells :class:`CompiledForward` whether a step failed
while it was not yet proven; then the step is retried eagerly and compilation stays off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)

BACKEND = "inductor"  # torch.compile's backend; tests use another to make compilation fail


class CompiledForward:
    """A module's forward through torch.compile until it fails; eager from then on."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.name = name
        self.eager = module.forward
        self.compiled = torch.compile(self.eager, backend=BACKEND)
        self.active = True
        self.proven = False  # one whole step (forward and backward) ran compiled
        self._paused = 0
        module.forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.active and not self._paused:
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)

    def give_up(self, error: BaseException) -> None:
        """Compilation (or a compiled step) failed: eager execution from now on."""
        self.active = False
        root = getattr(error, "inner_exception", None) or error.__cause__ or error
        lines = [line for line in str(root).strip().splitlines() if line.strip()]
        logger.warning(
            "torch.compile of the %s failed, training it without compilation: %s: %s",
            self.name,
            type(root).__name__,
            lines[0][:300] if lines else "",
        )

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Eager inside (sample images: other shapes, no gradients; not worth a compilation)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


def compile_modules(modules: dict[str, torch.nn.Module]) -> list[CompiledForward]:
    """Compile each module's forward in place."""
    return [CompiledForward(m, name) for name, m in modules.items()]


def configure_cuda_math() -> None:
    """TF32 for the fp32 matmuls and convolutions left outside autocast (10-bit mantissa inputs,
    fp32 accumulation: well inside what training in bf16 already accepts)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
