"""The training step's GPU-minded parts, shown on the CPU: no host synchronisation between reads,
EMA in one fused update or in the background, checkpoints committed while training goes on,
compilation that falls back, and gradient all-reduce skipped on every module while accumulating.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from difftrain import api
from difftrain.storage import MANIFEST_NAME, LocalStore
from difftrain.train import compiling, loop
from difftrain.train.checkpoint import CheckpointStore, CheckpointWriter, TrainingState
from difftrain.train.ema import EMA
from difftrain.train.objective import diffusion_loss, per_sample_loss, prior_preservation_loss
from difftrain.train.run import RunOptions, run_training
from tests.training import prepare_local_inputs, tiny_job


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_local_inputs(tmp_path_factory.mktemp("inputs"))


def _run(job: dict, work: Path):
    resource = api.parse_resource(job)
    assert isinstance(resource, api.DiffusionTrainingJob)
    return run_training(resource, RunOptions(work_dir=work))


# Tensor methods that make the host wait for the device (on a GPU: the whole queue of kernels).
SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}
# Code that runs in a training step besides torch itself; torch's internals (the optimizer's
# step counters live on the CPU) are torch's business.
WATCHED = ("/difftrain/", "/trainer/", "/diffusers/", "/accelerate/", "/peft/")


class SyncCounter(TorchFunctionMode):
    """Records every syncing call made directly from watched code, unless ``allowed``."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed = 0
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        bool_index = (
            name == "__getitem__"
            and len(args) > 1
            and isinstance(args[1], torch.Tensor)
            and args[1].dtype == torch.bool
        )
        if (name in SYNCING or bool_index or name == "nonzero") and not self.allowed:
            caller = sys._getframe(1)
            where = caller.f_code.co_filename
            if any(w in where for w in WATCHED) and "/tests/" not in where:
                self.calls[f"{name} at {where.rsplit('/', 2)[-1]}:{caller.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))


def _allowing(counter: SyncCounter, method: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        counter.allowed += 1
        try:
            return method(*args, **kwargs)
        finally:
            counter.allowed -= 1

    return wrapped


@pytest.mark.parametrize("dreambooth", [False, True], ids=["plain", "dreambooth"])
def test_steps_between_reads_make_the_host_wait_for_the_device_nowhere(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dreambooth: bool
):
    """Counting the calls that force a host synchronisation on a GPU (``.item()``, ``float()``,
    ``bool()``, ``.tolist()``, boolean indexing...) made by our code, diffusers, accelerate or
    peft while steps run: none, except in the one read every ``read_every`` steps (and in the
    checkpoint and sample code, which must read the weights anyway)."""
    monkeypatch.setattr(loop, "READ_EVERY_ON_CPU", 4)
    counter = SyncCounter()
    reads: list[int] = []
    real_read = loop.Trainer._read

    def read(self: loop.Trainer, losses: list[torch.Tensor]) -> Any:
        reads.append(self.state.step)
        return _allowing(counter, real_read)(self, losses)

    monkeypatch.setattr(loop.Trainer, "_read", read)
    for name in ("save_checkpoint", "finish_checkpoints", "_sample", "resume"):
        monkeypatch.setattr(loop.Trainer, name, _allowing(counter, getattr(loop.Trainer, name)))
    real_run = loop.Trainer.run

    def run(self: loop.Trainer) -> Any:
        with counter:
            return real_run(self)

    monkeypatch.setattr(loop.Trainer, "run", run)
    hp = {
        "batchSize": 2,
        "maxSteps": 10,
        "warmupSteps": 1,
        "mixedPrecision": "no",
        "gradientAccumulationSteps": 2,
    }
    extra: dict[str, Any] = {}
    if dreambooth:
        extra["dreambooth"] = {
            "instancePrompt": "a photo of sks shape",
            "classPrompt": "a photo of a shape",
            "numClassImages": 2,
        }
    result = _run(
        tiny_job(
            inputs,
            tmp_path / "out",
            hyperparameters=hp,
            regularization={"snrGamma": 5.0, "noiseOffset": 0.05, "ema": {"enabled": True}},
            **extra,
        ),
        tmp_path / "work",
    )
    assert result.loop.state.step == 10
    assert reads == [4, 8, 10]  # every 4th step and the last
    assert len(result.loop.losses) == 10 and all(v > 0 for v in result.loop.losses)
    assert dict(counter.calls) == {}


def test_the_prior_loss_without_boolean_indexing_is_the_instance_plus_weighted_class_mean():
    torch.manual_seed(0)
    pred, target = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    prior = [False, True, False, True, True, False]
    mask = torch.tensor(prior)
    expected = diffusion_loss(pred[~mask], target[~mask]) + 0.7 * diffusion_loss(
        pred[mask], target[mask]
    )
    got = prior_preservation_loss(per_sample_loss(pred, target), prior, 0.7)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
    only_class = prior_preservation_loss(per_sample_loss(pred, target), [True] * 6, 0.5)
    assert torch.allclose(only_class, 0.5 * diffusion_loss(pred, target), rtol=1e-6)


# ---- EMA ---------------------------------------------------------------------------------------


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(3, 4), (5,), (2, 2, 2)]]


