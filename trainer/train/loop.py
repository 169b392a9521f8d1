"""The training loop on Accelerate: small components composed, one optimizer step at a time."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difftrain.api import ClipScoreStatus, DiffusionTrainingJobSpec
from difftrain.data.transforms import to_model_range, to_unit_range
from difftrain.models.families import TextConditioning, family
from difftrain.models.placement import frozen_dtype
from difftrain.storage import Store
from difftrain.train import objective
from difftrain.train.batches import (
    Batch,
    BatchBuilder,
    InlineBatches,
    Prefetcher,
    data_position,
)
from difftrain.train.checkpoint import (
    CheckpointDone,
    CheckpointStore,
    CheckpointWriter,
    TrainingState,
)
from difftrain.train.clip_score import ClipScorer, clip_score_status
from difftrain.train.compiling import Compiled, configure_cuda_math
from difftrain.train.ema import EMA
from difftrain.train.methods import (
    TrainedModules,
    TrainingConfigError,
    load_trainable,
    predict,
    trainable_state,
)
from difftrain.train.metrics import TrainingMetrics
from difftrain.train.report import Progress, Reporter
from difftrain.train.sampling import (
    build_pipeline,
    generate,
    image_grid,
    should_sample,
    write_samples,
)
from difftrain.train.tracking import ExperimentTracker
from difftrain.train.validation import ModelForEval, Validator

logger = logging.getLogger(__name__)

READ_EVERY_ON_GPU = 10  # steps between host reads of the loss on a GPU
READ_EVERY_ON_CPU = 1  # on the CPU a read costs nothing: the progress of every step is shown


def no_sync_all(modules: list[torch.nn.Module]) -> contextlib.ExitStack:
    """Inside: no gradient all-reduce on any of the (DDP-wrapped) modules, as while
    accumulating micro-batches; each module's own ``no_sync``, not only the first one's."""
    stack = contextlib.ExitStack()
    for module in modules:
        no_sync = getattr(module, "no_sync", None)
        if no_sync is not None:
            stack.enter_context(no_sync())
    return stack


@dataclass
class LoopResult:
    """How the loop ended."""

    state: TrainingState
    interrupted: bool
    latest_checkpoint: str | None
    samples: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    clip_score: ClipScoreStatus | None = None  # of the newest samples (main process)
    step_seconds: float = 0.0  # time in optimizer steps (data wait included; samples and
    # checkpoints not), for throughput figures


@dataclass
class LoopInputs:
    """Everything the loop works on, prepared by the run."""

    spec: DiffusionTrainingJobSpec  # resolved
    components: Any  # difftrain.models.Components
    modules: TrainedModules
    builder: BatchBuilder
    sampler: Any  # a batch sampler with set_epoch (one bucket per batch)
    total_steps: int
    output_store: Store
    output_uri: str
    work_dir: Path
    reporter: Reporter
    metrics: TrainingMetrics | None
    sample_prompts: list[str]
    sample_conditioning: list[Any] | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)
    validator: Validator | None = None
    tracker: ExperimentTracker | None = None
    clip_scorer: ClipScorer | None = None  # main process only


def make_optimizer(spec: DiffusionTrainingJobSpec, params: list[torch.nn.Parameter]) -> Any:
    """AdamW (fused on CUDA) or 8-bit AdamW from bitsandbytes."""
    hp = spec.hyperparameters
    lr = spec.learning_rate
    wd = spec.regularization.weight_decay
    if hp.optimizer == "adamw8bit":
        try:
            from bitsandbytes.optim.adamw import AdamW8bit
        except ImportError:
            raise TrainingConfigError(
                "hyperparameters.optimizer adamw8bit needs the bitsandbytes package, which this "
                "image does not have; use optimizer: adamw or a trainer image with bitsandbytes"
            ) from None
        return AdamW8bit(params, lr=lr, weight_decay=wd)  # type: ignore[no-untyped-call]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused or None)


class Trainer:
    """Runs optimizer steps until ``total_steps``, checkpointing, sampling and reporting."""

    def __init__(self, inputs: LoopInputs, accelerator: Any) -> None:
        self.inp = inputs
        self.acc = accelerator
        spec = inputs.spec
        self.spec = spec
        self.hp = spec.hyperparameters
        self.reg = spec.regularization
        self.device = accelerator.device
        comps = inputs.components
        self.scheduler = comps.noise_scheduler
        self.family = family(comps.family)
        self.latent_scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        self.prediction_type = comps.prediction_type
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index

        modules = inputs.modules
        if self.hp.gradient_checkpointing:
            for module in modules.learners().values():
                enable = getattr(module, "enable_gradient_checkpointing", None) or getattr(
                    module, "gradient_checkpointing_enable", None
                )
                if enable is not None:
                    enable()
        # Frozen parts in the autocast dtype on GPUs; the VAE stays fp32 under fp16 (it overflows).
        frozen = frozen_dtype(self.device, self.hp.mixed_precision)
        comps.vae.to(self.device, torch.float32 if frozen == torch.float16 else frozen)
        comps.vae.eval()
        if not modules.train_text_encoder:
            for encoder in modules.text_encoders().values():
                encoder.to(self.device, frozen).eval()
        if modules.method != "full":
            for p in modules.unet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(self.device, frozen)
            modules.unet.to(self.device)
        learners = modules.learners()
        for module in learners.values():
            module.to(self.device)
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # trained weights stay fp32 (autocast does the rest)
            module.train()
        denoisers = {"UNet": modules.unet}
        if modules.controlnet is not None:
            denoisers["ControlNet"] = modules.controlnet
        if self.device.type == "cuda":
            configure_cuda_math()
            for module in denoisers.values():
                module.to(memory_format=torch.channels_last)  # what cuDNN's fast convs want
        # The noise schedule's table on the device once (add_noise, velocity and SNR index it).
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        # How often the loss (and, with several processes, the stop flag) is read on the host:
        # each read waits for the GPU to finish the queued steps, so on a GPU not every step.
        self.read_every = READ_EVERY_ON_CPU if self.device.type == "cpu" else READ_EVERY_ON_GPU
        self.params = [p for m in learners.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(spec, self.params)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            objective.lr_lambda(self.hp.lr_scheduler, self.hp.warmup_steps, inputs.total_steps),
        )
        names = list(learners)
        prepared = accelerator.prepare(*[learners[n] for n in names], self.optimizer)
        self.wrapped = dict(zip(names, prepared[:-1], strict=True))
        self.optimizer = prepared[-1]
        # torch.compile of the denoisers as the step calls them (prepared, when they learn)
        compile_on = self.hp.compile if self.hp.compile is not None else self.device.type == "cuda"
        self.compiled: dict[str, Compiled] = {}
        if compile_on:
            for key, label in (("unet", "UNet"), ("controlnet", "ControlNet")):
                module = self.wrapped[key] if key in self.wrapped else getattr(modules, key)
                if module is not None:
                    self.compiled[key] = Compiled(module, label)
        self.ema: EMA | None = None
        ema_spec = self.reg.ema
        if ema_spec.enabled:
            self.ema = EMA(
                self.params,
                decay=ema_spec.decay,
                start_step=ema_spec.warmup_steps,
                offload_to_cpu=ema_spec.offload_to_cpu,
            )
        self.checkpoints = CheckpointStore(
            inputs.output_store, inputs.output_uri, spec.checkpointing.keep_last
        )
        self.writer = CheckpointWriter(self.checkpoints, inputs.work_dir)
        self.state = TrainingState()
        self._loss_avg: float | None = None
        self._rate: float | None = None

    # ---- state -----------------------------------------------------------------------------

    def _components_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": {"last_epoch": self.lr_scheduler.last_epoch},
            "rng": {"torch": torch.get_rng_state()},
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def resume(self) -> str | None:
        """Load the newest complete checkpoint, if any; every process does this."""
        latest = self.checkpoints.latest()
        if latest is None:
            return None
        loaded = self.checkpoints.load(latest, self.inp.work_dir / f"rank{self.rank}")
        load_trainable(self.inp.modules, loaded.trainable, self.acc.unwrap_model)
        self.optimizer.load_state_dict(loaded.components["optimizer"])
        self.lr_scheduler.last_epoch = int(loaded.components["lr_scheduler"]["last_epoch"])
        self.lr_scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        torch.set_rng_state(loaded.components["rng"]["torch"])
        if self.ema is not None:
            if "ema" not in loaded.components:
                raise TrainingConfigError(
                    "regularization.ema.enabled is on but the checkpoint to resume has no EMA "
                    "weights; use a new output.uri or turn EMA off"
                )
            self.ema.load_state_dict(loaded.components["ema"])
        self.state = loaded.state
        return latest

    def save_checkpoint(self) -> str | None:
        """The main process snapshots the state and commits it in the background; no process
        waits for the write, hashes and upload (``finish_checkpoints`` does, at the end)."""
        if not self.acc.is_main_process:
            return None
        trainable = trainable_state(self.inp.modules, self.acc.unwrap_model)
        uri = self.writer.submit(self.state, trainable, self._components_state())
        logger.info("checkpoint step=%d snapshot taken, committing uri=%s", self.state.step, uri)
        return uri

    def _checkpoints_done(self, done: list[CheckpointDone]) -> None:
        for d in done:
            if self.inp.metrics is not None:
                self.inp.metrics.record_checkpoint(d.seconds)
            logger.info(
                "checkpoint committed seconds=%.2f loop_waited=%.2f uri=%s",
                d.seconds,
                d.stall_seconds,
                d.uri,
            )
            self.inp.reporter.checkpoint(d.uri)

    def _save_what_is_in_flight(self) -> None:
        """The run failed: still commit the checkpoint being uploaded (its work is not lost);
        the failure that stopped the run is the one raised."""
        try:
            self.finish_checkpoints()
        except Exception as exc:  # noqa: BLE001 - the run's own error goes on
            logger.warning("the checkpoint in flight could not be committed either: %s", exc)

    def finish_checkpoints(self) -> None:
        """Wait for the checkpoint in flight and report it."""
        if self.acc.is_main_process:
            self._checkpoints_done(self.writer.wait())

    # ---- one step --------------------------------------------------------------------------

    def _encode_text(self, captions: list[str]) -> TextConditioning:
        names = self.inp.modules.text_encoders()
        encoders = [self.wrapped.get(name, module) for name, module in names.items()]
        trained = any(name in self.wrapped for name in names)
        with contextlib.nullcontext() if trained else torch.no_grad():
            return self.family.encode(self.inp.components, captions, self.device, encoders)

    def _latents(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        if batch.latents is not None:
            return batch.latents
        assert batch.pixels is not None
        vae = self.inp.components.vae
        with torch.no_grad():
            pixels = to_model_range(batch.pixels, next(vae.parameters()).dtype)
            dist = vae.encode(pixels).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator, device=generator.device).to(
                dist.mean
            )
            latents = dist.mean + dist.std * noise
            shift = getattr(vae.config, "shift_factor", None)
            if shift is not None:
                latents = latents - shift
            scaled: torch.Tensor = latents * vae.config.scaling_factor
        return scaled

    def _denoiser(self, key: str) -> Any:
        """The UNet or ControlNet as the step calls it: compiled, prepared or as loaded."""
        if key in self.compiled:
            return self.compiled[key].module
        return self.wrapped.get(key, getattr(self.inp.modules, key))

    def loss(self, batch: Batch, step: int, micro: int) -> torch.Tensor:
        """Diffusion loss of one micro-batch (the prior-preservation term included).

        ``batch`` is on the device already. Nothing here reads a value back to the host: the
        random draws come from a generator on the device and the DreamBooth split is known on
        the host, so queuing a step never waits for the GPU.
        """
        gen = objective.step_generator(
            self.hp.seed, "step", step, micro, self.rank, device=self.device
        )
        latents = self._latents(batch, gen).float()
        if batch.text_embeddings is not None and "text_encoder" not in self.wrapped:
            text = TextConditioning(batch.text_embeddings, batch.pooled_embeddings)
        else:
            text = self._encode_text(batch.captions)
        scale = self.latent_scale
        added = self.family.unet_kwargs(
            text, batch.time_ids, (latents.shape[-2] * scale, latents.shape[-1] * scale)
        )
        noise = objective.sample_noise(latents, gen, self.reg.noise_offset)
        n = latents.shape[0]
        timesteps = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (n,), generator=gen, device=self.device
        )
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = objective.target_for(
            self.scheduler, latents, noise, timesteps, self.prediction_type
        )
        with self.acc.autocast():
            pred = predict(
                self.inp.modules,
                noisy,
                timesteps,
                text.hidden,
                None if batch.conditioning is None else to_unit_range(batch.conditioning),
                unet=self._denoiser("unet"),
                controlnet=self._denoiser("controlnet"),
                added=added,
            )
        weights = None
        if self.reg.snr_gamma is not None:
            weights = objective.min_snr_weights(
                self.scheduler, timesteps, self.reg.snr_gamma, self.prediction_type
            )
        db = self.spec.dreambooth
        if db is not None and db.prior_preservation and any(batch.prior):
            per_sample = objective.per_sample_loss(pred, target, weights)
            return objective.prior_preservation_loss(per_sample, batch.prior, db.prior_loss_weight)
        return objective.diffusion_loss(pred, target, weights)

    # ---- the loop --------------------------------------------------------------------------

    def _sample(self, step: int) -> tuple[list[str], ClipScoreStatus | None]:
        """The samples' URIs (main process) and their CLIP score (with a CLIP model)."""
        uris: list[str] = []
        clip: ClipScoreStatus | None = None
        if self.acc.is_main_process:
            comps = self.inp.components
            mods = self.inp.modules
            with self._evaluating():
                pipe = build_pipeline(
                    comps,
                    self.acc.unwrap_model(self.wrapped.get("unet", mods.unet)),
                    controlnet=(
                        self.acc.unwrap_model(self.wrapped["controlnet"])
                        if "controlnet" in self.wrapped
                        else None
                    ),
                    text_encoders=[
                        self.acc.unwrap_model(self.wrapped.get(name, module))
                        for name, module in mods.text_encoders().items()
                    ],
                )
                images = generate(
                    pipe,
                    self.spec.sampling,
                    self.inp.sample_prompts,
                    resolution=self.spec.preprocessing.resolution,
                    device=self.device,
                    conditioning=self.inp.sample_conditioning,
                    conditioning_scale=(
                        self.spec.controlnet.conditioning_scale if self.spec.controlnet else 1.0
                    ),
                )
            scores = None
            if self.inp.clip_scorer is not None:
                scores = self.inp.clip_scorer.scores(images, self.inp.sample_prompts)
                clip = clip_score_status(scores, step, ema=self.ema is not None)
            uris = write_samples(
                self.inp.output_store,
                self.inp.output_uri,
                step,
                images,
                self.inp.sample_prompts,
                self.inp.work_dir,
                clip_scores=scores,
            )
            self.inp.reporter.samples(uris)
            if self.inp.tracker is not None:
                self.inp.tracker.log_samples(step, image_grid(images))
            if clip is not None:
                self._publish_clip_score(clip)
        self.acc.wait_for_everyone()
        return uris, clip

    def _publish_clip_score(self, status: ClipScoreStatus) -> None:
        """The samples' CLIP score to the log, the metric, the status and the trackers."""
        logger.info(
            "clip score step=%d score=%.4f images=%d", status.step, status.score, status.images
        )
        if self.inp.metrics is not None:
            self.inp.metrics.record_clip_score(status.score)
        self.inp.reporter.clip_score(status)
        if self.inp.tracker is not None:
            self.inp.tracker.log_clip_score(status)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Inside: the EMA weights (when EMA is on) in eval mode (no dropout), no gradients."""
        with contextlib.ExitStack() as stack:
            if self.ema is not None:
                stack.enter_context(self.ema.applied())
            stack.enter_context(torch.no_grad())
            for m in self.wrapped.values():
                m.eval()
            try:
                yield
            finally:
                for m in self.wrapped.values():
                    m.train()

    def _validate(self, validator: Validator, step: int) -> None:
        """The validation loss of the current weights: each process its share, one collective
        for the sums, one host read."""
        mods = self.inp.modules
        unwrap = self.acc.unwrap_model
        model = ModelForEval(
            self.inp.components,
            mods,
            unet=unwrap(self.wrapped.get("unet", mods.unet)),
            text_encoders=[
                unwrap(self.wrapped.get(name, module))
                for name, module in mods.text_encoders().items()
            ],
            controlnet=unwrap(self.wrapped["controlnet"]) if "controlnet" in self.wrapped else None,
            device=self.device,
            autocast=self.acc.autocast,
        )
        with self._evaluating():
            sums = validator.local_sums(model, self.device)
        if self.world > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        status = validator.result(sums.tolist(), step, ema=self.ema is not None)
        logger.info("validation step=%d loss=%.6f images=%d", step, status.loss, status.images)
        if self.inp.metrics is not None:
            self.inp.metrics.record_validation(status.loss)
        if self.acc.is_main_process:
            self.inp.reporter.validation(status)
            if self.inp.tracker is not None:
                self.inp.tracker.log_validation(status)

    def _micro_batches(self, batches: list[Batch]) -> torch.Tensor:
        """Forward and backward of one optimizer step's micro-batches; the mean loss (on the
        device: not read here)."""
        accum = len(batches)
        step_loss = torch.zeros((), device=self.device)
        for micro, batch in enumerate(batches):
            last = micro == accum - 1
            skip = [] if last or self.world == 1 else list(self.wrapped.values())
            with no_sync_all(skip):
                loss = self.loss(batch, self.state.step, micro)
                self.acc.backward(loss / accum)
            step_loss += loss.detach() / accum
        return step_loss

    def _optimizer_step(self, batches: list[Batch]) -> torch.Tensor:
        """One optimizer step. A failure while a compiled module is not yet proven (its
        compilation happens in the first forward and backward) turns compilation off and
        runs the step again eagerly; any other failure is raised."""
        unproven = [c for c in self.compiled.values() if c.active and not c.proven]
        try:
            step_loss = self._micro_batches(batches)
        except Exception as exc:
            if not unproven:
                raise
            for compiled in unproven:
                compiled.give_up(exc)
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = self._micro_batches(batches)
        for compiled in unproven:
            compiled.proven = compiled.active
        if self.acc.sync_gradients:
            self.acc.clip_grad_norm_(self.params, self.reg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def _read(self, losses: list[torch.Tensor]) -> tuple[list[float], bool]:
        """The host's one look at the device for these steps: their losses (averaged over the
        processes) and whether any process was asked to stop, in one collective."""
        stop = 1.0 if self.inp.stop_requested.is_set() else 0.0
        packed = torch.cat([torch.stack(losses), torch.tensor([stop], device=self.device)])
        if self.world > 1:
            packed = self.acc.reduce(packed, reduction="sum")
            packed[:-1] /= self.world
        values = packed.tolist()
        return values[:-1], values[-1] > 0

    def run(self) -> LoopResult:
        """Train from the current state to ``total_steps`` (or until a stop is requested)."""
        inp = self.inp
        total = inp.total_steps
        accum = self.hp.gradient_accumulation_steps
        result = LoopResult(self.state, interrupted=False, latest_checkpoint=None)
        if self.ema is not None and self.state.step == 0:
            self.ema.update(-1)  # start from the initial weights
        source = data_position(inp.sampler, self.state.epoch, self.state.batch_in_epoch)
        prefetch: Prefetcher | InlineBatches = (
            InlineBatches(source, inp.builder)
            if self.device.type == "cpu"
            else Prefetcher(source, inp.builder, pin=True)
        )
        pending: list[torch.Tensor] = []  # losses of the steps since the last read
        window = _Window()
        stop_agreed = False
        try:
            while self.state.step < total:
                # One process: the stop flag is host state. Several: agreed at the last read.
                if stop_agreed or (self.world == 1 and inp.stop_requested.is_set()):
                    result.interrupted = True
                    break
                batches: list[Batch] = []
                for _ in range(accum):
                    wait_start = time.perf_counter()
                    epoch, index, batch = prefetch.next()
                    window.waited += time.perf_counter() - wait_start
                    batches.append(batch.to(self.device))
                    window.images += len(batch.captions) * self.world
                    self.state.epoch = epoch
                    self.state.batch_in_epoch = index + 1
                pending.append(self._optimizer_step(batches))
                self.state.step += 1
                if self.ema is not None:
                    self.ema.update(self.state.step)
                self.state.images_seen += sum(len(b.captions) for b in batches) * self.world
                step = self.state.step
                if step % self.read_every == 0 or step == total:
                    losses, stop_agreed = self._read(pending)
                    pending = []
                    result.losses.extend(losses)
                    seconds = time.perf_counter() - window.start
                    result.step_seconds += seconds - window.outside
                    self._report(losses, window)
                    window = _Window()
                if self.acc.is_main_process:
                    self._checkpoints_done(self.writer.poll())
                outside = time.perf_counter()
                if inp.validator is not None and inp.validator.due(step, total):
                    self._validate(inp.validator, step)
                if should_sample(step, total, self.spec.sampling.every_steps):
                    result.samples, clip = self._sample(step)
                    if clip is not None:
                        result.clip_score = clip
                if step % self.spec.checkpointing.every_steps == 0 or step == total:
                    result.latest_checkpoint = self.save_checkpoint()
                    if inp.tracker is not None:
                        inp.tracker.sync()
                window.outside += time.perf_counter() - outside
            if pending:  # one process stopped between reads
                losses, _ = self._read(pending)
                result.losses.extend(losses)
        except BaseException:
            self._save_what_is_in_flight()
            raise
        finally:
            prefetch.close()
        if result.interrupted:
            logger.info("stop requested: saving a checkpoint at step=%d", self.state.step)
            result.latest_checkpoint = self.save_checkpoint()
        self.finish_checkpoints()
        return result

    def _report(self, losses: list[float], window: _Window) -> None:
        beta = 0.9
        for loss in losses:
            self._loss_avg = (
                loss if self._loss_avg is None else beta * self._loss_avg + (1 - beta) * loss
            )
        assert self._loss_avg is not None
        seconds = max(time.perf_counter() - window.start - window.outside, 1e-9)
        rate = window.images / seconds
        self._rate = rate if self._rate is None else beta * self._rate + (1 - beta) * rate
        steps_left = self.inp.total_steps - self.state.step
        per_step = window.images / max(len(losses), 1)
        eta = steps_left * per_step / max(self._rate, 1e-9)
        lr = float(self.lr_scheduler.get_last_lr()[0])
        memory = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else 0
        if self.inp.metrics is not None:
            self.inp.metrics.record_step(
                step=self.state.step,
                total_steps=self.inp.total_steps,
                loss=self._loss_avg,
                learning_rate=lr,
                images=window.images,
                images_per_second=self._rate,
                eta_seconds=eta,
                data_wait_seconds=window.waited,
                gpu_memory_bytes=memory,
            )
        if self.inp.tracker is not None:
            self.inp.tracker.log_losses(self.state.step, losses, lr)
        if self.acc.is_main_process:
            self.inp.reporter.progress(
                Progress(
                    step=self.state.step,
                    total_steps=self.inp.total_steps,
                    epoch=self.state.epoch,
                    loss=self._loss_avg,
                    images_per_second=self._rate,
                    eta_seconds=eta,
                    learning_rate=lr,
                )
            )


@dataclass
class _Window:
    """The steps between two host reads: their images, data wait and time spent outside
    optimizer steps (samples, checkpoint snapshots)."""

    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    waited: float = 0.0
    outside: float = 0.0
