"""Where the frozen networks run while data is prepared: together, on one device, in one dtype.

Data preparation (Boomerang variants, DreamBooth class images, the latent cache) runs the base
model's networks before training starts. They must run where training will (the accelerator, not
the CPU) and all in the same place: a pipeline whose text encoder is on the GPU in fp16 and whose
UNet is still on the CPU in fp32 fails, or runs for hours on the CPU. :func:`placed` puts them there
for the duration and gives each network its own tensors back afterwards, so a network trained in
fp32 later does not start from weights rounded to fp16.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtype(device: torch.device, mixed_precision: str) -> torch.dtype:
    """The dtype the frozen networks run in: the autocast dtype on CUDA, float32 elsewhere.

    As the training loop places its frozen networks (CPU runs compute in float32 whatever
    ``hyperparameters.mixedPrecision`` says).
    """
    if device.type != "cuda":
        return torch.float32
    return _HALF.get(mixed_precision, torch.float32)


@contextmanager
def placed(
    modules: Sequence[torch.nn.Module],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> Iterator[None]:
    """``modules`` on ``device`` (in ``dtype``, when given) and in eval mode for the duration.

    Afterwards every parameter and buffer is the tensor it was before (same device, dtype and
    values: nothing is rounded by the round trip) and each module is back in its training mode.
    A module already in place is not copied.
    """
    # Conversion gives parameters new data (or new Parameter objects) and buffers new tensors:
    # remember each one's table entry and data to put them back.
    params: list[tuple[dict[str, Any], str, torch.nn.Parameter, torch.Tensor]] = []
    buffers: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            params += [
                (sub._parameters, n, p, p.data) for n, p in sub._parameters.items() if p is not None
            ]
            buffers += [(sub._buffers, n, b) for n, b in sub._buffers.items() if b is not None]
    modes = [m.training for m in modules]
    try:
        for module in modules:
            if dtype is None:
                module.to(device)
            else:
                module.to(device, dtype)
            module.eval()
        yield
    finally:
        for table, name, param, data in params:
            param.data = data
            table[name] = param
        for table, name, buffer in buffers:
            table[name] = buffer
        for module, training in zip(modules, modes, strict=True):
            module.train(training)
