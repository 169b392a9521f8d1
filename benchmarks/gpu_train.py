"""GPU training benchmark: difftrain's own loop at the SD1.5 shape against the example-style loop.

One run, on one GPU (H100/H200), measures in the same process tree, on the same card:

- ``full b8``, ``lora b8``, ``full b32``: ``difftrain.train.run.run_training`` itself (not a copy)
  on a DiffusionTrainingJob with the default settings (latent cache on, bf16, AdamW), on a
  random-initialised SD1.5-shaped model (UNet 860M, SD VAE, CLIP ViT-L text encoder, see
  ``sd_shapes.py``) and a generated shapes dataset of 512 px PNGs on the local disk. Images/s
  counts only the steady-state steps: a Reporter (``StepClock``) records the time (after
  ``torch.cuda.synchronize()``) at the first progress report at or after step W (10 on a GPU),
  when warm-up and any compilation are over, and at step W + 20; peak GPU memory is reset at
  step W. There it stops the run (no sample, no export), which ends with the checkpoint a
  stopped run takes, outside the timed steps: its save time comes from the trainer's own
  ``checkpoint committed seconds=... loop_waited=...`` (or ``checkpoint step=... seconds=...``)
  log line. MFU = UNet forward+backward FLOPs per image
  (``torch.utils.flop_counter.FlopCounterMode``, batch 1 under bf16 autocast) × images/s over
  the measured bf16 matmul rate of the card (8192² matmuls).
- ``precompute``: the latent cache build through its own API (``LatentCache.get_or_build``, as
  the run calls it) over the whole dataset, read from the local disk (the GPU machine has no
  MinIO): images/s of the build and end to end (listing, reading and cleaning included).
- ``example b8``: the anchor, written here after the diffusers text_to_image example's step: VAE
  and CLIP encode every step (both bf16, no grad), fp32 UNet master weights under bf16 autocast,
  default (foreach, unfused) AdamW, gradient clipping, TF32 on; batches preloaded on the GPU, as in
  ``shared/bench/sd15_step_baseline.py``. Every other row is given as a ratio to it; the
  precompute's ratio is to the example's encode-only throughput (what it spends on encoding
  per image, every epoch).
- ``sdxl full b8``: a planned row; it prints 'not trainable yet (issue 13)' while difftrain
  refuses SDXL UNets.

Each row runs in its own process on a GPU (clean memory; an OOM or crash is recorded and the
run goes on; a row still running at BUDGET_S, the whole run's budget, is killed). The table is
printed, and the JSON (rewritten after every row) goes to ``$OUT/gpu_train.json`` (else the
current directory) with the card and the versions.

    BUDGET_S=480 python benchmarks/gpu_train.py        # on the GPU machine, about 8 minutes
    python benchmarks/gpu_train.py --tiny              # tiny model, 64 px, CPU smoke check (TINY=1)
    python benchmarks/gpu_train.py --rows full:8,example:8

Needs the trainer's dependencies (``pip install -e '.[train]'``); difftrain is imported from
this checkout when it is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # at the end: operator/ would shadow the standard library's operator

DEFAULT_ROWS = "full:8,example:8,precompute,lora:8,full+eager:8,full+gc:8,full:32"
# Variants of a training row: what one setting costs or gains against the default row.
VARIANTS = {
    "eager": {"compile": False},  # torch.compile's gain
    "gc": {"gradientCheckpointing": True},  # gradient checkpointing: memory saved, speed lost
}
JSON_NAME = "gpu_train.json"
CAPTION = "a red circle on a blue background"
SDXL_NOTE = "not trainable yet (issue 13)"


def ensure_difftrain() -> None:
    """Make ``import difftrain`` work from this checkout when the package is not installed."""
    try:
        import difftrain
    except ImportError:
        shim = Path(tempfile.gettempdir()) / f"difftrain-import-{os.getuid()}"
        shim.mkdir(exist_ok=True)
        link = shim / "difftrain"
        if not link.exists():
            link.symlink_to(REPO / "trainer", target_is_directory=True)
        sys.path.append(str(shim))
        import difftrain  # noqa: F401


# ---- settings of one run ---------------------------------------------------------------------


def make_context(tiny: bool, work: Path, device: str) -> dict[str, Any]:
    """Sizes and paths every row of the run shares (sent to row processes as JSON)."""
    return {
        "tiny": tiny,
        "device": device,
        "work": str(work),
        "model_dir": str(work / ("tiny-model" if tiny else "sd15-model")),
        "data_dir": str(work / "dataset"),
        "resolution": 64 if tiny else 512,  # 64 px is the smallest a job accepts
        "dataset_count": 32 if tiny else 256,
        # steps before the timed window (warm-up, compilation): a multiple of the loop's
        # progress interval on a GPU (10)
        "warmup": 2 if tiny else 10,
        "steps": 4 if tiny else 20,  # timed steady-state steps
        "encode_steps": 3 if tiny else 10,  # encode-only iterations of the example loop
        # bf16 autocast (the trainer's default) on a GPU; fp32 on a CPU, where bf16 autocast is
        # several times slower than fp32 (the tiny mode checks the code path, not the dtype)
        "mixed_precision": "bf16" if device == "cuda" else "no",
    }


def parse_rows(text: str) -> list[tuple[str, int]]:
    rows = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, batch = item.partition(":")
        base, _, variant = name.partition("+")
        if base not in {"full", "lora", "example", "precompute"} or (
            variant and (base not in {"full", "lora"} or variant not in VARIANTS)
        ):
            raise SystemExit(
                f"--rows: unknown row {name!r} (full, lora, example, precompute; full and lora "
                f"take +{' or +'.join(VARIANTS)})"
            )
        rows.append((name, int(batch) if batch else 0))
    return rows


def row_name(name: str, batch: int) -> str:
    return name if name == "precompute" else f"{name} b{batch}"


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def environment(device: str) -> dict[str, Any]:
    import accelerate
    import diffusers
    import torch
    import transformers

    info: dict[str, Any] = {
        "card": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()})",
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(ImportError):
        import peft

        info["peft"] = peft.__version__
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


def matmul_rate(device: str, dtype_name: str) -> float:
    """Measured matmul FLOP/s: bf16 8192² on a GPU; on the CPU a small one in the training dtype
    (smoke only)."""
    import torch

    n, reps = (8192, 10) if device == "cuda" else (1024, 5)
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def unet_flops_per_image(ctx: dict[str, Any]) -> float:
    """UNet forward+backward FLOPs of one image under bf16 autocast, as the anchor counts them."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    device = ctx["device"]
    unet = UNet2DConditionModel.from_pretrained(Path(ctx["model_dir"]) / "unet").to(device)
    side = ctx["resolution"] // (2 ** (len(_vae_config(ctx)["block_out_channels"]) - 1))
    x = torch.randn(1, unet.config.in_channels, side, side, device=device)
    t = torch.randint(0, 1000, (1,), device=device)
    c = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    counter = FlopCounterMode(display=False)
    autocast = torch.autocast(
        device, dtype=torch.bfloat16, enabled=ctx["mixed_precision"] == "bf16"
    )
    with counter, autocast:
        unet(x, t, c).sample.float().pow(2).mean().backward()
    del unet
    free_memory(device)
    return float(counter.get_total_flops())


