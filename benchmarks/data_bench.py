"""Data pipeline benchmark: images/s decoded, cleaned and transformed, from MinIO on loopback.

Synthetic 768x640 JPEGs (a smooth random field plus grain, so they compress like photographs:
about 150 KB at quality 90) are written to a local folder and uploaded to a MinIO server started
from the test infrastructure's pinned binary. Then, in the same run, on the same cores:

- ``naive``: the serial PIL loop of a typical training script, from the local disk: open, convert
  to RGB, resize the short side to the resolution, center crop, random flip, ``np.array`` ->
  tensor, normalise. No cleaning at all. (PERFORMANCE.md's anchor: about 50 images/s per core.)
- ``difftrain``: the pipeline a training job runs, from MinIO: list, parallel GETs, cleaning
  (sha256, full decode at reduced scale, pHash, every drop check) with each image copied into the
  job's work folder as it is read (:mod:`difftrain.data.copies`), then one epoch of the training
  loop's batches, built as ``difftrain run`` builds them (its ``BatchBuilder`` with the run's
  decode and reads, the bucket sampler, the prefetch thread of a GPU run, unpinned): for each
  kept pair its local copy read, decoded and transformed (antialiased resize of the crop box,
  random flip) on the builder's threads, into uint8 batches (the [-1, 1] float pass is the
  training step's, on the device; the naive loop does it per image on the CPU).
- ``difftrain_local``: the same pipeline from the local folder (to separate the store's share).
- ``difftrain_rerun`` and ``difftrain_local_rerun``: the same, run again with the cleaning facts
  kept by an earlier run (what a job with the latent cache does on data it has cleaned before,
  e.g. at another resolution): every check still runs, on the kept facts, and no image or caption
  is read for cleaning; the images are then read, decoded and transformed as above.

Each mode runs ``--repeat`` times, interleaved; the best time is reported, and each round's
images/s and ratio to that round's naive loop. The process is pinned to ``--cores`` CPUs (MinIO is
not, as a store on another host would not be). MinIO is taken from ``$DIFFTRAIN_TESTENV_BIN`` when
it is there (no other test binary is needed), else the test infrastructure builds its binaries.

    python benchmarks/data_bench.py                 # 400 images, 2 cores
    python benchmarks/data_bench.py --count 60      # smoke test
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from difftrain.api import DatasetSpec
    from difftrain.data import ImageTransform
    from difftrain.storage import Store

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_images(folder: Path, count: int, size: tuple[int, int]) -> int:
    """``count`` JPEG + caption pairs in ``folder``; returns the total JPEG bytes."""
    import numpy as np
    from PIL import Image

    from tests.datasets import encode, synthetic_image

    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        path = folder / f"img{i:05d}.jpg"
        if not path.exists():
            base = np.asarray(synthetic_image(i, size), dtype=np.float32)
            grain = np.random.default_rng(i).normal(0, 10, base.shape)
            pixels = np.clip(base + grain, 0, 255).astype(np.uint8)
            path.write_bytes(encode(Image.fromarray(pixels), "JPEG", quality=90))
            (folder / f"img{i:05d}.txt").write_text(f"a synthetic photograph number {i}")
        total += path.stat().st_size
    return total


class Run(NamedTuple):
    images: int
    seconds: float
    clean_seconds: float  # of which reading and cleaning (0: not done)
    cpu_seconds: float  # CPU time of this process, all threads (MinIO's is not included)


def naive(folder: Path, resolution: int) -> Run:
    """The serial PIL loop of a typical training script (torchvision's ToTensor and Normalize
    spelled out)."""
    import numpy as np
    import torch
    from PIL import Image

    rng = random.Random(0)
    start, cpu = time.perf_counter(), time.process_time()
    count = 0
    checksum = 0.0
    for path in sorted(folder.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        scale = resolution / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        left = (image.width - resolution) // 2
        top = (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        tensor = tensor.float().div(255)
        tensor = (tensor - 0.5) / 0.5
        checksum += float(tensor[0, 0, 0])
        count += 1
    return Run(count, time.perf_counter() - start, 0.0, time.process_time() - cpu)


def pipeline(
    uri: str,
    store: Store,
    resolution: int,
    workers: int,
    batch_size: int,
    facts_root: str | None = None,
) -> Run:
    """Sources + cleaning + one epoch of batches; with ``facts_root``, cleaning uses (and keeps)
    the cleaning facts there, as a job with the latent cache does."""
    from difftrain.api import DatasetSpec, PreprocessingSpec
    from difftrain.data import ImageTransform
    from difftrain.data.copies import with_copies

    spec = DatasetSpec.model_validate({"uri": uri})
    transform = ImageTransform(
        PreprocessingSpec.model_validate({"resolution": resolution, "flipProbability": 0.5})
    )
    with tempfile.TemporaryDirectory(prefix="difftrain-bench-job-") as job_dir:
        # a job's work folder: a store's images are copied there as cleaning reads them
        store = with_copies(store, Path(job_dir))
        return _timed(spec, store, transform, workers, batch_size, facts_root)


def _timed(
    spec: DatasetSpec,
    store: Store,
    transform: ImageTransform,
    workers: int,
    batch_size: int,
    facts_root: str | None,
) -> Run:
    """What ``difftrain run`` does without the latent cache: clean, then the training loop's
    batches (its BatchBuilder, sampler and prefetch thread, as on a GPU without pinning)."""
    from difftrain.data.buckets import BucketBatchSampler
    from difftrain.data.image_bytes import read_image
    from difftrain.data.images import decode_rgb
    from difftrain.train.batches import (
        BatchBuilder,
        Example,
        Prefetcher,
        epoch_batches,
        image_workers,
    )
    from difftrain.train.shared_data import clean_dataset

    start, cpu = time.perf_counter(), time.process_time()
    result = clean_dataset(spec, store, facts_root=facts_root, workers=workers)
    cleaned = time.perf_counter()
    size = (transform.pre.resolution, transform.pre.resolution)
    # as run.py makes them: no bytes kept, each image read again (a local copy) per batch
    examples = [Example(key=p.key, caption=p.caption, size=size, source=p) for p in result.pairs]
    builder = BatchBuilder(
        examples,
        seed=0,
        transform=transform,
        decode=decode_rgb,
        flip_probability=transform.pre.flip_probability,
        caption_dropout=0.0,
        scaling_factor=0.18215,
        read=partial(read_image, store),
        workers=image_workers(),
    )
    sampler = BucketBatchSampler([e.size for e in examples], batch_size, seed=0)
    count = len(sampler)
    batches = Prefetcher(((0, i, b) for i, b in enumerate(epoch_batches(sampler, 0))), builder)
    images = 0
    try:
        for _ in range(count):
            _, _, batch = batches.next()
            assert batch.pixels is not None
            images += len(batch.pixels)
    finally:
        batches.close()
        builder.close()
    end = time.perf_counter()
    assert images == result.report.kept == result.report.total, result.report
    return Run(images, end - start, cleaned - start, time.process_time() - cpu)


def minio_dir() -> Path:
    """The folder with the pinned MinIO binary: ``$DIFFTRAIN_TESTENV_BIN`` when it holds one (the
    rest of the test binaries are not needed here), else the test infrastructure's build."""
    from tests.infra.environment import binary_dir

    ready = os.environ.get("DIFFTRAIN_TESTENV_BIN")
    if ready and (Path(ready) / "minio").exists():
        return Path(ready)
    return binary_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--size", default="768x640", help="source image WIDTHxHEIGHT")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--cores", type=int, default=2, help="CPUs this process may use")
    parser.add_argument("--workers", type=int, default=2, help="cleaning's decode threads")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)
    import PIL
    import torch
    from minio import Minio

    from difftrain.storage import Credentials, LocalStore, S3Store, StoreConfig
    from difftrain.train.batches import image_workers
    from tests.datasets import S3Location, put_files
    from tests.infra.environment import MinioServer

    torch.set_num_threads(1)  # the parallelism is ours (threads); no nested intra-op threads
    width, height = (int(v) for v in args.size.split("x"))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="difftrain-data-bench-"))
    folder = work / "images"
    t0 = time.perf_counter()
    total_bytes = make_images(folder, args.count, (width, height))
    print(
        f"dataset: {args.count} JPEGs {width}x{height}, {total_bytes / args.count / 1e3:.0f} KB "
        f"each on average (made in {time.perf_counter() - t0:.1f}s)"
    )

    shutil.rmtree(work / "minio", ignore_errors=True)
    minio = MinioServer(minio_dir(), work / "minio")
    minio.start()
    try:
        mc = Minio(minio.endpoint, minio.access_key, minio.secret_key, secure=False)
        mc.make_bucket("bench")
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        put_files(S3Location(mc, "bench", "images"), files)
        s3 = S3Store(
            StoreConfig(
                endpoint=minio.endpoint,
                credentials=Credentials(minio.access_key, minio.secret_key),
                secure=False,
            )
        )
        local = LocalStore()
        s3_facts, local_facts = "s3://bench/facts", str(work / "facts")
        # the earlier run whose cleaning facts the rerun modes use (not timed)
        job = partial(pipeline, resolution=args.resolution, workers=args.workers,
                      batch_size=args.batch_size)  # fmt: skip
        job("s3://bench/images", s3, facts_root=s3_facts)
        job(str(folder), local, facts_root=local_facts)
        modes: dict[str, Callable[[], Run]] = {
            "naive": lambda: naive(folder, args.resolution),
            "difftrain": lambda: job("s3://bench/images", s3),
            "difftrain_local": lambda: job(str(folder), local),
            "difftrain_rerun": lambda: job("s3://bench/images", s3, facts_root=s3_facts),
            "difftrain_local_rerun": lambda: job(str(folder), local, facts_root=local_facts),
        }
        runs: dict[str, list[Run]] = {mode: [] for mode in modes}
        for _ in range(args.repeat):
            for mode, timed in modes.items():
                runs[mode].append(timed())
    finally:
        minio.stop()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    best = {mode: min(r, key=lambda x: x.seconds) for mode, r in runs.items()}
    base = best["naive"].images / best["naive"].seconds
    print(
        f"\ncores: {len(cores)} of {os.cpu_count()}; cleaning workers: {args.workers}; batch "
        f"threads: {image_workers()}; batch size {args.batch_size}; resolution "
        f"{args.resolution}; Pillow {PIL.__version__}, torch {torch.__version__}; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    header = ("mode", "images", "seconds", "images/s", "x naive", "clean s", "CPU ms/img")
    print("{:<22} {:>6} {:>8} {:>9} {:>8} {:>8} {:>11}".format(*header))
    for mode, run in best.items():
        rate = run.images / run.seconds
        clean_s = f"{run.clean_seconds:8.2f}" if run.clean_seconds else f"{'-':>8}"
        print(
            f"{mode:<22} {run.images:6d} {run.seconds:8.2f} {rate:9.1f} {rate / base:8.2f} "
            f"{clean_s} {run.cpu_seconds / run.images * 1000:11.2f}"
        )
    # each round against that round's naive loop: the load of a shared machine changes by round
    print("\nper round: images/s (x that round's naive)")
    for mode, rounds in runs.items():
        cells = [
            f"{r.images / r.seconds:7.1f} ({r.images / r.seconds / (n.images / n.seconds):4.2f})"
            for r, n in zip(rounds, runs["naive"], strict=True)
        ]
        print(f"{mode:<22} " + "  ".join(cells))


if __name__ == "__main__":
    main()
