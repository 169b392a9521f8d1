"""Checkpoints: the full training state, committed atomically, the newest resumed automatically.

A checkpoint is a prefix ``<output>/checkpoints/step-00001000/`` holding safetensors files (the
trainable weights, optimizer moments, EMA weights, RNG states) and ``state.json`` (step, epoch, data
position, scalar optimizer/scheduler state). The manifest is written last, so a checkpoint whose
upload was interrupted has none and is never resumed from. Nothing is pickled: optimizer and EMA
state dicts are split into tensors (safetensors) and a JSON skeleton.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from difftrain.storage import (
    MANIFEST_NAME,
    StorageError,
    Store,
    commit,
    join,
    read_manifest,
    sha256_file,
)

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step-(\d{8})$")
TENSOR_REF = "__tensor__"


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as safetensors stores them: on the CPU, contiguous, no two sharing memory.

    Optimizers may share one tensor between parameters (bitsandbytes' quantisation maps); only
    such repeats are copied, so a large optimizer state is not duplicated in memory.
    """
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        tensor = value.detach().to("cpu").contiguous()
        address = tensor.untyped_storage().data_ptr()
        if address in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def flatten_state(
    obj: Any, prefix: str = "", *, copy: bool = True
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state dict into a JSON skeleton and its tensors (named by path).

    With ``copy`` the tensors come back on the CPU and contiguous; without, as they are."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu").contiguous() if copy else value
            return {TENSOR_REF: path}
        if isinstance(value, dict):
            # JSON keys are strings; remember integer keys (optimizer state is keyed by index).
            return {
                "__dict__": [
                    [k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in value.items()
                ]
            }
        if isinstance(value, list | tuple):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path!r} in a checkpoint")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if TENSOR_REF in skeleton:
            return tensors[skeleton[TENSOR_REF]]
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


@dataclass
class TrainingState:
    """Where training stands: enough to continue exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already consumed (data position)
    images_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Snapshot:
    """A checkpoint's content copied into host memory: the training may go on meanwhile."""

    state: TrainingState
    trainable: dict[str, torch.Tensor]
    skeletons: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]


