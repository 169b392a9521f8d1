"""Peak memory of a merge stays bounded when the inputs grow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.sd_checkpoints import Shapes, write_checkpoint

CHILD = """
import json, resource, sys
from difftrain import api
from difftrain.merge.engine import merge
spec = api.parse_spec("ModelMerge", json.loads(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merge(spec)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "peak_kib": after}))
"""


def _peak_mib(tmp_path: Path, tensors: int, tag: str) -> float:
    # tensors of 4 MiB each (fp16 1024x2048): inputs of `tensors` x 4 MiB
    shapes: Shapes = {
        f"model.diffusion_model.t{i}.weight": ((1024, 2048), torch.float16) for i in range(tensors)
    }
    a = write_checkpoint(tmp_path / f"a{tag}.safetensors", shapes, 1)
    b = write_checkpoint(tmp_path / f"b{tag}.safetensors", shapes, 2)
    body = {
        "models": [{"uri": str(a)}, {"uri": str(b)}],
        "output": {"uri": str(tmp_path / f"out{tag}.safetensors")},
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(body)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    usage = json.loads(result.stdout.strip().splitlines()[-1])
    return float(usage["peak_kib"] - usage["before_kib"]) / 1024


def test_peak_memory_does_not_grow_with_the_inputs(tmp_path):
    small = _peak_mib(tmp_path, tensors=8, tag="s")  # 2 x 32 MiB in
    large = _peak_mib(tmp_path, tensors=64, tag="l")  # 2 x 256 MiB in
    print(f"extra peak RSS: {small:.0f} MiB for 2x32 MiB inputs, {large:.0f} MiB for 2x256 MiB")
    # the inputs grew by 448 MiB; the merge's extra peak may grow by a few tensors' worth at most
    assert large - small < 64, (small, large)
    assert large < 200, large
