"""``difftrain run``: train a DiffusionTrainingJob in a pod or on this machine."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

DEFAULT_LOCAL_DIR = Path("difftrain-local")


def add_parser(sub: Any) -> None:
    """Register ``run`` on the CLI's subparsers."""
    run = sub.add_parser(
        "run",
        help="train a DiffusionTrainingJob (in a pod, or --local on this machine)",
        description="Train the job in FILE. With --local and no FILE: a small built-in job "
        "(a tiny model on a generated dataset of coloured shapes) that runs on a CPU in a few "
        "minutes and needs no download, cluster or object store.",
    )
    run.add_argument("job", nargs="?", metavar="FILE", help="DiffusionTrainingJob YAML")
    run.add_argument(
        "--local",
        action="store_true",
        help="run on this machine with a progress bar (no status patches)",
    )
    run.add_argument(
        "--family",
        choices=("sd1", "sdxl"),
        default="sd1",
        help="the built-in job's tiny model: SD1-shaped (default) or SDXL-shaped",
    )
    run.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help="train N optimizer steps (replaces hyperparameters.maxSteps and epochs): a quick "
        "try of a job",
    )
    run.add_argument(
        "--work-dir",
        type=Path,
        help=f"scratch and (for the built-in job) data folder; default ./{DEFAULT_LOCAL_DIR}",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (in a pod: DIFFTRAIN_METRICS_PORT)",
    )
    run.add_argument("--processes", type=int, help="training processes on this machine (CPU: gloo)")
    run.add_argument(
        "--termination-log",
        metavar="PATH",
        help="also write a configuration error here; in a pod, /dev/termination-log",
    )
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)


def _load_job(args: argparse.Namespace, work_dir: Path) -> Any:
    from difftrain import api

    if args.job is None:
        if not args.local:
            raise api.SpecError("DiffusionTrainingJob", ["FILE: give a job file, or use --local"])
        from difftrain.train.synthetic import default_local_job, write_local_inputs

        work_dir = write_local_inputs(work_dir.resolve(), family=args.family)
        doc = default_local_job(work_dir, family=args.family)
    else:
        try:
            doc = yaml.safe_load(Path(args.job).read_text(encoding="utf-8"))
        except OSError as exc:
            raise api.SpecError(
                "DiffusionTrainingJob", [f"{args.job}: cannot read: {exc.strerror}"]
            ) from None
        except yaml.YAMLError as exc:
            raise api.SpecError("DiffusionTrainingJob", [f"{args.job}: not YAML: {exc}"]) from None
    doc = doc if isinstance(doc, dict) else {}
    if args.max_steps is not None:
        doc = _with_max_steps(doc, args.max_steps)
    resource = api.parse_resource(doc)
    if not isinstance(resource, api.DiffusionTrainingJob):
        raise api.SpecError(resource.kind, ["kind: difftrain run trains a DiffusionTrainingJob"])
    return resource


def _with_max_steps(doc: dict[str, Any], steps: int) -> dict[str, Any]:
    """The job with ``steps`` optimizer steps, its warm-up shortened to fit."""
    from difftrain import api

    if steps < 1:
        raise api.SpecError("DiffusionTrainingJob", ["--max-steps: give a positive number"])
    spec = dict(doc.get("spec") or {})
    hp = {k: v for k, v in dict(spec.get("hyperparameters") or {}).items() if k != "epochs"}
    hp["maxSteps"] = steps
    warmup = hp.get("warmupSteps")
    if isinstance(warmup, int) and warmup >= steps:
        hp["warmupSteps"] = steps - 1
    spec["hyperparameters"] = hp
    return {**doc, "spec": spec}


def _config_errors() -> tuple[type[Exception], ...]:
    from difftrain import api
    from difftrain.data.images import ImageError
    from difftrain.data.pairs import DatasetError
    from difftrain.models import ModelError
    from difftrain.train.methods import TrainingConfigError

    return (api.SpecError, DatasetError, ImageError, ModelError, TrainingConfigError)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the job; exit 0 when done, 75 when stopped after a checkpoint, 3 for bad input."""
    from difftrain import api
    from difftrain.storage import StorageError
    from difftrain.train.launch import Topology, inside_launcher, launch

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_libraries()
    env = dict(os.environ)
    topology = Topology.from_env(env, args.processes)
    if topology.needs_launcher and not inside_launcher(env):
        return launch(sys.argv[1:], topology)

    work_dir = args.work_dir or (DEFAULT_LOCAL_DIR if args.local or args.job is None else None)
    if work_dir is None:
        import tempfile

        work_dir = Path(tempfile.mkdtemp(prefix="difftrain-run-"))
    handled: tuple[type[Exception], ...] = (*_config_errors(), StorageError)
    try:
        job = _load_job(args, Path(work_dir))
        return _run(args, job, Path(work_dir), env)
    except handled as exc:
        transient = isinstance(exc, StorageError) and not exc.permanent
        message = f"difftrain run: {exc}"
        print(message, file=sys.stderr)
        if args.termination_log:
            with contextlib.suppress(OSError):
                Path(args.termination_log).write_text(message[:4000])
        return 1 if transient else api.EXIT_CONFIG_ERROR


def _quiet_libraries() -> None:
    """No per-file progress bars or optional-dependency notices from the model libraries."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _run(args: argparse.Namespace, job: Any, work_dir: Path, env: dict[str, str]) -> int:
    from difftrain import api
    from difftrain.cli import _store_config
    from difftrain.train.report import ConsoleReporter, Reporters, StatusReporter
    from difftrain.train.run import RunOptions, install_stop_handlers, run_training

    in_cluster = not args.local and "DIFFTRAIN_JOB_NAME" in env
    name = env.get("DIFFTRAIN_JOB_NAME") or job.metadata.name or "local"
    namespace = env.get("DIFFTRAIN_NAMESPACE") or job.metadata.namespace or ""
    port = args.metrics_port
    if port is None and "DIFFTRAIN_METRICS_PORT" in env:
        port = int(env["DIFFTRAIN_METRICS_PORT"])
    rank = int(env.get("RANK", "0"))
    reporter: Any = ConsoleReporter(bar=rank == 0 and not in_cluster)
    if in_cluster and rank == 0:
        reporter = Reporters(ConsoleReporter(bar=False), StatusReporter(name, namespace))
    stop = threading.Event()
    install_stop_handlers(stop)
    options = RunOptions(
        work_dir=work_dir / "scratch",
        store_config=_store_config(job.spec.storage),  # type: ignore[arg-type]
        metrics_port=port,
        job_name=name,
        namespace=namespace,
        reporter=reporter,
        stop_requested=stop,
    )
    outcome = run_training(job, options)
    if outcome.interrupted:
        logging.getLogger(__name__).warning(
            "stopped on request after checkpoint %s", outcome.loop.latest_checkpoint
        )
        return api.EXIT_INTERRUPTED
    if rank == 0:
        print(f"trained {outcome.loop.state.step} steps; outputs:")
        for out in outcome.outputs:
            print(f"  {out.format:12} {out.uri}  sha256={out.sha256}")
        if outcome.loop.samples:
            print(f"  samples      {outcome.loop.samples[0]}")
        if (clip := outcome.loop.clip_score) is not None:
            print(f"  clip score   {clip.score:.2f} (step {clip.step}, {clip.images} samples)")
        if outcome.loop.latest_checkpoint:
            print(f"  checkpoint   {outcome.loop.latest_checkpoint}")
    return 0
