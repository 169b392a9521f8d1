"""Several machines and processes through torch's elastic launcher, on the CPU (gloo).

Each "machine" is a `difftrain run` process with its own work folder and the environment the
operator gives a worker pod; they meet at a c10d rendezvous on loopback, as pods do at the
headless Service. Faults are real: a training process is killed with SIGKILL mid-run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difftrain import api
from difftrain.data.cache import CACHE_FOLDER
from tests.infra.processes import free_port
from tests.latent_fixtures import cache_shard_ranks, cache_tensors
from tests.training import REPO, prepare_local_inputs, run_cli, tiny_job, write_job


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_local_inputs(tmp_path_factory.mktemp("inputs"))


def _short(**hp: object) -> dict[str, object]:
    return {"batchSize": 2, "maxSteps": 6, "warmupSteps": 1, "mixedPrecision": "no", **hp}


def _machine(
    job: Path, work: Path, *, machines: int, per_machine: int, rank: int, port: int
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DIFFTRAIN_NUM_MACHINES": str(machines),
        "DIFFTRAIN_NUM_PROCESSES": str(machines * per_machine),
        "DIFFTRAIN_MACHINE_RANK": str(rank),
        "DIFFTRAIN_MAIN_ADDRESS": "127.0.0.1",
        "DIFFTRAIN_MAIN_PORT": str(port),
        "DIFFTRAIN_RUN_ID": f"test-{port}",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "difftrain", "run", str(job), "--local", "--work-dir", str(work)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 400) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, out))
    return results


def _state(output: Path, step: int) -> dict[str, int]:
    path = output / "checkpoints" / f"step-{step:08d}" / "state.json"
    state: dict[str, int] = json.loads(path.read_text())["state"]
    return state


def _children(pid: int) -> list[int]:
    """The processes that ``pid`` started (the elastic agent's training processes)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_two_machines_with_one_process_each_train_one_model(inputs: Path, tmp_path: Path):
    """2 workers x 1 GPU: one process group of two ranks, not two separate runs."""
    out = tmp_path / "out"
    job = tiny_job(inputs, out, hyperparameters=_short(), checkpointing={"everySteps": 3})
    path = write_job(tmp_path / "job.yaml", job)
    port = free_port()
    procs = [
        _machine(path, tmp_path / f"w{r}", machines=2, per_machine=1, rank=r, port=port)
        for r in (0, 1)
    ]
    (code0, log0), (code1, log1) = _finish(procs)
    assert (code0, code1) == (0, 0), log0[-3000:] + log1[-3000:]
    state = _state(out, 6)
    assert state["step"] == 6
    assert state["images_seen"] == 6 * 2 * 2  # two ranks, batch 2 each: one model
    # rank 0 (machine 0) read the images; machine 1's process got the kept pairs from it
    assert "rank 1 read no image" in log1 and "rank 1 read no image" not in log0
    assert "trained 6 steps" in log0 and "trained 6 steps" not in log1
    assert (out / "export" / "model.safetensors").exists()


def test_a_killed_training_process_restarts_the_group_from_the_newest_checkpoint(
    inputs: Path, tmp_path: Path
):
    out = tmp_path / "out"
    job = tiny_job(
        inputs,
        out,
        hyperparameters=_short(maxSteps=8),
        checkpointing={"everySteps": 2, "keepLast": 10},
    )
    path = write_job(tmp_path / "job.yaml", job)
    proc = _machine(path, tmp_path / "w", machines=1, per_machine=2, rank=0, port=free_port())
    deadline = time.monotonic() + 300
    first = out / "checkpoints" / "step-00000002" / "_manifest.json"
    while not first.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    ((code, log),) = _finish([proc])
    assert code == 0, log[-4000:]
    # every rank restarted and resumed; the run ends at exactly maxSteps, with every image counted
    assert f"resumed checkpoint={out}/checkpoints/step-0000000" in log, log[-4000:]
    state = _state(out, 8)
    assert state["step"] == 8 and state["images_seen"] == 8 * 2 * 2


def test_a_machine_that_dies_whole_is_replaced_and_the_group_resumes(inputs: Path, tmp_path: Path):
    """A worker pod killed: its agent and its process die; a new machine 1 joins the rendezvous."""
    out = tmp_path / "out"
    job = tiny_job(
        inputs,
        out,
        hyperparameters=_short(maxSteps=8),
        checkpointing={"everySteps": 2, "keepLast": 10},
    )
    path = write_job(tmp_path / "job.yaml", job)
    port = free_port()
    procs = [
        _machine(path, tmp_path / f"w{r}", machines=2, per_machine=1, rank=r, port=port)
        for r in (0, 1)
    ]
    deadline = time.monotonic() + 300
    first = out / "checkpoints" / "step-00000002" / "_manifest.json"
    while not first.exists():
        assert all(p.poll() is None for p in procs), "a machine ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)
    # as when a pod's container is killed: the agent and its training process, at once
    for pid in (procs[1].pid, *_children(procs[1].pid)):
        os.kill(pid, signal.SIGKILL)
    procs[1].wait()
    replacement = _machine(path, tmp_path / "w1-new", machines=2, per_machine=1, rank=1, port=port)
    (code0, log0), (code1, log1) = _finish([procs[0], replacement])
    assert (code0, code1) == (0, 0), log0[-4000:] + log1[-4000:]
    assert f"resumed checkpoint={out}/checkpoints/step-0000000" in log0, log0[-4000:]
    # machine 0's process saw its peer gone (not a hang until a collective times out)
    assert "Connection closed by peer" in log0
    state = _state(out, 8)
    assert state["step"] == 8 and state["images_seen"] == 8 * 2 * 2


def test_a_configuration_error_on_one_machine_stops_all_without_restarts(
    inputs: Path, tmp_path: Path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    job = tiny_job(inputs, tmp_path / "out", hyperparameters=_short(maxSteps=2))
    job["spec"]["dataset"]["uri"] = str(empty)
    path = write_job(tmp_path / "job.yaml", job)
    port = free_port()
    procs = [
        _machine(path, tmp_path / f"w{r}", machines=2, per_machine=1, rank=r, port=port)
        for r in (0, 1)
    ]
    (code0, log0), (code1, log1) = _finish(procs, timeout=180)
    assert code0 == api.EXIT_CONFIG_ERROR, log0[-3000:]
    assert code1 == api.EXIT_CONFIG_ERROR, log1[-3000:]
    assert "dataset.uri" in log0 and "Traceback" not in log0 + log1
    # a configuration error is an answer: the group is not started again
    assert log0.count("base model loaded") == 1, log0[-3000:]


def test_every_process_encodes_its_share_of_the_latent_cache(inputs: Path, tmp_path: Path):
    """A cache miss in a group of two: each process encodes half the images and their Boomerang
    variants, the main one commits the index once both shares are up; the cache holds what one
    process builds, and the group's next run finds it."""
    in_run, by_command = tmp_path / "ds-run", tmp_path / "ds-command"
    for folder in (in_run, by_command):
        folder.mkdir()
        for image in sorted((inputs / "dataset").glob("*.png"))[:12]:
            shutil.copy(image, folder / image.name)
            shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    job = tiny_job(
        inputs,
        tmp_path / "out",
        hyperparameters=_short(maxSteps=2, seed=7),
        preprocessing={
            "resolution": 64,
            "flipProbability": 0.5,
            "cacheLatents": True,
            "boomerang": {"enabled": True, "copies": 1, "strength": 0.3},
        },
    )
    job["spec"]["dataset"]["uri"] = str(in_run)
    path = write_job(tmp_path / "job.yaml", job)
    started = time.monotonic()
    proc = _machine(path, tmp_path / "w", machines=1, per_machine=2, rank=0, port=free_port())
    ((code, log),) = _finish([proc])
    first_seconds = time.monotonic() - started
    assert code == 0, log[-4000:]
    encoded = dict(re.findall(r"latent cache: rank (\d) encoded (\d+) samples", log))
    assert encoded == {"0": "12", "1": "12"}, log[-4000:]  # 6 images + 6 variants each
    # images 0-5 and their variants (rank 0), 6-11 and theirs (rank 1): a shard each
    assert cache_shard_ranks(in_run / CACHE_FOLDER) == ["0", "1"]

    args = ["dataset", "cache", str(by_command), "--model", str(inputs / "base-model")]
    args += ["--resolution", "64", "--flip-probability", "0.5", "--min-resolution", "32"]
    args += ["--near-duplicate-distance", "0", "--boomerang-copies", "1"]
    args += ["--boomerang-strength", "0.3", "--seed", "7", "--json"]
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["samples"] == 24
    # the same samples under the same addresses, whoever encoded them
    shared = cache_tensors(in_run / CACHE_FOLDER)
    alone = cache_tensors(by_command / CACHE_FOLDER)
    assert sorted(shared) == sorted(alone)
    assert sum(n.startswith("latent/") for n in shared) == 24
    for name, tensor in shared.items():
        # variants made in batches of another size may differ by a grey level here and there
        torch.testing.assert_close(tensor, alone[name], rtol=1e-3, atol=2e-3)

    job["spec"]["output"] = {"uri": str(tmp_path / "out-again")}
    path = write_job(tmp_path / "again.yaml", job)
    started = time.monotonic()
    proc = _machine(path, tmp_path / "w2", machines=1, per_machine=2, rank=0, port=free_port())
    ((code, log),) = _finish([proc])
    assert code == 0, log[-4000:]
    assert "cache=True" in log and "latent cache: rank" not in log, log[-4000:]
    print(f"first run {first_seconds:.1f}s, second (cache hit) {time.monotonic() - started:.1f}s")