def _vae_config(ctx: dict[str, Any]) -> dict[str, Any]:
    path = Path(ctx["model_dir"]) / "vae" / "config.json"
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def build_inputs(ctx: dict[str, Any]) -> dict[str, float]:
    """The model folder and the dataset; seconds each took."""
    from benchmarks.sd_shapes import build_sd15_pipeline_folder, build_tiny_bench_folder
    from difftrain.train.synthetic import write_shapes_dataset

    model = Path(ctx["model_dir"])
    times = {}
    start = time.perf_counter()
    if ctx["tiny"]:
        build_tiny_bench_folder(model, seed=0)
    else:
        build_sd15_pipeline_folder(model, seed=0, device=ctx["device"])
    times["model_build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    write_shapes_dataset(
        Path(ctx["data_dir"]), ctx["dataset_count"], size=ctx["resolution"], seed=0
    )
    times["dataset_write_s"] = time.perf_counter() - start
    return times


# ---- difftrain's own loop --------------------------------------------------------------------


# Steps planned beyond the measured ones: the run is stopped before it gets there, so it makes
# no sample (which a compiled UNet would compile again for) and no export, and takes the
# checkpoint a stopped run takes (the same save as a periodic one). At least the loop's
# progress interval on a GPU (10 steps).
UNREACHED_STEPS = 10