def _perturb(params: list[torch.nn.Parameter], step: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.1 * (step + i)).mul_(0.97)


def test_the_ema_is_one_fused_update_matching_the_per_tensor_formula(
    monkeypatch: pytest.MonkeyPatch,
):
    params = _params(0)
    ema = EMA(params, decay=0.9)
    expected = [p.detach().clone() for p in params]
    lerps: list[int] = []
    real = torch._foreach_lerp_

    def counting(*args: Any, **kwargs: Any) -> Any:
        lerps.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting)
    for step in range(1, 6):
        _perturb(params, step)
        decay = min(0.9, (1 + step - 1) / (10 + step - 1))
        for e, p in zip(expected, params, strict=True):
            e.mul_(decay).add_(p.detach() * (1 - decay))
        ema.update(step)
    assert lerps == [3] * 5  # one call over all tensors per step
    for s, e in zip(ema.shadow, expected, strict=True):
        assert torch.allclose(s, e, rtol=1e-6, atol=1e-7)


def test_an_offloaded_ema_follows_every_nth_step_in_the_background_and_resumes():
    on_device, offloaded = _params(1), _params(1)
    reference = EMA(on_device, decay=0.99, update_every=10)
    ema = EMA(offloaded, decay=0.99, offload_to_cpu=True)
    assert ema.update_every == 10
    for step in range(1, 31):
        _perturb(on_device, step)
        _perturb(offloaded, step)
        reference.update(step)
        ema.update(step)
        if step % 10 == 0:
            assert ema._pending is not None  # the CPU arithmetic runs on its own thread
    state = ema.state_dict()  # waits for the background update
    assert ema.updates == reference.updates == 30
    for s, r in zip(state["shadow"], reference.shadow, strict=True):
        assert torch.equal(s, r)
    again = EMA(_params(2), decay=0.99, offload_to_cpu=True)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.shadow, reference.shadow, strict=True))


# ---- checkpoints in the background -------------------------------------------------------------