class HostBuffers:
    """Page-locked host buffers kept from one checkpoint to the next (allocating gigabytes of
    pinned memory is slow), into which GPU tensors are copied asynchronously."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.buffers[name] = buf
        buf.copy_(tensor.detach(), non_blocking=True)
        return buf


def snapshot(
    state: TrainingState,
    trainable: dict[str, torch.Tensor],
    components: dict[str, Any],
    buffers: HostBuffers | None = None,
) -> Snapshot:
    """Copy everything a checkpoint holds off the device (and off the live tensors).

    The only part of a checkpoint the training loop waits for: GPU tensors go into reused pinned
    buffers with one synchronisation at the end; CPU tensors are cloned, since the next optimizer
    step changes them in place.
    """
    on_gpu = False

    def host(name: str, tensor: torch.Tensor) -> torch.Tensor:
        nonlocal on_gpu
        if tensor.device.type == "cuda" and buffers is not None:
            on_gpu = True
            return buffers.copy(name, tensor)
        if tensor.device.type == "cpu":
            return tensor.detach().contiguous().clone()
        return tensor.detach().to("cpu").contiguous()

    host_trainable = {k: host(f"trainable/{k}", v) for k, v in trainable.items()}
    skeletons: dict[str, Any] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in components.items():
        skeleton, found = flatten_state(value, copy=False)
        skeletons[name] = skeleton
        tensors[name] = {k: host(f"{name}/{k}", v) for k, v in found.items()}
    if on_gpu:
        torch.cuda.current_stream().synchronize()
    frozen = TrainingState(**{**state.__dict__, "extra": json.loads(json.dumps(state.extra))})
    return Snapshot(frozen, host_trainable, skeletons, tensors)


@dataclass
class CheckpointDone:
    """A checkpoint the background writer committed."""

    uri: str
    seconds: float  # from the snapshot to the committed manifest
    stall_seconds: float  # the part the training loop waited for (the snapshot)


class CheckpointWriter:
    """Commits checkpoints on a background thread, one at a time, so no rank waits for the
    write, hashes and upload of the main process's checkpoint.

    ``submit`` snapshots the state (the loop waits only for that copy) and hands it to the
    thread; a checkpoint still in flight is finished first, so at most one snapshot is held in
    memory. ``poll`` returns the checkpoints committed since, ``wait`` finishes all; an upload
    error is raised by the next call on the loop's thread.
    """

    def __init__(self, store: CheckpointStore, work_dir: Path) -> None:
        self.store = store
        self.work_dir = work_dir
        self.buffers = HostBuffers()
        self._thread: threading.Thread | None = None
        self._done: list[CheckpointDone] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(
        self,
        state: TrainingState,
        trainable: dict[str, torch.Tensor],
        components: dict[str, Any],
    ) -> str:
        """Snapshot and start committing one checkpoint; its prefix."""
        self._join()
        start = time.perf_counter()
        snap = snapshot(state, trainable, components, self.buffers)
        stall = time.perf_counter() - start
        self._thread = threading.Thread(
            target=self._write, args=(snap, start, stall), name="checkpoint-writer", daemon=True
        )
        self._thread.start()
        return step_prefix(self.store.output_uri, state.step)

    def _write(self, snap: Snapshot, start: float, stall: float) -> None:
        try:
            uri = self.store.save_snapshot(self.work_dir, snap)
            done = CheckpointDone(uri, time.perf_counter() - start, stall)
            with self._lock:
                self._done.append(done)
        except BaseException as exc:  # noqa: BLE001 - raised on the loop's thread
            with self._lock:
                self._error = exc

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def busy(self) -> bool:
        """Whether a checkpoint is being written now."""
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> list[CheckpointDone]:
        """Checkpoints committed since the last call (raises the writer's error, if any)."""
        self._raise()
        with self._lock:
            done, self._done = self._done, []
        return done

    def wait(self) -> list[CheckpointDone]:
        """Finish the checkpoint in flight; all committed since the last call."""
        self._join()
        return self.poll()


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back from the store."""

    uri: str
    state: TrainingState
    trainable: dict[str, torch.Tensor]
    components: dict[str, Any]  # name -> state dict (optimizer, lr_scheduler, ema, rng)


def step_prefix(output_uri: str, step: int) -> str:
    """The prefix of the checkpoint taken after ``step`` optimizer steps."""
    return join(output_uri, "checkpoints", f"step-{step:08d}")


class CheckpointStore:
    """Writes, finds, reads and prunes the checkpoints under an output prefix."""

    def __init__(self, store: Store, output_uri: str, keep_last: int) -> None:
        self.store = store
        self.output_uri = output_uri
        self.root = join(output_uri, "checkpoints")
        self.keep_last = keep_last

    def _steps(self) -> dict[int, bool]:
        """Checkpoint steps found under the root -> whether its manifest exists."""
        found: dict[int, bool] = {}
        for uri in self.store.list(self.root + "/"):
            rel = uri[len(self.root) + 1 :]
            folder, _, name = rel.partition("/")
            m = STEP_DIR.match(folder)
            if not m:
                continue
            step = int(m.group(1))
            found[step] = found.get(step, False) or name == MANIFEST_NAME
        return found

    def complete_steps(self) -> list[int]:
        """Steps of the committed checkpoints, oldest first."""
        return sorted(s for s, done in self._steps().items() if done)

    def latest(self) -> str | None:
        """URI of the newest complete checkpoint, if any."""
        steps = self.complete_steps()
        return step_prefix(self.output_uri, steps[-1]) if steps else None

    def save(
        self,
        work_dir: Path,
        state: TrainingState,
        trainable: dict[str, torch.Tensor],
        components: dict[str, Any],
    ) -> str:
        """Write and commit one checkpoint; then drop the ones beyond ``keep_last``."""
        return self.save_snapshot(work_dir, snapshot(state, trainable, components))

    def save_snapshot(self, work_dir: Path, snap: Snapshot) -> str:
        """Write, hash and commit a snapshot (the manifest last); then prune."""
        state = snap.state
        local = work_dir / f"checkpoint-{state.step:08d}"
        if local.exists():
            shutil.rmtree(local)
        local.mkdir(parents=True)
        files: dict[str, Path] = {}
        save_file(snap.trainable, local / "trainable.safetensors")
        files["trainable.safetensors"] = local / "trainable.safetensors"
        for name, tensors in snap.tensors.items():
            if tensors:
                path = local / f"{name}.safetensors"
                save_file(_unshared(tensors), path)
                files[path.name] = path
        doc = {"state": state.__dict__, "components": snap.skeletons, "format": 1}
        (local / "state.json").write_text(json.dumps(doc))
        files["state.json"] = local / "state.json"
        prefix = step_prefix(self.output_uri, state.step)
        commit(self.store, prefix, files, metadata={"step": state.step})
        shutil.rmtree(local, ignore_errors=True)
        self.prune()
        return prefix

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints and older partial ones."""
        steps = self._steps()
        complete = sorted(s for s, done in steps.items() if done)
        keep = set(complete[-self.keep_last :])
        newest = complete[-1] if complete else -1
        for step, done in steps.items():
            if step in keep or (not done and step > newest):
                continue  # a partial checkpoint newer than the newest may still be uploading
            prefix = step_prefix(self.output_uri, step)
            # The manifest goes first, so a half-deleted checkpoint is never taken as complete.
            files = sorted(
                self.store.list(prefix + "/"), key=lambda u: not u.endswith(MANIFEST_NAME)
            )
            for uri in files:
                self.store.delete(uri)
            logger.info("checkpoint pruned step=%d", step)

    def load(self, prefix: str, work_dir: Path) -> LoadedCheckpoint:
        """Download a committed checkpoint, verify every file's sha256 and read it."""
        manifest = read_manifest(self.store, prefix)
        if manifest is None:
            raise StorageError(f"checkpoint {prefix} has no manifest: it was never completed")
        local = work_dir / ("resume-" + prefix.rstrip("/").rsplit("/", 1)[-1])
        local.mkdir(parents=True, exist_ok=True)
        for entry in manifest["files"]:
            path = local / entry["name"]
            with (
                self.store.open_stream(join(prefix, entry["name"])) as src,
                open(path, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 8 << 20)
            if sha256_file(path) != entry["sha256"]:
                raise StorageError(
                    f"checkpoint file {join(prefix, entry['name'])} does not match its manifest's "
                    "sha256 (corrupted in the store); delete that checkpoint to resume from an "
                    "older one"
                )
        doc = json.loads((local / "state.json").read_text())
        components = {}
        for name, skeleton in doc["components"].items():
            path = local / f"{name}.safetensors"
            tensors = load_file(path) if path.exists() else {}
            components[name] = unflatten_state(skeleton, tensors)
        trainable = load_file(local / "trainable.safetensors")
        shutil.rmtree(local, ignore_errors=True)
        return LoadedCheckpoint(
            uri=prefix,
            state=TrainingState(**doc["state"]),
            trainable=trainable,
            components=components,
        )