def job_document(ctx: dict[str, Any], method: str, batch: int, output: Path) -> dict[str, Any]:
    """A DiffusionTrainingJob with the default settings, except what the benchmark must fix:
    the steps, no periodic checkpoint or sample, a one-step sample and one export format (should
    the run ever reach its end)."""
    res = ctx["resolution"]
    method, _, variant = method.partition("+")
    total = ctx["warmup"] + ctx["steps"] + UNREACHED_STEPS
    spec: dict[str, Any] = {
        "baseModel": {"uri": ctx["model_dir"]},
        "dataset": {
            "uri": ctx["data_dir"],
            "format": "folder",
            # the shapes images look alike to a perceptual hash; keep them all
            "cleaning": {"minResolution": res // 2, "nearDuplicateDistance": 0},
        },
        "preprocessing": {"resolution": res},
        "method": method,
        "hyperparameters": {"batchSize": batch, "maxSteps": total, "warmupSteps": 0},
        "sampling": {"everySteps": 0, "numInferenceSteps": 1, "prompts": [CAPTION]},
        "checkpointing": {"everySteps": total, "keepLast": 1},
        "output": {
            "uri": str(output),
            "formats": ["lora_peft" if method == "lora" else "single_file"],
        },
    }
    if ctx["mixed_precision"] != "bf16":  # bf16 is the default
        spec["hyperparameters"]["mixedPrecision"] = ctx["mixed_precision"]
    if variant:
        spec["hyperparameters"].update(VARIANTS[variant])
    if method == "lora":
        spec["lora"] = {"rank": 16}  # default targets: to_q, to_k, to_v, to_out.0
    return {
        "apiVersion": "difftrain.dev/v1alpha1",
        "kind": "DiffusionTrainingJob",
        "metadata": {"name": f"bench-{method}{'-' + variant if variant else ''}-b{batch}"},
        "spec": spec,
    }


class StepClock:
    """A Reporter that times the steady-state steps.

    It synchronises the GPU and reads the clock at the first progress report at or after step
    ``warm_step`` (warm-up and compilation done; the peak memory is reset there) and at the
    first at or after ``stop_step``, where it also asks the run to stop (``stop``), so the run
    ends with the checkpoint of a stopped run. On a GPU the loop reports every 10th step (when
    it reads the losses from the device), on a CPU every step.
    """

    def __init__(
        self, warm_step: int, stop_step: int, device: str, stop: threading.Event | None = None
    ) -> None:
        self.warm_step = warm_step
        self.stop_step = stop_step
        self.warm_at: int | None = None  # the step the timed window starts after
        self.last_at: int | None = None  # the step it ends with
        self.device = device
        self.stop = stop
        self.times: dict[str, float] = {}
        self.total_steps = 0
        self.kept = 0
        self.loss = float("nan")
        self.peak_bytes = 0
        self.checkpoint_uri: str | None = None
        self.outputs: list[str] = []

    def _now(self, name: str) -> None:
        self.times[name] = time.perf_counter()

    def started(self, total_steps: int, resumed_from: str | None) -> None:
        self.total_steps = total_steps
        self._now("started")

    def dataset(self, report: Any) -> None:
        self.kept = report.kept
        self._now("dataset")

    def progress(self, progress: Any) -> None:
        import torch

        self.loss = progress.loss
        end = min(self.stop_step, progress.total_steps)
        if self.warm_at is None and self.warm_step <= progress.step < end:
            sync(self.device)
            self._now("warm")
            self.warm_at = progress.step
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
        elif self.warm_at is not None and self.last_at is None and progress.step >= end:
            sync(self.device)
            self._now("last")
            self.last_at = progress.step
            if self.device == "cuda":
                self.peak_bytes = torch.cuda.max_memory_allocated()
            if self.stop is not None:
                self.stop.set()

    def checkpoint(self, uri: str) -> None:
        self.checkpoint_uri = uri
        self._now("checkpoint")

    def samples(self, uris: list[str]) -> None:
        self._now("samples")

    def validation(self, status: Any) -> None:
        self._now("validation")

    def clip_score(self, status: Any) -> None:
        self._now("clip_score")

    def finished(self, outputs: list[Any]) -> None:
        self.outputs = [o.uri for o in outputs]
        self._now("finished")

    def close(self) -> None:
        pass


class CheckpointLog(logging.Handler):
    """Collects the trainer's checkpoint log lines: 'checkpoint step=N seconds=S uri=U' of a
    checkpoint written in the loop, or 'checkpoint step=N snapshot taken, committing uri=U' then
    'checkpoint committed seconds=S loop_waited=W uri=U' of one committed in the background."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.saves: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:  # a handler must never break the run it watches
            text = record.getMessage()
            if not text.startswith("checkpoint ") or "seconds=" not in text:
                return
            fields = dict(re.findall(r"(\w+)=(\S+)", text))
            save: dict[str, Any] = {"seconds": float(fields["seconds"]), "uri": fields.get("uri")}
            if "loop_waited" in fields:
                save["loop_waited"] = float(fields["loop_waited"])
            if "step" in fields:
                save["step"] = int(fields["step"])
            self.saves.append(save)
        except Exception:  # noqa: BLE001 - an unexpected line format: ignore it
            return


def folder_bytes(path: str | None) -> int:
    if not path or not Path(path).exists():
        return 0
    root = Path(path)
    return sum(
        p.stat().st_size for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()
    )


def train_row(ctx: dict[str, Any], method: str, batch: int) -> dict[str, Any]:
    """One run of difftrain's loop; images/s over the steps after ``warmup``."""
    from difftrain import api
    from difftrain.train.run import RunOptions, run_training

    device = ctx["device"]
    run_dir = Path(ctx["work"]) / "runs" / f"{method}-b{batch}-{time.monotonic_ns()}"
    resource = api.parse_resource(job_document(ctx, method, batch, run_dir / "output"))
    assert isinstance(resource, api.DiffusionTrainingJob)
    hp = resource.spec.resolved().hyperparameters
    stop = threading.Event()
    clock = StepClock(ctx["warmup"], ctx["warmup"] + ctx["steps"], device, stop)
    log = CheckpointLog()
    loop_logger = logging.getLogger("difftrain.train.loop")
    loop_logger.addHandler(log)
    previous_level = loop_logger.level
    loop_logger.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        options = RunOptions(work_dir=run_dir / "work", reporter=clock, stop_requested=stop)
        outcome = run_training(resource, options)
        end = time.perf_counter()
        t = clock.times
        if clock.warm_at is None or clock.last_at is None:
            raise RuntimeError(
                f"the loop gave no progress report at or after step {ctx['warmup']} and then "
                f"at or after step {clock.stop_step}: nothing to time"
            )
        measured = clock.last_at - clock.warm_at
        seconds = t["last"] - t["warm"]
        save = log.saves[-1] if log.saves else {}
        uri = save.get("uri") or clock.checkpoint_uri
        checkpoint_bytes = folder_bytes(uri)
        step_match = re.search(r"step-0*(\d+)", uri or "")
        row: dict[str, Any] = {
            "status": "ok",
            "img_s": measured * batch / seconds,
            "step_ms": 1e3 * seconds / measured,
            "steps_measured": measured,
            "warmup_steps": clock.warm_at,
            "peak_gib": clock.peak_bytes / 2**30,
            "loss": clock.loss,
            "examples": clock.kept,
            "cache_hit": outcome.cache_hit,
            # run start to the dataset report: model load, listing, cleaning, cache build or read
            "setup_s": t["dataset"] - start,
            "setup_to_first_step_s": t["started"] - start,
            "warmup_s": t["warm"] - t["started"],
            # the whole save (snapshot to committed manifest), and what the loop waited of it
            "checkpoint_s": save.get("seconds"),
            "checkpoint_loop_wait_s": save.get("loop_waited", save.get("seconds")),
            "checkpoint_step": int(step_match.group(1)) if step_match else save.get("step"),
            "checkpoint_gb": checkpoint_bytes / 1e9,
            "stopped_at": clock.last_at,
            "interrupted": outcome.interrupted,  # True: stopped there, as asked
            "after_last_step_s": end - t["last"],  # the checkpoint (and a sample and exports,
            # should the run not stop)
            "loop_img_s_all_steps": outcome.loop.state.images_seen / outcome.loop.step_seconds,
            "mixed_precision": hp.mixed_precision,
            # None: the trainer's default for the device (HEAD may not have the field: n/a)
            "compile": getattr(hp, "compile", "n/a"),
            "gradient_checkpointing": hp.gradient_checkpointing,
        }
        if row["checkpoint_s"]:
            row["checkpoint_gb_s"] = row["checkpoint_gb"] / row["checkpoint_s"]
        return row
    finally:
        loop_logger.removeHandler(log)
        loop_logger.setLevel(previous_level)
        shutil.rmtree(run_dir, ignore_errors=True)  # a full SD1.5 checkpoint is about 10 GB


# ---- the latent precompute -------------------------------------------------------------------


def precompute_row(ctx: dict[str, Any]) -> dict[str, Any]:
    """The cache build over the whole dataset, through LatentCache.get_or_build (images read
    again as the build encodes them, as in a run)."""
    import torch

    from difftrain import api
    from difftrain.data.cache import LatentCache, cache_space
    from difftrain.data.cleaning import load_dataset
    from difftrain.data.transforms import ImageTransform
    from difftrain.models import load_base_model
    from difftrain.storage import open_store

    device = ctx["device"]
    work = Path(ctx["work"]) / f"precompute-{time.monotonic_ns()}"
    resource = api.parse_resource(job_document(ctx, "full", 8, work / "output"))
    assert isinstance(resource, api.DiffusionTrainingJob)
    spec = resource.spec.resolved()
    try:
        start = time.perf_counter()
        components = load_base_model(spec.base_model, None, work_dir=work / "model")
        loaded = time.perf_counter()
        tokenizer = components.tokenizer
        dataset = spec.dataset_list[0]  # the benchmark's job has one dataset
        store = open_store(dataset.uri, None)
        cleaned = load_dataset(
            dataset,
            store,
            count_tokens=lambda text: len(tokenizer(text).input_ids),
            max_tokens=tokenizer.model_max_length,
        )
        pairs = list(cleaned.pairs)
        listed = time.perf_counter()
        transform = ImageTransform(spec.preprocessing)
        space = cache_space(spec.preprocessing, components.identity, seed=spec.hyperparameters.seed)
        # a first, small build (to another root) takes the encoders' warm-up (CUDA kernels,
        # cuDNN's algorithm choice), which a long real build amortises
        warm = pairs[: min(len(pairs), 32)]
        warm_start = time.perf_counter()
        LatentCache(store, str(work / "warm-cache")).get_or_build(
            warm,
            components,
            transform,
            space=space,
            read=store,
            seed=spec.hyperparameters.seed,
            device=device,
            dtype=torch.float32 if device == "cpu" else torch.float16,
        )
        sync(device)
        warm_s = time.perf_counter() - warm_start
        cache = LatentCache(store, str(work / "cache"))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        built_start = time.perf_counter()
        samples, _ = cache.get_or_build(
            pairs,
            components,
            transform,
            space=space,
            read=store,
            seed=spec.hyperparameters.seed,
            device=device,
            dtype=torch.float32 if device == "cpu" else torch.float16,
        )
        sync(device)
        built = time.perf_counter()
        flips = spec.preprocessing.flip_probability > 0
        return {
            "status": "ok",
            "img_s": len(samples) / (built - built_start),
            # reading and cleaning the images plus the build (the warm-up build left out)
            "end_to_end_img_s": len(samples) / (listed - loaded + built - built_start),
            "images": len(samples),
            "views_per_image": 2 if flips else 1,
            "build_s": built - built_start,
            "warmup_build_s": warm_s,
            "warmup_images": len(warm),
            "read_and_clean_s": listed - loaded,
            "model_load_s": loaded - start,
            "source": "local disk (no object store on the GPU machine)",
            "encoder_dtype": str(next(components.vae.parameters()).dtype),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
            "cache_gb": folder_bytes(str(work / "cache")) / 1e9,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the anchor: the diffusers text_to_image example's step ----------------------------------


def example_row(ctx: dict[str, Any], batch: int) -> dict[str, Any]:
    """The example's step: VAE + CLIP encode every step, fp32 UNet under bf16 autocast, AdamW."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from difftrain import api
    from difftrain.data.transforms import ImageTransform

    device = ctx["device"]
    folder = Path(ctx["model_dir"])
    if device == "cuda":  # as the shared baseline does (and difftrain does on CUDA)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    bf16 = ctx["mixed_precision"] == "bf16"
    # the example casts the frozen VAE and text encoder to the mixed-precision dtype
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(device)
    vae = (
        AutoencoderKL.from_pretrained(folder / "vae").requires_grad_(False).to(device, weight_dtype)
    )
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").requires_grad_(False)
    text = text.to(device, weight_dtype)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    unet.train()
    # lr and weight decay as the example's defaults; foreach (not fused) AdamW as it builds it
    opt = torch.optim.AdamW(
        unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )

    # Batches preloaded on the device (as the shared baseline does): the loop's own cost only.
    transform = ImageTransform(api.PreprocessingSpec(resolution=ctx["resolution"]))
    images = sorted(Path(ctx["data_dir"]).glob("*.png"))
    groups = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)][:4]
    if not groups:
        raise RuntimeError(f"the dataset has fewer than {batch} images")
    import random

    rng = random.Random(0)
    batches = []
    for group in groups:
        pixels = torch.stack([transform(Image.open(p).convert("RGB"), rng=rng) for p in group])
        ids = tok(
            [p.with_suffix(".txt").read_text() for p in group],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        batches.append((pixels.to(device), ids.to(device)))

    def encode(pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            hidden = text(ids, return_dict=False)[0]
        return latents, hidden

    def step(i: int) -> torch.Tensor:
        pixels, ids = batches[i % len(batches)]
        latents, hidden = encode(pixels, ids)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            pred = unet(noisy, t, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    for i in range(ctx["warmup"]):
        step(i)
    sync(device)
    warm = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(ctx["steps"]):
        loss = step(i)
    sync(device)
    seconds = time.perf_counter() - warm
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    # what the example spends on encoding per image, every step (the precompute's baseline)
    encode(*batches[0])
    sync(device)
    enc_start = time.perf_counter()
    for i in range(ctx["encode_steps"]):
        encode(*batches[i % len(batches)])
    sync(device)
    encode_s = time.perf_counter() - enc_start
    return {
        "status": "ok",
        "img_s": ctx["steps"] * batch / seconds,
        "step_ms": 1e3 * seconds / ctx["steps"],
        "steps_measured": ctx["steps"],
        "warmup_steps": ctx["warmup"],
        "warmup_s": warm - start,
        "peak_gib": peak / 2**30,
        "loss": float(loss.detach()),
        "encode_img_s": ctx["encode_steps"] * batch / encode_s,
        "mixed_precision": ctx["mixed_precision"],
    }


# ---- rows, in this process or in their own -----------------------------------------------------


def run_row(ctx: dict[str, Any], name: str, batch: int) -> dict[str, Any]:
    """One row's measurement; failures (an OOM included) are recorded, not raised."""
    import torch

    try:
        if name == "precompute":
            result = precompute_row(ctx)
        elif name == "example":
            result = example_row(ctx, batch)
        else:
            result = train_row(ctx, name, batch)
    except Exception as exc:  # noqa: BLE001 - OOM or any failure: record it and go on
        result = {
            "status": "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error",
            "error": f"{type(exc).__name__}: {exc}"[:600],
            "traceback": traceback.format_exc()[-2000:],
        }
    finally:
        free_memory(ctx["device"])
    return result


def row_in_own_process(
    ctx: dict[str, Any], name: str, batch: int, timeout: float
) -> dict[str, Any]:
    """A row in its own Python process (killed after ``timeout`` seconds)."""
    work = Path(ctx["work"])
    ctx_file = work / "context.json"
    ctx_file.write_text(json.dumps(ctx), encoding="utf-8")
    result_file = work / f"row-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{name}:{batch}"]
    cmd += ["--context", str(ctx_file), "--result", str(result_file)]
    try:
        proc = subprocess.run(cmd, timeout=max(timeout, 1.0), check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"killed after {timeout:.0f} s (BUDGET_S)"}
    if result_file.exists():
        result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
        return result
    return {
        "status": "error",
        "error": f"the row's process exited {proc.returncode} with no result",
    }


def child_main(spec: str, context: str, result: str) -> None:
    ensure_difftrain()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx = json.loads(Path(context).read_text(encoding="utf-8"))
    name, _, batch = spec.partition(":")
    row = run_row(ctx, name, int(batch))
    Path(result).write_text(json.dumps(row), encoding="utf-8")


# ---- the report ------------------------------------------------------------------------------


def sdxl_row() -> dict[str, Any]:
    from benchmarks.sd_shapes import difftrain_trains_sdxl

    accepted, message = difftrain_trains_sdxl()
    note = (
        f"{SDXL_NOTE}: {message}"
        if not accepted
        else "difftrain accepts SDXL-shaped UNets now; this benchmark has no SDXL row yet"
    )
    return {
        "name": "sdxl full b8",
        "kind": "planned",
        "method": "full",
        "batch": 8,
        "status": "planned",
        "note": note,
    }


def add_ratios(report: dict[str, Any]) -> None:
    rows = report["rows"]
    # the cache build inside a run: the setup of the run that built the cache less that of one
    # that found it (model load, listing and cleaning are the same in both)
    train = [r for r in rows if r["kind"] == "train" and r["status"] == "ok"]
    built = next((r for r in train if r.get("cache_hit") is False), None)
    hits = [r["setup_s"] for r in train if r.get("cache_hit")]
    if built is not None and hits and built["setup_s"] > min(hits):
        built["cache_build_in_run_s"] = built["setup_s"] - min(hits)
        built["cache_build_in_run_img_s"] = built["examples"] / built["cache_build_in_run_s"]
    anchor = next((r for r in rows if r["kind"] == "anchor" and r["status"] == "ok"), None)
    flops = report.get("unet_train_flops_per_image")
    rate = report.get("matmul_flops")
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["kind"] in {"train", "anchor"} and flops and rate:
            r["mfu"] = r["img_s"] * flops / rate
        if anchor is None:
            continue
        if r["kind"] == "precompute":
            r["ratio"] = r["img_s"] / anchor["encode_img_s"]
            r["ratio_to"] = (
                f"{anchor['name']} encode only (VAE + CLIP, {anchor['encode_img_s']:.1f} img/s)"
            )
        else:
            r["ratio"] = r["img_s"] / anchor["img_s"]
            r["ratio_to"] = anchor["name"]


def fmt(value: Any, width: int, digits: int) -> str:
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f"{value:{width}.{digits}f}"
    return f"{'-' if value is None else value:>{width}}"


def print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    print()
    print(
        f"{env['card']}; torch {env['torch']} (CUDA {env['cuda']}), diffusers {env['diffusers']}, "
        f"accelerate {env['accelerate']}, transformers {env['transformers']}, "
        f"peft {env.get('peft', '-')}; mode {report['mode']}"
    )
    rate = report.get("matmul_flops")
    flops = report.get("unet_train_flops_per_image")
    if rate and flops:
        print(
            f"{report['matmul_dtype']} matmul {rate / 1e12:.2f} TFLOP/s; UNet fwd+bwd "
            f"{flops / 1e12:.4f} TFLOP/image; ceiling {rate / flops:.0f} img/s"
        )
    header = (
        f"{'row':16} {'img/s':>8} {'ratio':>6} {'peak GiB':>8} {'MFU':>6} "
        f"{'setup s':>7} {'ckpt s':>7} {'wait s':>7} {'ckpt GB':>7}  note"
    )
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        if r["status"] != "ok":
            note = r.get("note") or f"{r['status']}: {' '.join(str(r.get('error', '')).split())}"
            print(
                f"{r['name']:16} " + " ".join(fmt(None, w, 0) for w in (8, 6, 8, 6, 7, 7, 7, 7)),
                note,
            )
            continue
        if r["kind"] == "precompute":
            note = (
                f"LatentCache.get_or_build of {r['images']} images from the local disk, "
                f"{r['views_per_image']} view each, {r['encoder_dtype']} encoders; end to end "
                f"{r['end_to_end_img_s']:.1f} img/s; ratio to the example's encode-only rate"
            )
        elif r["kind"] == "anchor":
            note = (
                "example-style loop (VAE + CLIP every step); "
                f"encode only {r['encode_img_s']:.1f} img/s"
            )
        else:
            in_run = r.get("cache_build_in_run_img_s")
            built = f" ({in_run:.1f} img/s)" if in_run else ""
            note = (
                f"run_training, cache {'hit' if r['cache_hit'] else 'built' + built}, "
                f"{r['steps_measured']} steps after {r['warmup_steps']}, "
                f"compile={'default' if r['compile'] is None else r['compile']}"
            )
        cells = [
            fmt(r["img_s"], 8, 2),
            fmt(r.get("ratio"), 6, 2),
            fmt(r.get("peak_gib"), 8, 1),
            fmt(r.get("mfu"), 6, 3),
            fmt(r.get("setup_s"), 7, 1),
            fmt(r.get("checkpoint_s"), 7, 2),
            fmt(r.get("checkpoint_loop_wait_s"), 7, 2),
            fmt(r.get("checkpoint_gb"), 7, 2),
        ]
        print(f"{r['name']:16} " + " ".join(cells), note)
    print(f"wall {report['wall_s']:.0f} s of BUDGET_S {report['budget_s']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model at 64 px (also TINY=1)")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"default {DEFAULT_ROWS}")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each row in its own process (default: on a GPU)",
    )
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.context, args.result)
        return

    start = time.perf_counter()
    tiny = args.tiny or os.environ.get("TINY") == "1"
    budget = float(os.environ.get("BUDGET_S", "600" if tiny else "480"))
    out_dir = Path(os.environ.get("OUT") or ".")
    rows_wanted = parse_rows(args.rows)
    ensure_difftrain()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        raise SystemExit("no GPU here: the SD1.5 shape needs one; --tiny (TINY=1) runs a CPU check")
    isolate = args.isolate if args.isolate is not None else device == "cuda"
    work = args.work or Path(tempfile.mkdtemp(prefix="difftrain-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = make_context(tiny, work, device)
    report: dict[str, Any] = {
        "benchmark": "benchmarks/gpu_train.py",
        "mode": "tiny (CPU smoke check, not a performance figure)" if tiny else "sd15",
        "environment": environment(device),
        "budget_s": budget,
        "context": {k: v for k, v in ctx.items() if k not in {"work", "model_dir", "data_dir"}},
        "isolated_rows": isolate,
    }
    shape = "tiny" if tiny else "SD1.5-shaped"
    print(
        f"{report['environment']['card']}: building the {shape} model and "
        f"{ctx['dataset_count']} images at {ctx['resolution']} px",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    report["rows"] = rows
    path = out_dir / JSON_NAME

    def save(complete: bool) -> None:
        """The JSON so far (after every row: a run cut short still leaves its figures)."""
        add_ratios(report)
        report["complete"] = complete
        report["wall_s"] = time.perf_counter() - start
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")

    try:
        report["setup"] = build_inputs(ctx)
        report["matmul_dtype"] = "bfloat16" if ctx["mixed_precision"] == "bf16" else "float32"
        report["matmul_flops"] = matmul_rate(device, report["matmul_dtype"])
        report["unet_train_flops_per_image"] = unet_flops_per_image(ctx)
        free_memory(device)
    except Exception as exc:
        report["error"] = f"setup failed: {type(exc).__name__}: {exc}"[:600]
        save(False)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        save(False)
        min_row_s = 10.0 if tiny else 45.0
        for name, batch in rows_wanted:
            label = row_name(name, batch)
            kind = {"example": "anchor", "precompute": "precompute"}.get(name, "train")
            head = {"name": label, "kind": kind, "method": name, "batch": batch or None}
            left = budget - (time.perf_counter() - start)
            if left < min_row_s:
                rows.append({**head, "status": "skipped", "error": f"budget: {left:.0f} s left"})
                print(f"{label}: skipped (budget)", flush=True)
                continue
            print(f"{label}: running ({left:.0f} s of budget left)", flush=True)
            row_start = time.perf_counter()
            result = (
                row_in_own_process(ctx, name, batch, left) if isolate else run_row(ctx, name, batch)
            )
            result["wall_s"] = time.perf_counter() - row_start
            rows.append({**head, **result})
            summary = (
                f"{result['img_s']:.2f} img/s" if result["status"] == "ok" else result.get("error")
            )
            print(f"{label}: {result['status']} in {result['wall_s']:.0f} s: {summary}", flush=True)
            save(False)
        rows.append(sdxl_row())
        save(True)
        print_table(report)
        print(f"JSON: {path}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