class GatedStore(LocalStore):
    """The local store, whose uploads wait until the test opens the gate (or fail)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.waiting = threading.Event()
        self.fail: Exception | None = None

    def put_file(self, path: Path, uri: str) -> None:
        self.waiting.set()
        assert self.gate.wait(60)
        if self.fail is not None:
            raise self.fail
        super().put_file(path, uri)


def test_a_checkpoint_commits_in_the_background_from_a_snapshot_with_its_manifest_last(
    tmp_path: Path,
):
    store = GatedStore()
    out = str(tmp_path / "out")
    writer = CheckpointWriter(CheckpointStore(store, out, keep_last=2), tmp_path / "work")
    weights = {"unet.w": torch.ones(4, 4)}
    exp_avg = torch.full((4, 4), 2.0)
    moments: dict[str, Any] = {"state": {0: {"exp_avg": exp_avg}}, "param_groups": []}
    uri = writer.submit(TrainingState(step=7), weights, {"optimizer": moments})
    assert store.waiting.wait(30) and writer.busy  # submit returned while the upload waits
    # the next optimizer step changes the live tensors in place: the snapshot must not see it
    weights["unet.w"].add_(5.0)
    exp_avg.add_(5.0)
    folder = Path(uri)
    assert not (folder / MANIFEST_NAME).exists()  # nothing is complete while it uploads
    assert writer.poll() == []
    store.gate.set()
    done = writer.wait()
    assert [d.uri for d in done] == [uri] and done[0].seconds >= done[0].stall_seconds
    assert (folder / MANIFEST_NAME).exists()
    assert torch.equal(load_file(folder / "trainable.safetensors")["unet.w"], torch.ones(4, 4))
    optimizer = load_file(folder / "optimizer.safetensors")
    assert all(torch.equal(t, torch.full((4, 4), 2.0)) for t in optimizer.values())


def test_a_failed_background_checkpoint_is_raised_on_the_training_thread(tmp_path: Path):
    from difftrain.storage import StorageError

    store = GatedStore()
    store.fail = StorageError("s3://bucket/out: access denied (check storage.secretRef)")
    store.gate.set()
    writer = CheckpointWriter(
        CheckpointStore(store, str(tmp_path / "out"), keep_last=2), tmp_path / "w"
    )
    writer.submit(TrainingState(step=1), {"w": torch.zeros(2)}, {})
    with pytest.raises(StorageError, match="access denied"):
        writer.wait()
    assert writer.wait() == []  # raised once


def test_a_run_keeps_stepping_while_its_checkpoint_uploads(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Through the whole run: the step after a checkpoint starts before that checkpoint's
    manifest exists, and the run ends only when the last one is committed."""
    from difftrain.train import checkpoint as ckpt_module

    released = threading.Event()
    steps_during_upload: list[int] = []
    real_save = ckpt_module.CheckpointStore.save_snapshot

    def slow_save(self: Any, work_dir: Path, snap: Any) -> str:
        if snap.state.step == 3:
            assert released.wait(120)
        return real_save(self, work_dir, snap)

    monkeypatch.setattr(ckpt_module.CheckpointStore, "save_snapshot", slow_save)
    real_step = loop.Trainer._optimizer_step

    def step(self: loop.Trainer, batches: Any) -> Any:
        if self.state.step >= 3 and not released.is_set():
            steps_during_upload.append(self.state.step + 1)
            if self.state.step == 4:
                released.set()  # step 5 starts: let step 3's checkpoint commit
        return real_step(self, batches)

    monkeypatch.setattr(loop.Trainer, "_optimizer_step", step)
    hp = {"batchSize": 2, "maxSteps": 6, "warmupSteps": 1, "mixedPrecision": "no"}
    out = tmp_path / "out"
    result = _run(
        tiny_job(inputs, out, hyperparameters=hp, checkpointing={"everySteps": 3, "keepLast": 5}),
        tmp_path / "w",
    )
    assert steps_during_upload == [4, 5]
    for step_no in (3, 6):
        assert (out / "checkpoints" / f"step-{step_no:08d}" / MANIFEST_NAME).exists()
    assert result.loop.latest_checkpoint is not None
    assert result.loop.latest_checkpoint.endswith("step-00000006")


# ---- compilation -------------------------------------------------------------------------------


def _boom(gm: Any, example_inputs: Any) -> Any:
    raise RuntimeError("no C++ compiler for this backend")


