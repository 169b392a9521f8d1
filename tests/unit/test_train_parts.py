"""The training runtime's pure parts: objective, checkpoints, EMA, launcher, reporting, metrics."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftrain.api import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED
from difftrain.storage import MANIFEST_NAME, LocalStore
from difftrain.train import objective
from difftrain.train.checkpoint import (
    CheckpointStore,
    TrainingState,
    flatten_state,
    step_prefix,
    unflatten_state,
)
from difftrain.train.ema import EMA
from difftrain.train.launch import (
    Topology,
    combined_exit_code,
    pod_exit_code,
    rendezvous_parameters,
)
from difftrain.train.metrics import TrainingMetrics
from difftrain.train.report import format_eta, progress_text
from difftrain.train.sampling import image_grid, should_sample
from tests.infra.processes import free_port

# --- objective ------------------------------------------------------------------------------


@given(
    kind=st.sampled_from(["constant", "linear", "cosine"]),
    warmup=st.integers(0, 50),
    extra=st.integers(1, 500),
)
def test_lr_schedule_warms_up_linearly_then_follows_its_shape(kind, warmup, extra):
    total = warmup + extra
    f = objective.lr_lambda(kind, warmup, total)
    for step in range(warmup):
        assert f(step) == pytest.approx((step + 1) / warmup)
    assert f(warmup) == pytest.approx(1.0)
    values = [f(s) for s in range(warmup, total + 1)]
    assert all(0.0 <= v <= 1.0 for v in values)
    if kind == "constant":
        assert values == [1.0] * len(values)
    else:
        assert values == sorted(values, reverse=True)  # never increases after warm-up
        assert values[-1] == pytest.approx(0.0, abs=1e-9)


def test_step_generator_is_a_function_of_its_coordinates():
    a = torch.randn(4, generator=objective.step_generator(7, "step", 3, 0, 0))
    b = torch.randn(4, generator=objective.step_generator(7, "step", 3, 0, 0))
    c = torch.randn(4, generator=objective.step_generator(7, "step", 4, 0, 0))
    d = torch.randn(4, generator=objective.step_generator(7, "step", 3, 0, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_min_snr_weights_clip_high_snr_steps_only():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    t = torch.arange(0, 1000, 37)
    snr = objective.snr(sched, t)
    w = objective.min_snr_weights(sched, t, 5.0, "epsilon")
    low = snr < 5.0
    assert torch.allclose(w[low], torch.ones_like(w[low]))  # noisy steps keep weight 1
    assert torch.all(w[~low] < 1.0)  # clean steps are down-weighted
    assert torch.allclose(w[~low], 5.0 / snr[~low])
    wv = objective.min_snr_weights(sched, t, 5.0, "v_prediction")
    assert torch.allclose(wv, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_v_prediction_target_is_the_velocity():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    x = torch.randn(2, 4, 8, 8)
    n = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    v = objective.target_for(sched, x, n, t, "v_prediction")
    assert torch.allclose(v, a * n - s * x, atol=1e-5)
    assert objective.target_for(sched, x, n, t, "epsilon") is n
    with pytest.raises(ValueError, match="predictionType"):
        objective.target_for(sched, x, n, t, "sample")


def test_noise_offset_shifts_each_channel_by_a_constant():
    lat = torch.zeros(3, 4, 16, 16)
    plain = objective.sample_noise(lat, objective.step_generator(1, 0), 0.0)
    offset = objective.sample_noise(lat, objective.step_generator(1, 0), 0.1)
    diff = offset - plain
    per_channel = diff.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel), atol=1e-6)
    assert diff.abs().max() > 0


def test_weighted_loss_weights_each_sample():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert objective.diffusion_loss(pred, target).item() == pytest.approx((1 + 4) / 2)
    w = torch.tensor([1.0, 0.0])
    assert objective.diffusion_loss(pred, target, w).item() == pytest.approx(0.5)


# --- checkpoints ----------------------------------------------------------------------------


def _optimizer_after_steps(model: torch.nn.Module, steps: int) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(steps):
        loss = model(torch.full((1, 3), float(i))).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_optimizer_state_survives_flattening_without_pickle(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = _optimizer_after_steps(model, 3)
    skeleton, tensors = flatten_state(opt.state_dict())
    json.dumps(skeleton)  # the skeleton is plain JSON
    save_file(tensors, tmp_path / "opt.safetensors")
    restored = unflatten_state(
        json.loads(json.dumps(skeleton)), load_file(tmp_path / "opt.safetensors")
    )

    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    opt2.load_state_dict(restored)
    for m, o in ((model, opt), (twin, opt2)):
        m(torch.ones(1, 3)).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_flatten_refuses_objects_it_cannot_store_safely():
    with pytest.raises(TypeError, match="cannot store"):
        flatten_state({"fn": print})


def _save(ckpts: CheckpointStore, tmp_path: Path, step: int) -> str:
    return ckpts.save(
        tmp_path / "work",
        TrainingState(step=step, epoch=1, batch_in_epoch=2, images_seen=step * 8),
        {"w": torch.full((2,), float(step))},
        {"rng": {"torch": torch.get_rng_state()}, "lr_scheduler": {"last_epoch": step}},
    )


def test_checkpoints_keep_the_newest_and_ignore_partial_ones(tmp_path: Path):
    out = str(tmp_path / "out")
    ckpts = CheckpointStore(LocalStore(), out, keep_last=2)
    for step in (10, 20, 30):
        _save(ckpts, tmp_path, step)
    assert ckpts.complete_steps() == [20, 30]
    assert not (tmp_path / "out/checkpoints/step-00000010").exists()
    # an upload cut short: files but no manifest
    partial = Path(step_prefix(out, 40))
    partial.mkdir(parents=True)
    (partial / "trainable.safetensors").write_bytes(b"half")
    assert ckpts.latest() == step_prefix(out, 30)
    loaded = ckpts.load(ckpts.latest() or "", tmp_path / "dl")
    assert loaded.state == TrainingState(step=30, epoch=1, batch_in_epoch=2, images_seen=240)
    assert torch.equal(loaded.trainable["w"], torch.full((2,), 30.0))
    assert loaded.components["lr_scheduler"] == {"last_epoch": 30}


def test_a_corrupted_checkpoint_file_is_refused(tmp_path: Path):
    from difftrain.storage import StorageError

    out = str(tmp_path / "out")
    ckpts = CheckpointStore(LocalStore(), out, keep_last=3)
    prefix = _save(ckpts, tmp_path, 5)
    Path(prefix, "trainable.safetensors").write_bytes(b"garbage")
    assert Path(prefix, MANIFEST_NAME).exists()
    with pytest.raises(StorageError, match="does not match its manifest"):
        ckpts.load(prefix, tmp_path / "dl")


# --- EMA --------------------------------------------------------------------------------------


def test_ema_follows_the_weights_and_is_applied_temporarily():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5, start_step=2)
    with torch.no_grad():
        p.fill_(4.0)
    ema.update(1)  # before start_step: copies
    assert torch.equal(ema.shadow[0], torch.full((3,), 4.0))
    with torch.no_grad():
        p.fill_(8.0)
    decay = ema.current_decay()  # warm-up: (1+0)/(10+0) = 0.1
    ema.update(2)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 4.0 * decay + 8.0 * (1 - decay)))
    with ema.applied():
        assert torch.allclose(p.detach(), ema.shadow[0])
    assert torch.equal(p.detach(), torch.full((3,), 8.0))
    state = ema.state_dict()
    other = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.5)
    other.load_state_dict(state)
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.updates == 1


# --- launcher, reporting, sampling ----------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([0, 0], 0),
        ([EXIT_INTERRUPTED, EXIT_INTERRUPTED], EXIT_INTERRUPTED),
        ([0, EXIT_INTERRUPTED], EXIT_INTERRUPTED),
        ([EXIT_INTERRUPTED, 1], 1),
        ([1, EXIT_CONFIG_ERROR], EXIT_CONFIG_ERROR),
        ([-9, 0], -9),
    ],
)
def test_launcher_exit_code_tells_the_operator_what_happened(codes, expected):
    assert combined_exit_code(codes) == expected


@pytest.mark.parametrize(
    ("machines", "gpus", "per_machine"), [(1, 1, 1), (1, 4, 4), (2, 1, 1), (3, 2, 2)]
)
def test_every_topology_with_more_than_one_process_is_launched(machines, gpus, per_machine):
    """N workers x M GPUs: one process group of N*M ranks (2 x 1 used to train 2 copies)."""
    topo = Topology.from_env(
        {
            "DIFFTRAIN_NUM_MACHINES": str(machines),
            "DIFFTRAIN_NUM_PROCESSES": str(machines * gpus),
            "DIFFTRAIN_MACHINE_RANK": str(machines - 1),
            "DIFFTRAIN_MAIN_ADDRESS": "job-0.job-workers.ns.svc",
            "DIFFTRAIN_MAIN_PORT": "29400",
            "DIFFTRAIN_JOB_NAME": "pokemon",
        }
    )
    assert topo.per_machine == per_machine and topo.world_size == machines * gpus
    assert topo.needs_launcher == (machines * gpus > 1)
    params = rendezvous_parameters(topo)
    assert (params.backend, params.min_nodes, params.max_nodes) == ("c10d", machines, machines)
    assert params.endpoint == "job-0.job-workers.ns.svc:29400"
    # only machine 0 hosts the rendezvous store, whatever its host name
    assert params.get_as_bool("is_host") == (machines == 1)
    assert params.run_id == "pokemon"


def test_a_process_killed_by_a_signal_reports_as_a_shell_would():
    assert pod_exit_code(-9) == 137 and pod_exit_code(-15) == 143
    assert pod_exit_code(EXIT_INTERRUPTED) == EXIT_INTERRUPTED and pod_exit_code(0) == 0


def test_the_pod_environment_names_the_rendezvous_and_the_stop_timeout():
    topo = Topology.from_env(
        {
            "DIFFTRAIN_RUN_ID": "uid-7",
            "DIFFTRAIN_JOB_NAME": "pokemon",
            "DIFFTRAIN_POD_IP": "10.244.0.9",
            "DIFFTRAIN_STOP_TIMEOUT": "285",
            "DIFFTRAIN_MAX_RESTARTS": "1",
        }
    )
    assert (topo.run_id, topo.local_address) == ("uid-7", "10.244.0.9")
    assert (topo.stop_timeout_s, topo.max_restarts) == (285, 1)
    assert Topology.from_env({"DIFFTRAIN_JOB_NAME": "pokemon"}).run_id == "pokemon"


def test_processes_flag_counts_processes_on_this_machine():
    topo = Topology.from_env({}, processes=2)
    assert (topo.num_machines, topo.per_machine, topo.world_size) == (1, 2, 2)
    assert not Topology.from_env({}).needs_launcher


def test_eta_and_progress_texts():
    assert format_eta(4800) == "1h20m"
    assert format_eta(250) == "4m10s"
    assert format_eta(12.7) == "12s"
    assert progress_text(250, 1000) == "250/1000 (25%)"


@settings(max_examples=50)
@given(step=st.integers(1, 1000), total=st.integers(1, 1000), every=st.integers(0, 100))
def test_samples_every_n_steps_and_at_the_end(step, total, every):
    expected = step == total or (every > 0 and step % every == 0)
    assert should_sample(step, total, every) == expected


def test_grid_tiles_images():
    from PIL import Image

    images = [Image.new("RGB", (8, 6), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(images)
    assert grid.size == (3 * 8, 2 * 6)
    assert grid.getpixel((8 + 1, 1)) == (40, 0, 0)


# --- metrics --------------------------------------------------------------------------------


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("difftrain_") and "{" in line:
            name = line.split("{", 1)[0]
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


def test_metrics_are_served_with_the_contract_names_and_move():
    m = TrainingMetrics("job-a", "ns", 0)
    port = free_port()
    m.serve(port, addr="127.0.0.1")
    before = _scrape(port)
    for name in (
        "difftrain_loss",
        "difftrain_learning_rate",
        "difftrain_images_per_second",
        "difftrain_step",
        "difftrain_total_steps",
        "difftrain_eta_seconds",
        "difftrain_images_seen_total",
        "difftrain_gpu_memory_bytes",
        "difftrain_data_wait_seconds_total",
        "difftrain_checkpoint_duration_seconds_count",
    ):
        assert name in before, name
    m.record_step(
        step=5,
        total_steps=10,
        loss=0.25,
        learning_rate=1e-4,
        images=16,
        images_per_second=32.0,
        eta_seconds=2.5,
        data_wait_seconds=0.1,
        gpu_memory_bytes=0,
    )
    m.record_checkpoint(3.0)
    after = _scrape(port)
    assert after["difftrain_step"] == 5 and after["difftrain_total_steps"] == 10
    assert after["difftrain_images_seen_total"] == before["difftrain_images_seen_total"] + 16
    assert after["difftrain_checkpoint_duration_seconds_count"] == 1
    # labels that Prometheus's own job/namespace target labels do not rename (exported_job)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'difftrain_step{rank="0",training_job="job-a",training_namespace="ns"} 5.0' in text
    assert "job=" not in text.replace("training_job=", "")


# --- batches ------------------------------------------------------------------------------------


def test_prefetched_and_inline_batches_are_the_same_and_resume_at_a_position():
    import random

    from difftrain.train.batches import (
        BatchBuilder,
        Example,
        InlineBatches,
        Prefetcher,
        data_position,
    )

    class Sampler:
        def __init__(self) -> None:
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            order = list(range(6))
            random.Random(self.epoch).shuffle(order)
            return iter([order[:3], order[3:]])

    class Cached:
        def __init__(self, i: int) -> None:
            self.latent_params = torch.full((8, 2, 2), float(i))
            self.latent_params_flipped = None
            self.text_embeddings = torch.full((3, 4), float(i))
            self.pooled = self.sizes = None  # SDXL's, not cached here

    examples = [
        Example(key=str(i), caption=f"c{i}", size=(4, 4), cached=Cached(i)) for i in range(6)
    ]
    builder = BatchBuilder(
        examples,
        seed=1,
        transform=None,
        decode=None,
        flip_probability=0.0,
        caption_dropout=0.0,
        scaling_factor=0.5,
    )
    inline = InlineBatches(data_position(Sampler(), 0, 0), builder)
    ahead = Prefetcher(data_position(Sampler(), 0, 0), builder)
    seq_a = [inline.next() for _ in range(5)]
    seq_b = [ahead.next() for _ in range(5)]
    ahead.close()
    for (ea, ia, ba), (eb, ib, bb) in zip(seq_a, seq_b, strict=True):
        assert (ea, ia, ba.captions) == (eb, ib, bb.captions)
        assert ba.latents is not None and bb.latents is not None
        assert torch.equal(ba.latents, bb.latents)
    # resuming at (epoch 1, batch 1) gives what the uninterrupted sequence gave there
    resumed = InlineBatches(data_position(Sampler(), 1, 1), builder).next()
    assert resumed[:2] == seq_a[3][:2] and resumed[2].captions == seq_a[3][2].captions
    first, second = resumed[2].latents, seq_a[3][2].latents
    assert first is not None and second is not None
    assert torch.equal(first, second)


class _CachedText:
    """A cached example whose text embedding is filled with its index."""

    def __init__(self, i: int) -> None:
        self.latent_params = torch.zeros((8, 2, 2))
        self.latent_params_flipped = None
        self.text_embeddings = torch.full((3, 4), float(i))
        self.pooled = self.sizes = None  # SDXL's, not cached here


@pytest.mark.parametrize("share", [0.0, 0.1, 0.5])
def test_caption_dropout_replaces_the_configured_share_with_the_empty_embedding(share):
    from difftrain.train.batches import BatchBuilder, Example

    n = 2000
    examples = [
        Example(key=str(i), caption=f"c{i}", size=(4, 4), cached=_CachedText(i)) for i in range(n)
    ]
    builder = BatchBuilder(
        examples,
        seed=3,
        transform=None,
        decode=None,
        flip_probability=0.0,
        caption_dropout=share,
        scaling_factor=1.0,
    )
    builder.empty_embedding = torch.full((3, 4), -1.0)
    dropped_by_epoch = []
    for epoch in (0, 1):
        batch = builder(epoch, 0, list(range(n)))
        assert batch.text_embeddings is not None
        dropped = {i for i, c in enumerate(batch.captions) if c == ""}
        for i in range(n):
            expected = -1.0 if i in dropped else float(i)
            assert torch.equal(batch.text_embeddings[i], torch.full((3, 4), expected))
            if i not in dropped:
                assert batch.captions[i] == f"c{i}"
        # the share dropped is the one configured (binomial: within four standard deviations)
        assert abs(len(dropped) / n - share) <= 4 * (share * (1 - share) / n) ** 0.5
        dropped_by_epoch.append(dropped)
    if share:
        # each epoch draws again: a caption is not dropped for the whole run
        assert dropped_by_epoch[0] != dropped_by_epoch[1]


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_weight_decay_shrinks_untouched_weights_as_adamw_says(weight_decay):
    """A weight whose gradient is zero moves only by decoupled decay: p <- p * (1 - lr * wd)."""
    from difftrain.train.loop import make_optimizer
    from tests.unit.test_operator_builders import training_job

    job = training_job(
        hyperparameters={"learningRate": 0.01}, regularization={"weightDecay": weight_decay}
    )
    spec = job.spec.resolved()
    untouched = torch.nn.Parameter(torch.linspace(-2.0, 2.0, 16))
    touched = torch.nn.Parameter(torch.ones(4))
    before = untouched.detach().clone()
    optimizer = make_optimizer(spec, [untouched, touched])
    for _ in range(3):
        untouched.grad = torch.zeros_like(untouched)
        touched.grad = torch.ones_like(touched)
        optimizer.step()
    expected = before * (1 - 0.01 * weight_decay) ** 3
    torch.testing.assert_close(untouched.detach(), expected, rtol=1e-6, atol=1e-7)
    assert touched.detach().lt(1.0).all()  # the others learn as usual
