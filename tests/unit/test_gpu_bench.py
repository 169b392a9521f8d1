"""benchmarks/gpu_train.py: its tiny CPU mode runs end to end and reports every row.

The tiny mode is a smoke check of the GPU benchmark's code paths (difftrain's run_training with a
timing Reporter, the cache build, the example-style anchor loop, the JSON), not a performance
figure; the GPU run itself is documented in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import gpu_train
from benchmarks.sd_shapes import difftrain_trains_sdxl
from difftrain import api
from difftrain.train.report import Progress

REPO = Path(__file__).resolve().parents[2]
TRAINED = ["full b8", "lora b8", "full+eager b8", "full+gc b8", "full b32"]
MEASURED = ["full b8", "example b8", "precompute", "lora b8", "full+eager b8", "full+gc b8"]
MEASURED += ["full b32"]


def test_tiny_mode_reports_every_row_with_images_per_second_and_a_ratio(tmp_path):
    out = tmp_path / "out"
    # a budget no row reaches on a busy machine: the test checks rows, not time
    env = {**os.environ, "OUT": str(out), "TINY": "1", "BUDGET_S": "900"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_train.py"), "--work", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    seconds = time.perf_counter() - start
    print(f"tiny mode took {seconds:.0f} s")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((out / gpu_train.JSON_NAME).read_text())
    assert report["mode"].startswith("tiny")
    for key in ("card", "torch", "diffusers", "accelerate"):
        assert report["environment"][key]
    assert report["unet_train_flops_per_image"] > 0
    assert report["matmul_flops"] > 0
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [*MEASURED, "sdxl full b8"]
    for name in MEASURED:
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["img_s"] > 0, row
        assert row["ratio"] > 0, row
    assert rows["example b8"]["ratio"] == 1.0
    assert rows["example b8"]["encode_img_s"] > 0
    steps = report["context"]["steps"]
    assert rows["full+eager b8"]["compile"] is False  # what torch.compile gains
    assert rows["full+gc b8"]["gradient_checkpointing"] is True  # what checkpointing costs
    assert rows["full b8"]["gradient_checkpointing"] is False
    for name in TRAINED:
        row = rows[name]
        assert row["steps_measured"] == steps
        assert row["checkpoint_s"] > 0
        assert row["checkpoint_gb"] > 0
        # stopped after the timed steps: no sample, no export, the checkpoint of a stopped run
        assert row["interrupted"] is True
        assert row["checkpoint_step"] == steps + report["context"]["warmup"]
        assert row["mfu"] > 0
    assert rows["full b8"]["cache_hit"] is False  # the first run builds the latent cache
    assert rows["precompute"]["images"] == report["context"]["dataset_count"]
    assert rows["precompute"]["end_to_end_img_s"] > 0
    sdxl = rows["sdxl full b8"]
    assert sdxl["status"] == "planned"
    assert gpu_train.SDXL_NOTE in sdxl["note"]
    assert gpu_train.SDXL_NOTE in result.stdout
    assert "not a performance figure" in result.stdout
    assert not (tmp_path / "w").exists()  # the work folder (models, checkpoints) is removed


def progress(step: int, total: int) -> Progress:
    return Progress(
        step=step,
        total_steps=total,
        epoch=0,
        loss=0.5,
        images_per_second=1.0,
        eta_seconds=0.0,
        learning_rate=1e-4,
    )


def test_the_clock_times_only_the_steps_after_the_warm_up():
    stop = threading.Event()
    clock = gpu_train.StepClock(warm_step=2, stop_step=5, device="cpu", stop=stop)
    clock.started(15, None)
    marks = {}
    for step in range(1, 6):
        time.sleep(0.01)
        assert not stop.is_set()
        clock.progress(progress(step, 15))
        marks[step] = time.perf_counter()
    assert (clock.warm_at, clock.last_at) == (2, 5)
    assert marks[1] < clock.times["warm"] <= marks[2]
    assert marks[4] < clock.times["last"] <= marks[5]
    assert stop.is_set()  # the run is asked to stop after the timed steps


def test_the_clock_starts_at_the_first_report_after_the_warm_up_when_reports_are_sparse():
    # on a GPU the loop reports every 10th step (when it reads the losses) and the last one
    clock = gpu_train.StepClock(warm_step=10, stop_step=30, device="cpu")
    clock.started(40, None)
    for step in (10, 20, 30):
        clock.progress(progress(step, 40))
    assert (clock.warm_at, clock.last_at) == (10, 30)
    assert clock.times["warm"] < clock.times["last"]


def test_the_checkpoint_log_reads_both_the_inline_and_the_background_lines():
    log = gpu_train.CheckpointLog()
    logger = logging.getLogger("test_gpu_bench.checkpoints")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    try:
        logger.info("checkpoint step=%d seconds=%.2f uri=%s", 30, 1.5, "/o/checkpoints/step-30")
        logger.info("checkpoint step=%d snapshot taken, committing uri=%s", 30, "/o/c/step-30")
        logger.info("checkpoint committed seconds=%.2f loop_waited=%.2f uri=%s", 2.5, 0.25, "/o")
        logger.info("checkpoint %s", "an unexpected line")
    finally:
        logger.removeHandler(log)
    assert log.saves == [
        {"seconds": 1.5, "uri": "/o/checkpoints/step-30", "step": 30},
        {"seconds": 2.5, "uri": "/o", "loop_waited": 0.25},
    ]


def test_the_jobs_are_valid_and_keep_the_default_training_settings(tmp_path):
    ctx = gpu_train.make_context(False, tmp_path, "cuda")
    for method in ("full", "lora"):
        resource = api.parse_resource(gpu_train.job_document(ctx, method, 8, tmp_path / "out"))
        assert isinstance(resource, api.DiffusionTrainingJob)
        spec = resource.spec.resolved()
        assert spec.preprocessing.resolution == 512
        assert spec.preprocessing.cache_latents
        assert spec.hyperparameters.mixed_precision == "bf16"
        planned = ctx["warmup"] + ctx["steps"] + gpu_train.UNREACHED_STEPS
        assert spec.hyperparameters.max_steps == planned
        # no periodic checkpoint or sample before the stop
        assert spec.checkpointing.every_steps == planned
        assert spec.sampling.every_steps == 0
    lora = api.parse_resource(gpu_train.job_document(ctx, "lora", 8, tmp_path / "out"))
    assert isinstance(lora, api.DiffusionTrainingJob)
    assert lora.spec.lora is not None
    assert lora.spec.lora.rank == 16
    assert set(lora.spec.lora.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}


def test_the_sdxl_row_says_not_trainable_yet_while_difftrain_refuses_sdxl():
    accepted, message = difftrain_trains_sdxl()
    row = gpu_train.sdxl_row()
    assert row["status"] == "planned"
    assert (gpu_train.SDXL_NOTE in row["note"]) is not accepted
    if not accepted:
        assert "SDXL" in message
