"""Training examples and batches: from the latent cache or decoded on the fly.

Every random choice about an example (flip, crop, rotation, caption dropout, which caption and
which tags: :mod:`difftrain.data.captions`) is drawn from a generator seeded by (seed, epoch,
index), so resuming at a data position replays exactly the batches the uninterrupted run would
have seen. A batch with a caption that varies across epochs carries no cached text embeddings:
the loop encodes its captions itself.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from difftrain.data.captions import CaptionPolicy
from difftrain.data.transforms import ImageTransform, SizeConditioning
from difftrain.train.objective import step_generator

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Example:
    """One training example: a cleaned pair and/or its cached encoding."""

    key: str
    caption: str  # what it trains with when nothing varies (and what a cache encoded)
    size: tuple[int, int]  # (width, height) it is trained at
    data: bytes | None = None  # encoded image (raw mode), when held in memory
    source: Any = None  # the CleanPair whose image is read for each batch (raw mode, no data)
    cached: Any = None  # difftrain.data.cache.CachedSample (cached mode)
    conditioning: bytes | None = None  # ControlNet conditioning image
    is_prior: bool = False  # a DreamBooth class image
    # The image's own captions and its dataset's caption tools; without a policy (DreamBooth's
    # class images) it trains with ``caption`` as it is.
    captions: tuple[str, ...] = ()
    policy: CaptionPolicy | None = None

    @property
    def varies(self) -> bool:
        """Whether its text changes across epochs (several captions, shuffled or dropped tags)."""
        return self.policy is not None and self.policy.varies(self.captions)

    def text(self, seed: int, epoch: int, index: int) -> str:
        """The caption it trains with in ``epoch`` at position ``index`` of the examples."""
        if not self.varies:
            return self.caption
        assert self.policy is not None
        return self.policy.draw(self.captions, seed=seed, epoch=epoch, index=index)


@dataclass
class Batch:
    """What one micro-batch feeds the model."""

    captions: list[str]
    latents: torch.Tensor | None = None  # scaled latents (cached mode)
    pixels: torch.Tensor | None = None  # uint8 images (raw mode): to_model_range gives [-1, 1]
    text_embeddings: torch.Tensor | None = None  # cached text-encoder outputs
    conditioning: torch.Tensor | None = None  # uint8 ControlNet conditioning: to_unit_range
    prior: list[bool] = field(default_factory=list)  # per example: a DreamBooth class image
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL: original size, crop corner, target size
    pooled_embeddings: torch.Tensor | None = None  # (B, P) SDXL: cached pooled text embeddings

    _TENSORS = (
        "latents",
        "pixels",
        "text_embeddings",
        "conditioning",
        "time_ids",
        "pooled_embeddings",
    )

    def pinned(self) -> Batch:
        """The batch with its tensors in page-locked memory (copied to a GPU asynchronously)."""
        moved = {n: t.pin_memory() for n in self._TENSORS if (t := getattr(self, n)) is not None}
        return dataclasses.replace(self, **moved)

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device``; from pinned memory the copies do not wait for the GPU."""
        moved = {
            n: t.to(device, non_blocking=True)
            for n in self._TENSORS
            if (t := getattr(self, n)) is not None
        }
        return dataclasses.replace(self, **moved)


def epoch_batches(sampler: Any, epoch: int) -> list[list[int]]:
    """The sampler's batches of one epoch (deterministic from the seed and epoch)."""
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler]


def data_position(
    sampler: Any, epoch: int, batch_in_epoch: int
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batch index, example indices) from a position on, across epochs, forever."""
    while True:
        batches = epoch_batches(sampler, epoch)
        if not batches:
            raise ValueError(
                "the dataset gives no full batch: lower hyperparameters.batchSize or add images"
            )
        for i in range(batch_in_epoch, len(batches)):
            yield epoch, i, batches[i]
        epoch += 1
        batch_in_epoch = 0


def image_workers() -> int:
    """Threads that read, decode and transform a batch's images: the CPUs this process may use
    (Pillow and PyTorch release the GIL while they decode and resize), at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