def test_a_failing_compilation_falls_back_to_eager_with_a_warning_and_trains_the_same(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    hp = {"batchSize": 2, "maxSteps": 3, "warmupSteps": 1, "mixedPrecision": "no"}
    ckpt = {"everySteps": 3, "keepLast": 1}
    eager = _run(
        tiny_job(inputs, tmp_path / "a", hyperparameters=hp, checkpointing=ckpt), tmp_path / "wa"
    )
    monkeypatch.setattr(compiling, "BACKEND", _boom)
    with caplog.at_level(logging.WARNING, logger="difftrain.train.compiling"):
        fallback = _run(
            tiny_job(
                inputs,
                tmp_path / "b",
                hyperparameters={**hp, "compile": True},
                checkpointing=ckpt,
            ),
            tmp_path / "wb",
        )
    assert "torch.compile of the UNet failed, training it without compilation" in caplog.text
    assert "no C++ compiler" in caplog.text
    assert fallback.loop.state.step == 3
    a = load_file(tmp_path / "a" / "checkpoints" / "step-00000003" / "trainable.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-00000003" / "trainable.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert eager.loop.losses == pytest.approx(fallback.loop.losses, rel=1e-5)


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps its state (mixed precision included) per process; as its own test
    cases do, it is reset around a test that runs in another precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_compiled_unet_trains_keeps_its_weight_names_and_follows_eager(
    inputs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fresh_accelerate: None,
):
    """torch.compile for real (Dynamo tracing with the aot_eager backend, which needs no C++
    compiler), under bf16 autocast as on a GPU: the checkpoint has the eager run's tensor names
    and nearly its values."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    hp = {"batchSize": 2, "maxSteps": 2, "warmupSteps": 1, "mixedPrecision": "bf16"}
    ckpt = {"everySteps": 2, "keepLast": 1}
    _run(tiny_job(inputs, tmp_path / "a", hyperparameters=hp, checkpointing=ckpt), tmp_path / "w")
    with caplog.at_level(logging.WARNING, logger="difftrain.train.compiling"):
        compiled = _run(
            tiny_job(
                inputs, tmp_path / "b", hyperparameters={**hp, "compile": True}, checkpointing=ckpt
            ),
            tmp_path / "wb",
        )
    assert compiled.loop.state.step == 2
    assert "torch.compile" not in caplog.text  # it stayed compiled
    a = load_file(tmp_path / "a" / "checkpoints" / "step-00000002" / "trainable.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-2, atol=1e-4) for k in a)


# ---- gradient accumulation with several wrapped modules ----------------------------------------


def test_every_wrapped_module_skips_its_all_reduce_while_micro_batches_accumulate(tmp_path: Path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        unet, text = DDP(torch.nn.Linear(3, 3)), DDP(torch.nn.Linear(3, 3))
        with loop.no_sync_all([unet, text]):
            assert not unet.require_backward_grad_sync
            assert not text.require_backward_grad_sync
        assert unet.require_backward_grad_sync and text.require_backward_grad_sync
    finally:
        dist.destroy_process_group()


def test_a_run_that_fails_still_commits_the_checkpoint_it_was_uploading(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from difftrain.train import checkpoint as ckpt_module

    started = threading.Event()
    real_save = ckpt_module.CheckpointStore.save_snapshot

    def slow_save(self: Any, work_dir: Path, snap: Any) -> str:
        started.set()
        threading.Event().wait(2.0)  # still uploading when the next step fails
        return real_save(self, work_dir, snap)

    monkeypatch.setattr(ckpt_module.CheckpointStore, "save_snapshot", slow_save)
    real_step = loop.Trainer._optimizer_step

    def step(self: loop.Trainer, batches: Any) -> Any:
        if self.state.step == 2:
            assert started.wait(60)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_step(self, batches)

    monkeypatch.setattr(loop.Trainer, "_optimizer_step", step)
    hp = {"batchSize": 2, "maxSteps": 6, "warmupSteps": 1, "mixedPrecision": "no"}
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run(
            tiny_job(
                inputs, out, hyperparameters=hp, checkpointing={"everySteps": 2, "keepLast": 5}
            ),
            tmp_path / "w",
        )
    assert (out / "checkpoints" / "step-00000002" / MANIFEST_NAME).exists()
