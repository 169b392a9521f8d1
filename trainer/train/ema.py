"""Exponential moving average of the trained parameters, optionally kept in CPU memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class EMA:
    """EMA weights with a warm-up: decay ramps as (1+n)/(10+n) up to ``decay`` (as in diffusers)."""

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        *,
        decay: float,
        start_step: int = 0,
        offload_to_cpu: bool = False,
    ) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.decay = decay
        self.start_step = start_step
        self.device = torch.device("cpu") if offload_to_cpu else None
        self.shadow = [
            p.detach().to(self.device or p.device, torch.float32).clone() for p in self.parameters
        ]
        self.updates = 0

    def current_decay(self) -> float:
        """Decay of the next update: short memory at first, ``decay`` in the long run."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Follow the parameters after optimizer step ``step`` (copies them before start_step)."""
        if step < self.start_step:
            for s, p in zip(self.shadow, self.parameters, strict=True):
                s.copy_(p.detach().to(s.device, torch.float32))
            return
        weight = 1.0 - self.current_decay()
        for s, p in zip(self.shadow, self.parameters, strict=True):
            s.lerp_(p.detach().to(s.device, torch.float32), weight)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for samples and exports)."""
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.parameters, strict=True):
                p.copy_(s.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(saved, self.parameters, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": list(self.shadow), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError("the checkpoint's EMA state does not match the trained parameters")
        for s, t in zip(self.shadow, shadow, strict=True):
            s.copy_(t)
        self.updates = int(state["updates"])
