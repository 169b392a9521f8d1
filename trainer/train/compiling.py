"""``torch.compile`` of the denoiser, with a fallback to eager execution when compilation fails.

The module Accelerate prepared (DDP-wrapped with several processes, so Dynamo's DDP optimiser
splits the graph at the gradient buckets and the all-reduce still overlaps the backward) is
compiled as a whole; the eager module stays beside it, untouched, for samples, exports and
checkpoints (its ``state_dict`` keys do not change). Compilation happens in the first forward and
backward, so the loop tells a :class:`Compiled` that a step failed while it was not yet proven;
then the step runs again eagerly and compilation stays off.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

BACKEND: Any = "inductor"  # torch.compile's backend; tests use others


class Compiled:
    """A prepared module and its compiled twin; the twin until it fails, then the module."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.name = name
        self.eager = module
        self.compiled = torch.compile(module, backend=BACKEND)
        self.active = True
        self.proven = False  # one whole step (forward and backward) ran compiled

    @property
    def module(self) -> Any:
        """What the step calls."""
        return self.compiled if self.active else self.eager

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


def configure_cuda_math() -> None:
    """TF32 for the fp32 matmuls and convolutions left outside autocast (10-bit mantissa inputs,
    fp32 accumulation: well inside what training in bf16 already accepts)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
