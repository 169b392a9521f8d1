"""Comparing models in tests: weights bitwise, computed outputs with a tolerance.

Two separately loaded copies of the same weights can give outputs that differ in the last bits:
CPU kernels choose code paths by memory layout and alignment. Weights are compared bitwise; what
the models compute, within a tolerance, so no test depends on the machine's CPU.
"""

from __future__ import annotations

import torch

# a few float32 rounding steps through a tiny network's layers
RTOL, ATOL = 1e-4, 1e-5


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Both modules hold the same tensors, bit for bit, under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    differing = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not differing, f"weights differ: {differing[:5]}"


def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
