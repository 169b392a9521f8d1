"""The training loop on Accelerate: small components composed, one optimizer step at a time."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difftrain.api import DiffusionTrainingJobSpec
from difftrain.storage import Store
from difftrain.train import objective
from difftrain.train.batches import (
    Batch,
    BatchBuilder,
    InlineBatches,
    Prefetcher,
    data_position,
)
from difftrain.train.checkpoint import CheckpointStore, TrainingState
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
from difftrain.train.sampling import build_pipeline, generate, should_sample, write_samples

logger = logging.getLogger(__name__)


@dataclass
class LoopResult:
    """How the loop ended."""

    state: TrainingState
    interrupted: bool
    latest_checkpoint: str | None
    samples: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
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
        frozen_dtype = torch.float32
        if self.device.type == "cuda":
            frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                self.hp.mixed_precision, torch.float32
            )
        comps.vae.to(self.device, torch.float32 if frozen_dtype == torch.float16 else frozen_dtype)
        comps.vae.eval()
        if not modules.train_text_encoder:
            modules.text_encoder.to(self.device, frozen_dtype).eval()
        if modules.method != "full":
            for p in modules.unet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(self.device, frozen_dtype)
            modules.unet.to(self.device)
        learners = modules.learners()
        for module in learners.values():
            module.to(self.device)
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # trained weights stay fp32 (autocast does the rest)
            module.train()
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
        """Main process writes the checkpoint; all wait for it."""
        uri = None
        if self.acc.is_main_process:
            start = time.perf_counter()
            trainable = trainable_state(self.inp.modules, self.acc.unwrap_model)
            uri = self.checkpoints.save(
                self.inp.work_dir, self.state, trainable, self._components_state()
            )
            seconds = time.perf_counter() - start
            if self.inp.metrics is not None:
                self.inp.metrics.record_checkpoint(seconds)
            logger.info("checkpoint step=%d seconds=%.2f uri=%s", self.state.step, seconds, uri)
            self.inp.reporter.checkpoint(uri)
        self.acc.wait_for_everyone()
        return uri

    # ---- one step --------------------------------------------------------------------------

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        tok = self.inp.components.tokenizer
        ids = tok(
            captions,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        encoder = self.wrapped.get("text_encoder", self.inp.modules.text_encoder)
        ctx = contextlib.nullcontext() if "text_encoder" in self.wrapped else torch.no_grad()
        with ctx:
            out: torch.Tensor = encoder(ids)[0]
        return out

    def _latents(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        if batch.latents is not None:
            return batch.latents.to(self.device)
        assert batch.pixels is not None
        vae = self.inp.components.vae
        with torch.no_grad():
            pixels = batch.pixels.to(self.device, next(vae.parameters()).dtype)
            dist = vae.encode(pixels).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
            latents = dist.mean + dist.std * noise
            shift = getattr(vae.config, "shift_factor", None)
            if shift is not None:
                latents = latents - shift
            scaled: torch.Tensor = latents * vae.config.scaling_factor
        return scaled

    def loss(self, batch: Batch, step: int, micro: int) -> torch.Tensor:
        """Diffusion loss of one micro-batch (the prior-preservation term included)."""
        gen = objective.step_generator(self.hp.seed, "step", step, micro, self.rank)
        latents = self._latents(batch, gen).float()
        if batch.text_embeddings is not None and "text_encoder" not in self.wrapped:
            text = batch.text_embeddings.to(self.device)
        else:
            text = self._encode_text(batch.captions)
        noise = objective.sample_noise(latents, gen, self.reg.noise_offset)
        n = latents.shape[0]
        timesteps = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (n,), generator=gen
        ).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = objective.target_for(
            self.scheduler, latents, noise, timesteps, self.prediction_type
        )
        with self.acc.autocast():
            pred = predict(
                self.inp.modules,
                noisy,
                timesteps,
                text,
                batch.conditioning.to(self.device) if batch.conditioning is not None else None,
                unet=self.wrapped.get("unet", self.inp.modules.unet),
                controlnet=self.wrapped.get("controlnet"),
            )
        weights = None
        if self.reg.snr_gamma is not None:
            weights = objective.min_snr_weights(
                self.scheduler, timesteps, self.reg.snr_gamma, self.prediction_type
            )
        prior = batch.prior.to(self.device) if batch.prior is not None else None
        if prior is not None and bool(prior.any()) and self.spec.dreambooth is not None:
            inst = ~prior
            w_inst = weights[inst] if weights is not None else None
            w_prior = weights[prior] if weights is not None else None
            loss = objective.diffusion_loss(pred[inst], target[inst], w_inst)
            loss = loss + self.spec.dreambooth.prior_loss_weight * objective.diffusion_loss(
                pred[prior], target[prior], w_prior
            )
            return loss
        return objective.diffusion_loss(pred, target, weights)

    # ---- the loop --------------------------------------------------------------------------

    def _sample(self, step: int) -> list[str]:
        uris: list[str] = []
        if self.acc.is_main_process:
            comps = self.inp.components
            mods = self.inp.modules
            ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
            for m in self.wrapped.values():
                m.eval()  # no dropout in samples
            with ctx:
                pipe = build_pipeline(
                    comps,
                    self.acc.unwrap_model(self.wrapped.get("unet", mods.unet)),
                    controlnet=(
                        self.acc.unwrap_model(self.wrapped["controlnet"])
                        if "controlnet" in self.wrapped
                        else None
                    ),
                    text_encoder=(
                        self.acc.unwrap_model(self.wrapped["text_encoder"])
                        if "text_encoder" in self.wrapped
                        else None
                    ),
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
            for m in self.wrapped.values():
                m.train()
            uris = write_samples(
                self.inp.output_store,
                self.inp.output_uri,
                step,
                images,
                self.inp.sample_prompts,
                self.inp.work_dir,
            )
            self.inp.reporter.samples(uris)
        self.acc.wait_for_everyone()
        return uris

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.inp.stop_requested.is_set() else 0.0], device=self.device)
        if self.world > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

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
            else Prefetcher(source, inp.builder)
        )
        try:
            while self.state.step < total:
                if self._stop_agreed():
                    result.interrupted = True
                    break
                step_start = time.perf_counter()
                waited = 0.0
                step_loss = 0.0
                images = 0
                for micro in range(accum):
                    wait_start = time.perf_counter()
                    epoch, index, batch = prefetch.next()
                    waited += time.perf_counter() - wait_start
                    sync = micro == accum - 1
                    ctx = (
                        contextlib.nullcontext()
                        if sync or self.world == 1
                        else self.acc.no_sync(next(iter(self.wrapped.values())))
                    )
                    with ctx:
                        loss = self.loss(batch, self.state.step, micro)
                        self.acc.backward(loss / accum)
                    step_loss += float(loss.detach()) / accum
                    images += len(batch.captions)
                    self.state.epoch = epoch
                    self.state.batch_in_epoch = index + 1
                if self.acc.sync_gradients:
                    self.acc.clip_grad_norm_(self.params, self.reg.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.step += 1
                if self.ema is not None:
                    self.ema.update(self.state.step)
                mean_loss = step_loss
                if self.world > 1:
                    mean_loss = float(
                        self.acc.reduce(torch.tensor([step_loss], device=self.device), "mean")
                    )
                all_images = images * self.world
                self.state.images_seen += all_images
                result.losses.append(mean_loss)
                step_time = time.perf_counter() - step_start
                result.step_seconds += step_time
                self._report(mean_loss, all_images, step_time, waited)
                step = self.state.step
                if should_sample(step, total, self.spec.sampling.every_steps):
                    result.samples = self._sample(step)
                if step % self.spec.checkpointing.every_steps == 0 or step == total:
                    result.latest_checkpoint = self.save_checkpoint()
        finally:
            prefetch.close()
        if result.interrupted:
            logger.info("stop requested: saving a checkpoint at step=%d", self.state.step)
            result.latest_checkpoint = self.save_checkpoint()
        return result

    def _report(self, loss: float, images: int, seconds: float, waited: float) -> None:
        beta = 0.9
        self._loss_avg = (
            loss if self._loss_avg is None else beta * self._loss_avg + (1 - beta) * loss
        )
        rate = images / max(seconds, 1e-9)
        self._rate = rate if self._rate is None else beta * self._rate + (1 - beta) * rate
        steps_left = self.inp.total_steps - self.state.step
        eta = steps_left * images / max(self._rate, 1e-9)
        lr = float(self.lr_scheduler.get_last_lr()[0])
        memory = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else 0
        if self.inp.metrics is not None:
            self.inp.metrics.record_step(
                step=self.state.step,
                total_steps=self.inp.total_steps,
                loss=self._loss_avg,
                learning_rate=lr,
                images=images,
                images_per_second=self._rate,
                eta_seconds=eta,
                data_wait_seconds=waited,
                gpu_memory_bytes=memory,
            )
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
