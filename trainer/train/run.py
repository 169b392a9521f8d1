"""One training run, end to end: model, data, cache, loop, exports.

The same function runs in a pod (``difftrain run /etc/difftrain/job.yaml``) and on a workstation
(``difftrain run --local``); only the reporter and the stores differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difftrain.api import (
    DatasetReport,
    DatasetSpec,
    DiffusionTrainingJob,
    DiffusionTrainingJobSpec,
    ExportedFile,
)
from difftrain.data.captions import CaptionPolicy
from difftrain.storage import Store, StoreConfig, is_s3, join, open_store
from difftrain.train.batches import BatchBuilder, Example, image_workers
from difftrain.train.loop import LoopInputs, LoopResult, Trainer
from difftrain.train.methods import TrainingConfigError, attach
from difftrain.train.metrics import TrainingMetrics
from difftrain.train.report import Reporter
from difftrain.train.tracking import ExperimentTracker, accelerator_options
from difftrain.train.validation import (
    build_validator,
    held_out_examples,
    hold_out,
    hold_out_each,
)

if TYPE_CHECKING:
    from difftrain.data.cleaning import CleaningResult

logger = logging.getLogger(__name__)

SAMPLE_PROMPTS_FROM_DATA = 4


@dataclass
class RunOptions:
    """How and where a run happens (not what it trains: that is the spec)."""

    work_dir: Path
    store_config: StoreConfig | None = None
    metrics_port: int | None = None
    job_name: str = "local"
    namespace: str = ""
    reporter: Reporter | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)


@dataclass
class RunOutcome:
    """What a run produced."""

    interrupted: bool
    loop: LoopResult
    outputs: list[ExportedFile]
    report: DatasetReport
    cache_hit: bool | None


def _accelerator(spec: DiffusionTrainingJobSpec, **trackers: Any) -> Any:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mp = spec.hyperparameters.mixed_precision
    if not cuda and mp == "fp16":
        raise TrainingConfigError(
            "hyperparameters.mixedPrecision fp16 needs a GPU; use bf16 or no on a CPU"
        )
    return Accelerator(mixed_precision=mp, cpu=not cuda, **trackers)


def _recipe(spec: DiffusionTrainingJobSpec, base_identity: str) -> dict[str, str]:
    return {
        "difftrain.recipe": json.dumps(spec.to_wire(), sort_keys=True),
        "difftrain.base_model_sha256": base_identity,
    }


def _conditioning_images(spec: DiffusionTrainingJobSpec, options: RunOptions) -> dict[str, bytes]:
    """ControlNet conditioning images by key (path relative to the uri, without extension)."""
    assert spec.controlnet is not None
    uri = spec.controlnet.conditioning_uri.rstrip("/")
    store = open_store(uri, options.store_config)
    out: dict[str, bytes] = {}
    for found in store.list(uri + "/"):
        rel = found[len(uri) + 1 :]
        stem, dot, ext = rel.rpartition(".")
        if dot and ext.lower() in {"png", "jpg", "jpeg", "webp"}:
            out[stem] = store.read_range(found, 0, store.size(found))
    if not out:
        raise TrainingConfigError(
            f"controlnet.conditioningUri {uri}: no PNG/JPEG/WebP images found there"
        )
    return out


def run_training(job: DiffusionTrainingJob, options: RunOptions) -> RunOutcome:
    """Train ``job`` to its end (or until a stop is requested) and export the result."""
    with torch.enable_grad():  # whatever grad mode the caller left behind
        return _run_training(job, options)


def _run_training(job: DiffusionTrainingJob, options: RunOptions) -> RunOutcome:
    from difftrain.data.cache import CACHE_FOLDER
    from difftrain.data.cleaning import write_report
    from difftrain.data.images import decode_rgb
    from difftrain.data.transforms import ImageTransform
    from difftrain.models import load_base_model
    from difftrain.models.families import family
    from difftrain.models.placement import frozen_dtype
    from difftrain.train.dreambooth import check_prior_settings
    from difftrain.train.family_rules import for_family
    from difftrain.train.shared_data import clean_dataset, clean_on_main

    spec = job.spec.resolved()
    check_prior_settings(spec)
    hp = spec.hyperparameters
    pre = spec.preprocessing
    options.work_dir.mkdir(parents=True, exist_ok=True)
    tracking_dir = Path(tempfile.mkdtemp(prefix="tracking-", dir=options.work_dir))
    acc = _accelerator(spec, **accelerator_options(spec.tracking, tracking_dir, os.environ))
    torch.manual_seed(hp.seed)
    random.seed(hp.seed)
    work = options.work_dir / f"rank{acc.process_index}"
    work.mkdir(parents=True, exist_ok=True)

    metrics = None
    if acc.is_local_main_process:
        metrics = TrainingMetrics(options.job_name, options.namespace, acc.process_index)
        if options.metrics_port:
            metrics.serve(options.metrics_port)
    from difftrain.train.report import ConsoleReporter

    reporter: Reporter = options.reporter or ConsoleReporter(bar=acc.is_main_process)
    output_store = open_store(spec.output.uri, options.store_config)

    # Model: the first process on each machine downloads; the others read its copy.
    with acc.local_main_process_first():
        base_uri = spec.base_model.uri or ""
        components = load_base_model(
            spec.base_model,
            open_store(base_uri, options.store_config) if base_uri else None,
            work_dir=options.work_dir / "model",
        )
    fam = family(components.family)
    spec = for_family(spec, job.spec, fam)
    pre = spec.preprocessing
    # The CLIP model of the samples' score: on the process that samples, refused before the data.
    clip_scorer = None
    if spec.sampling.clip_model_uri is not None and acc.is_main_process:
        from difftrain.train.clip_score import load_clip_scorer

        clip_scorer = load_clip_scorer(
            spec.sampling.clip_model_uri,
            options.store_config,
            work_dir=options.work_dir / "clip-model",
            device=acc.device,
        )

    # Data: listed and cleaned (deterministic, so every process gets the same pairs). With the
    # latent cache and several processes, only the main process reads and cleans the images; the
    # others get the kept pairs' list from it and read only their share's images (on a miss).
    # With spec.datasets each dataset is cleaned, held out from and cached on its own (beside
    # itself), then the epoch draws from each by its weight (difftrain.data.mixture).
    tokenizer = components.tokenizer
    stores = _Stores(options.store_config, options.work_dir)
    multi = spec.datasets is not None
    template = spec.dreambooth.instance_prompt if spec.dreambooth is not None else None

    def count_tokens(text: str) -> int:
        return len(tokenizer(text).input_ids)

    shared = pre.cache_latents and acc.num_processes > 1
    parts: list[_Part] = []
    for number, dataset in enumerate(spec.dataset_list):
        name = f"datasets[{number}]" if multi else "dataset"
        part_store = stores.get(dataset.uri)
        part_root = join(dataset.uri, CACHE_FOLDER)

        def clean(ds: Any = dataset, store: Any = part_store, root: str = part_root) -> Any:
            # with the latent cache, objects seen before are judged by their kept facts, not read
            return clean_dataset(
                ds,
                store,
                facts_root=root if pre.cache_latents else None,
                count_tokens=count_tokens,
                max_tokens=tokenizer.model_max_length,
            )

        cleaned_part = clean_on_main(acc, clean) if shared else clean()
        if not cleaned_part.pairs:
            raise TrainingConfigError(
                f"{name}.uri {dataset.uri}: cleaning kept no image–text pair "
                f"(dropped: {cleaned_part.report.dropped}); relax {name}.cleaning or add data"
            )
        # Caption tools: each example draws its text per epoch from its image's own captions; a
        # fixed one (nothing varies) is the first caption in DreamBooth's template, which is
        # what the cache encodes.
        part_policy = CaptionPolicy.from_spec(dataset.captions, template=template)
        parts.append(
            _Part(
                spec=dataset,
                name=name,
                store=part_store,
                cache_root=part_root,
                cleaned=cleaned_part,
                policy=part_policy,
                own_captions={p.key: p.captions for p in cleaned_part.pairs},
                pairs=[
                    dataclasses.replace(p, caption=part_policy.fixed(p.caption))
                    for p in cleaned_part.pairs
                ],
            )
        )
    first = parts[0]
    conditioning: dict[str, bytes] = {}
    if spec.controlnet is not None:  # one dataset (the API refuses datasets with controlnet)
        conditioning = _conditioning_images(spec, options)
        missing = [p.key for p in first.pairs if p.key not in conditioning]
        if missing:
            first.cleaned.report.dropped["missing_conditioning"] = len(missing)
            first.cleaned.report.kept -= len(missing)
            first.pairs = [p for p in first.pairs if p.key in conditioning]
            if not first.pairs:
                raise TrainingConfigError(
                    f"controlnet.conditioningUri: no conditioning image matches a training image "
                    f"key (e.g. {missing[0]!r}); name each after its image"
                )

    def clean_validation(uri: str) -> list[Any]:
        # a separate validation set is read and cleaned with the (first) dataset's options
        found = clean_dataset(
            first.spec.model_copy(update={"uri": uri, "limit": None}),
            stores.get(uri),
            count_tokens=count_tokens,
            max_tokens=tokenizer.model_max_length,
        )
        return [dataclasses.replace(p, caption=first.policy.fixed(p.caption)) for p in found.pairs]

    # validation: held out by key hash before anything is cached or trained (or a separate set);
    # with several datasets, validation.fraction of each
    held_out: list[Any]
    if multi and spec.validation.uri is None:
        kept_pairs, held_out = hold_out_each(
            spec.validation, [p.pairs for p in parts], key=lambda p: p.key
        )
        for part, kept_pairs_of in zip(parts, kept_pairs, strict=True):
            part.pairs = kept_pairs_of
    else:
        first.pairs, held_out = hold_out(
            spec.validation, first.pairs, clean_validation, key=lambda p: p.key
        )
    transform = ImageTransform(pre)
    generation = {"device": acc.device, "dtype": frozen_dtype(acc.device, hp.mixed_precision)}
    for part in parts:
        _part_examples(
            part, spec, acc, components, transform, generation, conditioning, options.work_dir
        )
    cache_hits = [p.cache_hit for p in parts]
    cache_hit: bool | None = None if not pre.cache_latents else all(h is True for h in cache_hits)
    mix = None
    if multi:
        from difftrain.data.mixture import DatasetMix, MixPart

        try:
            mix = DatasetMix(
                [
                    MixPart(
                        sizes=[e.size for e in p.examples],
                        weight=getattr(p.spec, "weight", 1.0),
                        repeats=p.spec.repeats,
                        name=f"{p.name} ({p.spec.uri})",
                    )
                    for p in parts
                ],
                seed=hp.seed,
            )
        except ValueError as exc:
            raise TrainingConfigError(str(exc)) from None
        cleaned = _mixed_report(parts, mix)
    else:
        cleaned = first.cleaned
    report = cleaned.report
    if acc.is_main_process:
        write_report(output_store, join(spec.output.uri, "dataset"), cleaned)
        reporter.dataset(report)
        for part in parts:
            logger.info(
                "dataset ready %s examples=%d cache=%s key=%s",
                part.name,
                len(part.examples),
                part.cache_hit,
                part.key,
            )

    examples: list[Example]
    if mix is not None:
        # each dataset's examples as many times as it may be drawn in an epoch: each copy its
        # own index (and so its own caption, flip and latent draws)
        examples = mix.expand([p.examples for p in parts])
        if acc.is_main_process:
            logger.info(
                "datasets mixed: epoch of %d examples, %s",
                mix.epoch_length,
                ", ".join(
                    f"{p.name}={q} ({s:.1%})"
                    for p, q, s in zip(parts, mix.quotas, mix.shares(), strict=True)
                ),
            )
    else:
        # dataset.repeats: each image that many times per epoch, each copy its own index (and
        # so its own caption, flip and latent draws)
        examples = first.examples * first.spec.repeats
    prior_count = 0
    if spec.dreambooth is not None and spec.dreambooth.prior_preservation:
        from difftrain.train.dreambooth import class_examples

        with acc.main_process_first():
            prior = class_examples(spec, components, options, output_store, **generation)
        prior_count = len(prior)
        examples = examples + prior

    sampler = _sampler(spec, examples, prior_count, acc, mix)
    total_steps = hp.max_steps or _epoch_steps(
        sampler, hp.epochs or 1, hp.gradient_accumulation_steps
    )

    modules = attach(spec, components)
    builder = BatchBuilder(
        examples,
        seed=hp.seed,
        transform=transform,
        decode=decode_rgb,
        flip_probability=pre.flip_probability if spec.method != "controlnet" else 0.0,
        caption_dropout=spec.regularization.caption_dropout,
        scaling_factor=float(components.vae.config.scaling_factor),
        shift_factor=getattr(components.vae.config, "shift_factor", None),
        read=stores.read,
        workers=image_workers(),
        size_conditioning=fam.size_conditioning,
        cached_text=fam.caches_text,
    )
    if spec.regularization.caption_dropout > 0 and pre.cache_latents and fam.caches_text:
        with torch.no_grad():
            empty = fam.encode(components, [""], torch.device("cpu"))
        builder.empty_embedding = empty.hidden[0].float()
        builder.empty_pooled = None if empty.pooled is None else empty.pooled[0].float()

    prompts = list(spec.sampling.prompts) or _prompts_from(examples, spec)
    sample_conditioning = None
    if spec.method == "controlnet":
        sample_conditioning = [
            decode_rgb(conditioning[source_key(e.key)], e.key)
            for e in examples[:SAMPLE_PROMPTS_FROM_DATA]
        ]
        if not spec.sampling.prompts:
            prompts = [e.caption for e in examples[:SAMPLE_PROMPTS_FROM_DATA]]
    validator = None
    if held_out:
        validator = build_validator(
            spec.validation,
            held_out_examples(
                held_out, _sizes(spec, held_out), conditioning if spec.controlnet else None
            ),
            components,
            transform=transform,
            decode=decode_rgb,
            read=stores.read,
            batch_size=hp.batch_size,
            rank=acc.process_index,
            world=acc.num_processes,
        )
    tracker = None
    if spec.tracking.backends:
        tracker = ExperimentTracker(
            acc,
            spec,
            run_name=options.job_name,
            store=output_store,
            output_uri=spec.output.uri,
            logging_dir=tracking_dir,
        )
    inputs = LoopInputs(
        spec=spec,
        components=components,
        modules=modules,
        builder=builder,
        sampler=sampler,
        total_steps=total_steps,
        output_store=output_store,
        output_uri=spec.output.uri,
        work_dir=work,
        reporter=reporter,
        metrics=metrics,
        sample_prompts=prompts,
        sample_conditioning=sample_conditioning,
        stop_requested=options.stop_requested,
        validator=validator,
        tracker=tracker,
        clip_scorer=clip_scorer,
    )
    trainer = Trainer(inputs, acc)
    resumed = trainer.resume()
    if acc.is_main_process:
        reporter.started(total_steps, resumed)
    result = trainer.run()
    outputs: list[ExportedFile] = []
    if not result.interrupted and acc.is_main_process:
        from difftrain.train.exporting import export_all

        outputs = export_all(
            spec, components, trainer, output_store, work, _recipe(spec, components.identity)
        )
        reporter.finished(outputs)
    acc.wait_for_everyone()
    reporter.close()
    if tracker is not None:
        tracker.finish()
    acc.end_training()
    return RunOutcome(result.interrupted, result, outputs, report, cache_hit)


class _Stores:
    """One store for s3:// URIs and one for local paths, shared by every dataset of a run.

    The object store is read through local copies in the work folder (one folder for every
    dataset, each copy named by its image URI's hash), so the job downloads each image once.
    """

    def __init__(self, config: StoreConfig | None, work_dir: Path) -> None:
        self.config = config
        self.work_dir = work_dir
        self._open: dict[bool, Store] = {}

    def get(self, uri: str) -> Store:
        from difftrain.data.copies import with_copies

        s3 = is_s3(uri)
        if s3 not in self._open:
            # images read by cleaning are copied into the work folder: read once per job
            self._open[s3] = with_copies(open_store(uri, self.config), self.work_dir)
        return self._open[s3]

    def read(self, pair: Any) -> bytes:
        """A pair's image bytes from the store its name is in (verified by its sha256)."""
        from difftrain.data.image_bytes import read_image

        return read_image(self.get(pair.name), pair)


@dataclass
class _Part:
    """One dataset of the run on its way to examples: cleaned, held out from, then cached."""

    spec: DatasetSpec
    name: str  # "dataset" or "datasets[i]", as messages name it
    store: Store
    cache_root: str
    cleaned: CleaningResult
    policy: CaptionPolicy
    own_captions: dict[str, tuple[str, ...]]
    pairs: list[Any]  # kept, then without the held-out ones
    examples: list[Example] = field(default_factory=list)
    cache_hit: bool | None = None
    key: str = "uncached"


def _part_examples(
    part: _Part,
    spec: DiffusionTrainingJobSpec,
    acc: Any,
    components: Any,
    transform: Any,
    generation: dict[str, Any],
    conditioning: dict[str, bytes],
    work_dir: Path,
) -> None:
    """The part's examples: from the latent cache beside its dataset, or read per batch."""
    from difftrain.train.shared_data import CacheSettings, cached_dataset

    pre = spec.preprocessing
    report = part.cleaned.report
    pairs = part.pairs
    sizes = _sizes(spec, pairs)
    if pre.cache_latents:
        settings = CacheSettings(
            pre=pre,
            seed=spec.hyperparameters.seed,
            root=part.cache_root,
            dtype=torch.float32 if acc.device.type == "cpu" else torch.float16,
            generation_dtype=generation["dtype"],
            # no text embeddings when every caption varies: the loop encodes what it draws
            texts=any(not part.policy.varies(c) for c in part.own_captions.values()),
        )
        cached = cached_dataset(
            acc,
            settings,
            pairs,
            sizes,
            components,
            transform,
            part.store,
            work_dir / "latent-cache",
        )
        samples = cached.samples
        part.cache_hit, part.key = cached.hit, cached.key
        report.augmented = max(0, len(samples) - len(pairs))
        sizes = _sizes_of_cached(spec, samples, sizes, components.vae)
        part.examples = [
            Example(
                key=s.key,
                caption=s.caption,
                size=sizes[i],
                cached=s,
                conditioning=conditioning.get(source_key(s.key)),
                captions=part.own_captions[source_key(s.key)],
                policy=part.policy,
            )
            for i, s in enumerate(samples)
        ]
        return
    if pre.boomerang.enabled:
        sources = len(pairs)
        pairs, sizes = _with_boomerang(
            spec, pairs, sizes, components, transform, generation, part.store
        )
        report.augmented = len(pairs) - sources
    part.examples = [
        Example(
            key=p.key,
            caption=p.caption,
            size=sizes[i],
            data=p.data or None,  # a dataset's pairs hold none: read per batch
            source=p,
            conditioning=conditioning.get(source_key(p.key)),
            captions=part.own_captions[source_key(p.key)],
            policy=part.policy,
        )
        for i, p in enumerate(pairs)
    ]


def _mixed_report(parts: list[_Part], mix: Any) -> CleaningResult:
    """The cleaning of several datasets as one: totals summed, each dataset's part, and the
    example keys prefixed by the dataset's position in spec.datasets."""
    from difftrain.api import DatasetPartReport
    from difftrain.data.cleaning import MAX_EXAMPLES, MAX_KEY_LENGTH, REASONS, CleaningResult

    total = DatasetReport()
    examples: dict[str, list[str]] = {}
    pairs: list[Any] = []
    for number, (part, quota, share) in enumerate(
        zip(parts, mix.quotas, mix.shares(), strict=True)
    ):
        report = part.cleaned.report
        total.total += report.total
        total.kept += report.kept
        total.truncated_captions += report.truncated_captions
        total.augmented += report.augmented
        for reason, count in report.dropped.items():
            total.dropped[reason] = total.dropped.get(reason, 0) + count
        for note, count in report.notes.items():
            total.notes[note] = total.notes.get(note, 0) + count
        for reason, keys in part.cleaned.examples.items():
            shown = examples.setdefault(reason, [])
            room = MAX_EXAMPLES - len(shown)
            shown.extend(f"{number}:{k}"[:MAX_KEY_LENGTH] for k in keys[: max(0, room)])
        total.datasets.append(
            DatasetPartReport(
                uri=part.spec.uri,
                weight=getattr(part.spec, "weight", 1.0),
                total=report.total,
                kept=report.kept,
                dropped=dict(report.dropped),
                examples_per_epoch=quota,
                share=round(share, 6),
            )
        )
        pairs.extend(part.cleaned.pairs)
    total.dropped = {r: total.dropped[r] for r in sorted(total.dropped, key=_reason_order(REASONS))}
    total.examples = examples
    counted = all(p.cleaned.tokens_counted for p in parts)
    return CleaningResult(pairs, total, examples, tokens_counted=counted)


def _reason_order(reasons: dict[str, str]) -> Any:
    order = list(reasons)
    return lambda r: order.index(r) if r in order else len(order)


def _epoch_steps(sampler: Any, epochs: int, accumulation: int) -> int:
    """Optimizer steps in ``epochs`` epochs (a mix of datasets with buckets may have a few
    batches more or fewer in some epochs: each is counted)."""
    from difftrain.data.mixture import MixedBatchSampler

    inner = getattr(sampler, "inner", sampler)
    if not isinstance(inner, MixedBatchSampler):
        return epochs * max(1, len(sampler) // accumulation)
    return sum(max(1, inner.batches_in(e) // accumulation) for e in range(epochs))


def source_key(key: str) -> str:
    """The training image a Boomerang variant (``<key>~boomerang<i>``) was made from."""
    return key.split("~", 1)[0]


def _sizes(spec: DiffusionTrainingJobSpec, pairs: list[Any]) -> list[tuple[int, int]]:
    res = spec.preprocessing.resolution
    if not spec.preprocessing.buckets.enabled:
        return [(res, res)] * len(pairs)
    from difftrain.data.buckets import make_buckets, nearest_bucket

    buckets = make_buckets(spec.preprocessing.buckets, res)
    return [nearest_bucket(p.width, p.height, buckets) for p in pairs]


def _sizes_of_cached(
    spec: DiffusionTrainingJobSpec, samples: list[Any], sizes: list[tuple[int, int]], vae: Any
) -> list[tuple[int, int]]:
    """Sizes of cached samples (Boomerang variants included) from their latents' shapes."""
    if len(samples) == len(sizes):
        return sizes
    res = spec.preprocessing.resolution
    if not spec.preprocessing.buckets.enabled:
        return [(res, res)] * len(samples)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return [
        (s.latent_params.shape[-1] * factor, s.latent_params.shape[-2] * factor) for s in samples
    ]


def _with_boomerang(
    spec: DiffusionTrainingJobSpec,
    pairs: list[Any],
    sizes: list[tuple[int, int]],
    components: Any,
    transform: Any,
    generation: dict[str, Any],
    data_store: Any,
) -> tuple[list[Any], list[tuple[int, int]]]:
    """The pairs followed by their Boomerang variants, and the variants' sizes (their source's)."""
    from difftrain.data.boomerang import boomerang_variants
    from difftrain.data.image_bytes import read_image

    boomerang = spec.preprocessing.boomerang
    variants = boomerang_variants(
        pairs,
        components,
        transform,
        strength=boomerang.strength,
        copies=boomerang.copies,
        seed=spec.hyperparameters.seed,
        sizes=sizes,
        read=partial(read_image, data_store),
        **generation,
    )
    by_key = {p.key: s for p, s in zip(pairs, sizes, strict=True)}
    extra_sizes = [by_key[source_key(v.key)] for v in variants]
    return pairs + variants, sizes + extra_sizes


def _prompts_from(examples: list[Example], spec: DiffusionTrainingJobSpec) -> list[str]:
    seen: list[str] = []
    for ex in examples:
        if ex.caption and ex.caption not in seen and not ex.is_prior:
            seen.append(ex.caption)
        if len(seen) == SAMPLE_PROMPTS_FROM_DATA:
            break
    return seen or ["a photo"]


def _sampler(
    spec: DiffusionTrainingJobSpec,
    examples: list[Example],
    prior_count: int,
    acc: Any,
    mix: Any = None,
) -> Any:
    from difftrain.data.buckets import BucketBatchSampler
    from difftrain.data.mixture import MixedBatchSampler
    from difftrain.train.dreambooth import PriorPairedSampler

    hp = spec.hyperparameters
    instance = examples[: len(examples) - prior_count]
    sizes = [e.size for e in instance]

    # Every image once an epoch: a bucket's last, smaller batch is trained too (see the sampler).
    # With several datasets, the examples each epoch draws by the weights, batched the same way.
    place = {"seed": hp.seed, "num_replicas": acc.num_processes, "rank": acc.process_index}
    sampler: BucketBatchSampler | MixedBatchSampler = (
        MixedBatchSampler(mix, hp.batch_size, **place)
        if mix is not None
        else BucketBatchSampler(sizes, hp.batch_size, **place)
    )
    if acc.is_main_process and spec.preprocessing.buckets.enabled:
        counts = sampler.bucket_counts()
        logger.info(
            "buckets %s (every image once an epoch; a bucket's last batch may be smaller)",
            " ".join(f"{w}x{h}={n}" for (w, h), n in counts.items()),
        )
    if prior_count:
        return PriorPairedSampler(sampler, len(instance), prior_count, seed=hp.seed)
    return sampler


def install_stop_handlers(event: threading.Event) -> None:
    """SIGTERM (pod eviction, preemption) and SIGINT ask the loop to checkpoint and stop."""

    def handle(signum: int, _frame: Any) -> None:
        logger.warning("signal %d: checkpointing and stopping after this step", signum)
        event.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
