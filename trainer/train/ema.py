"""Exponential moving average of the trained parameters, optionally kept in CPU memory.

On the device the update is one fused ``_foreach_lerp_`` over all parameters (not one kernel
launch per tensor). Kept in CPU memory (``offloadToCpu``), the EMA follows every
``update_every``-th step with the decay raised to that power: the trained weights are copied
into page-locked buffers asynchronously and the CPU arithmetic runs on a background thread, so
the training step never waits for a host copy of the whole model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

OFFLOADED_UPDATE_EVERY = 10  # steps between updates of an EMA kept in CPU memory


class EMA:
    """EMA weights with a warm-up: decay ramps as (1+n)/(10+n) up to ``decay`` (as in diffusers)."""

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        *,
        decay: float,
        start_step: int = 0,
        offload_to_cpu: bool = False,
        update_every: int | None = None,
    ) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.decay = decay
        self.start_step = start_step
        self.device = torch.device("cpu") if offload_to_cpu else None
        self.update_every = update_every or (OFFLOADED_UPDATE_EVERY if offload_to_cpu else 1)
        self.shadow = [
            p.detach().to(self.device or p.device, torch.float32).clone() for p in self.parameters
        ]
        self.updates = 0
        on_gpu = any(p.is_cuda for p in self.parameters)
        self._staging: list[torch.Tensor] | None = None
        if self.device is not None and on_gpu:
            self._staging = [torch.empty_like(s).pin_memory() for s in self.shadow]
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None

    def current_decay(self) -> float:
        """Decay of the next update: short memory at first, ``decay`` in the long run."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Follow the parameters after optimizer step ``step`` (copies them before start_step)."""
        copy_only = step < self.start_step
        if not copy_only and step % self.update_every != 0:
            return
        weight = 0.0 if copy_only else 1.0 - self.current_decay() ** self.update_every
        if not copy_only:
            self.updates += self.update_every
        if self.device is None:
            live = [p.detach() for p in self.parameters]
            if copy_only:
                torch._foreach_copy_(self.shadow, [t.float() for t in live])
            else:
                torch._foreach_lerp_(self.shadow, [t.float() for t in live], weight)
            return
        self.wait()
        if self._staging is not None:
            for buf, p in zip(self._staging, self.parameters, strict=True):
                buf.copy_(p.detach(), non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            sources = self._staging
        else:
            event = None
            sources = [p.detach().float().clone() for p in self.parameters]
        self._pending = threading.Thread(
            target=self._apply, args=(sources, event, copy_only, weight), daemon=True
        )
        self._pending.start()

    def _apply(
        self, sources: list[torch.Tensor], event: Any, copy_only: bool, weight: float
    ) -> None:
        try:
            if event is not None:
                event.synchronize()  # this thread waits for the copies, not the training loop
            with torch.no_grad():
                if copy_only:
                    torch._foreach_copy_(self.shadow, sources)
                else:
                    torch._foreach_lerp_(self.shadow, sources, weight)
        except BaseException as exc:  # noqa: BLE001 - raised on the loop's thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Finish a background update (before the shadow weights are read or updated again)."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for samples and exports)."""
        self.wait()
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
        self.wait()
        return {"shadow": list(self.shadow), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait()
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError("the checkpoint's EMA state does not match the trained parameters")
        for s, t in zip(self.shadow, shadow, strict=True):
            s.copy_(t)
        self.updates = int(state["updates"])