class BatchBuilder:
    """Turns example indices into a Batch.

    A raw example's image is read, decoded and transformed on ``workers`` threads, each with its
    own generator (seeded by seed, epoch and index), so a batch is the same whatever the number
    of threads. Images stay uint8 (``Batch.pixels``, ``Batch.conditioning``); the training step
    and validation normalise them on the device (``to_model_range``, ``to_unit_range`` of
    :mod:`difftrain.data.transforms`).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        seed: int,
        transform: ImageTransform | None,
        decode: Callable[[bytes, str], Any] | None,
        flip_probability: float,
        caption_dropout: float,
        scaling_factor: float,
        shift_factor: float | None = None,
        read: Callable[[Any], bytes] | None = None,
        workers: int = 1,
        size_conditioning: bool = False,
        cached_text: bool = True,
    ) -> None:
        self.examples = examples
        self.seed = seed
        self.transform = transform
        self.decode = decode
        self.flip_probability = flip_probability
        self.caption_dropout = caption_dropout
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        self.read = read  # a source pair -> its image bytes, read when a batch needs them
        self.workers = workers
        # SDXL: each raw image's size and crop as the batch's time ids
        self.size_conditioning = size_conditioning
        # whether the latent cache's text embeddings are what the model is conditioned on
        self.use_cached_text = cached_text
        self._pool: ThreadPoolExecutor | None = None
        # The text encoder's output for an empty caption (caption dropout with cached text),
        # and SDXL's pooled embedding of it.
        self.empty_embedding: torch.Tensor | None = None
        self.empty_pooled: torch.Tensor | None = None

    def __call__(self, epoch: int, index: int, indices: list[int]) -> Batch:
        captions: list[str] = []
        latents: list[torch.Tensor] = []
        images: list[tuple[Example, random.Random, bool]] = []
        conditioned: list[Example] = []
        embeddings: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        time_ids: list[torch.Tensor] = []
        prior: list[bool] = []
        # cached text embeddings only when every caption of the batch is the cached one
        cached_text = self.use_cached_text and not any(self.examples[i].varies for i in indices)
        for i in indices:
            ex = self.examples[i]
            rng = random.Random(f"{self.seed}:{epoch}:{i}")
            flip = rng.random() < self.flip_probability
            drop = rng.random() < self.caption_dropout
            captions.append("" if drop else ex.text(self.seed, epoch, i))
            prior.append(ex.is_prior)
            if ex.cached is not None:
                params = ex.cached.latent_params
                mirrored = flip and ex.cached.latent_params_flipped is not None
                if mirrored:
                    params = ex.cached.latent_params_flipped
                gen = step_generator(self.seed, "latent", epoch, i)
                latents.append(self._sample_latent(params, gen))
                sizes = ex.cached.sizes if self.size_conditioning else None
                if sizes is not None:
                    time_ids.append(sizes[1 if mirrored and len(sizes) > 1 else 0].float())
                if cached_text and ex.cached.text_embeddings is not None:
                    cached_pooled = ex.cached.pooled
                    if drop:
                        assert self.empty_embedding is not None
                        embeddings.append(self.empty_embedding)
                        if cached_pooled is not None:
                            assert self.empty_pooled is not None
                            pooled.append(self.empty_pooled)
                    else:
                        embeddings.append(ex.cached.text_embeddings.float())
                        if cached_pooled is not None:
                            pooled.append(cached_pooled.float())
            else:
                images.append((ex, rng, flip))  # the rest of rng is the transform's
            if ex.conditioning is not None:
                conditioned.append(ex)
        batch = Batch(captions=captions, prior=prior)
        if latents:
            batch.latents = torch.stack(latents)
        if images and self.size_conditioning and not latents:
            cut = self._map(self._pixels_and_sizes, images)
            batch.pixels = torch.stack([pixels for pixels, _ in cut])
            batch.time_ids = torch.tensor(
                [[*s.original_size, *s.crop_top_left, *s.target_size] for _, s in cut],
                dtype=torch.float32,
            )
        elif images:
            batch.pixels = torch.stack(self._map(self._pixels, images))
        if embeddings and len(embeddings) == len(indices):
            batch.text_embeddings = torch.stack(embeddings)
            if len(pooled) == len(indices):
                batch.pooled_embeddings = torch.stack(pooled)
        if time_ids and len(time_ids) == len(indices):
            batch.time_ids = torch.stack(time_ids)
        if conditioned:
            batch.conditioning = torch.stack(self._map(self._conditioning, conditioned))
        return batch

    def _pixels(self, item: tuple[Example, random.Random, bool]) -> torch.Tensor:
        ex, rng, flip = item
        assert self.transform is not None
        return self.transform.pixels(self._image(ex), size=ex.size, rng=rng, flip=flip)

    def _pixels_and_sizes(
        self, item: tuple[Example, random.Random, bool]
    ) -> tuple[torch.Tensor, SizeConditioning]:
        ex, rng, flip = item
        assert self.transform is not None
        return self.transform.pixels_and_sizes(self._image(ex), size=ex.size, rng=rng, flip=flip)

    def _image(self, ex: Example) -> Any:
        assert self.decode is not None
        data = ex.data
        if not data:
            assert self.read is not None and ex.source is not None, ex.key
            data = self.read(ex.source)
        return self.decode(data, ex.key)

    def _conditioning(self, ex: Example) -> torch.Tensor:
        assert self.transform is not None and self.decode is not None
        assert ex.conditioning is not None
        cond_image = self.decode(ex.conditioning, ex.key + " (conditioning)")
        # same size, unflipped, center crop: matches the cached latent's framing
        return self.transform.pixels(cond_image, size=ex.size, rng=random.Random(0), flip=False)

    def _map(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        if self.workers <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self._pool is None:  # made at the first batch, reused by every later one
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="difftrain-batch")
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        """Stop the image threads (a later batch starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _sample_latent(self, params: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, logvar = params.float().chunk(2, dim=0)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        sample = mean + std * torch.randn(mean.shape, generator=generator)
        if self.shift_factor is not None:
            sample = sample - self.shift_factor
        return sample * self.scaling_factor


class InlineBatches:
    """Builds each batch when it is asked for: for training on the CPU itself, where a
    background thread only competes with the model's own threads (measured ~25% slower)."""

    def __init__(self, source: Iterator[tuple[int, int, list[int]]], build: BatchBuilder) -> None:
        self.source = source
        self.build = build

    def next(self) -> tuple[int, int, Batch]:
        epoch, index, indices = next(self.source)
        return epoch, index, self.build(epoch, index, indices)

    def close(self) -> None:
        return None


class Prefetcher:
    """Builds the next batches on a background thread while the model trains on this one.

    With ``pin`` (training on a GPU) each batch is put in page-locked memory on that thread, so
    the loop's copy to the GPU is asynchronous and overlaps the previous step's kernels.
    """

    def __init__(
        self,
        source: Iterator[tuple[int, int, list[int]]],
        build: BatchBuilder,
        depth: int = 4,
        *,
        pin: bool = False,
    ) -> None:
        self.source = source
        self.build = build
        self.pin = pin
        self.queue: queue.Queue[tuple[int, int, Batch] | BaseException] = queue.Queue(depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._work, name="batch-prefetch", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            for epoch, index, indices in self.source:
                batch = self.build(epoch, index, indices)
                item = (epoch, index, batch.pinned() if self.pin else batch)
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self.stopped.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self.queue.put(exc)

    def next(self) -> tuple[int, int, Batch]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()
