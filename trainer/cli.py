"""The ``difftrain`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from difftrain import __version__


def _cmd_crds(args: argparse.Namespace) -> int:
    from difftrain import crd

    if args.check:
        stale = [
            name
            for name, obj in crd.all_crds().items()
            if not (args.out / name).is_file()
            or (args.out / name).read_text(encoding="utf-8") != crd.render(obj)
        ]
        if stale:
            print(
                f"stale CRDs in {args.out}: {', '.join(stale)}; "
                f"run `difftrain crds --out {args.out}`",
                file=sys.stderr,
            )
            return 1
        print(f"CRDs in {args.out} match difftrain.api")
        return 0
    if args.out is None:
        for obj in crd.all_crds().values():
            sys.stdout.write("---\n" + crd.render(obj))
        return 0
    for path in crd.write_crds(args.out):
        print(f"wrote {path}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from difftrain import api

    failures = 0
    for path in args.files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
            failures += 1
            continue
        except yaml.YAMLError as exc:
            print(f"{path}: not valid YAML: {exc}", file=sys.stderr)
            failures += 1
            continue
        for doc in docs:
            group = str(doc.get("apiVersion", "")).split("/", 1)[0] if isinstance(doc, dict) else ""
            if isinstance(doc, dict) and group and group != api.GROUP:
                # a folder a team syncs holds Secrets, queues...: those are the API server's
                kind = doc.get("kind", "?")
                name = (doc.get("metadata") or {}).get("name", "(unnamed)")
                print(f"{path}: {kind} {name} skipped (not a {api.GROUP} resource)")
                continue
            try:
                res = api.parse_resource(doc)
            except api.SpecError as exc:
                print(f"{path}: {exc}", file=sys.stderr)
                failures += 1
            else:
                print(f"{path}: {res.kind} {res.metadata.name or '(unnamed)'} is valid")
    return 1 if failures else 0


def _store_config(storage: object | None) -> object | None:
    """StoreConfig from a spec's storage block, with the keys from the environment.

    In a pod the operator puts the Secret's keys into DIFFTRAIN_STORE_ACCESS_KEY and
    DIFFTRAIN_STORE_SECRET_KEY (secretKeyRef); AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY also work.
    """
    import os

    from difftrain.api import StorageSpec
    from difftrain.storage import Credentials, StoreConfig

    if not isinstance(storage, StorageSpec):
        return None
    access = os.environ.get("DIFFTRAIN_STORE_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("DIFFTRAIN_STORE_SECRET_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY")
    creds = Credentials(access, secret) if access and secret else None
    return StoreConfig(
        endpoint=storage.endpoint, credentials=creds, secure=storage.secure, region=storage.region
    )


def _merge_spec_from_args(args: argparse.Namespace) -> object:
    from difftrain import api

    first = args.inputs[0]
    if first.endswith((".yaml", ".yml", ".json")) and len(args.inputs) == 1:
        try:
            doc = yaml.safe_load(Path(first).read_text(encoding="utf-8"))
        except OSError as exc:
            raise api.SpecError("ModelMerge", [f"{first}: cannot read: {exc.strerror}"]) from None
        if isinstance(doc, dict) and doc.get("kind") == "ModelMerge":
            resource = api.parse_resource(doc)
            assert isinstance(resource, api.ModelMerge)
            return resource.spec
        return api.parse_spec("ModelMerge", doc if isinstance(doc, dict) else {})
    if not args.output:
        raise api.SpecError("ModelMerge", ["--output: where to write the merged model"])
    spec: dict[str, object] = {
        "models": [{"uri": u} for u in args.inputs],
        "method": args.method,
        "alpha": args.alpha,
        "output": {"uri": args.output},
        "outputDtype": args.dtype,
    }
    if args.weights:
        spec["models"] = [
            {"uri": u, "weight": w} for u, w in zip(args.inputs, args.weights, strict=False)
        ]
    for flag, key in (
        ("base", "base"),
        ("density", "density"),
        ("drop_rate", "dropRate"),
        ("seed", "seed"),
        ("block_weights", "blockWeights"),
        ("lora_mode", "loraMergeMode"),
        ("lora_rank", "loraRank"),
    ):
        value = getattr(args, flag)
        if value is not None:
            spec[key] = {"uri": value} if key == "base" else value
    return api.parse_spec("ModelMerge", spec)


def _cmd_merge(args: argparse.Namespace) -> int:
    from difftrain import api

    def report(message: str) -> None:
        if args.termination_log:
            Path(args.termination_log).write_text(message[:4000], encoding="utf-8")

    try:
        spec = _merge_spec_from_args(args)
    except api.SpecError as exc:
        print(exc, file=sys.stderr)
        report(str(exc))
        return api.EXIT_CONFIG_ERROR
    assert isinstance(spec, api.ModelMergeSpec)
    from tqdm import tqdm

    from difftrain.merge.engine import MergeError, merge
    from difftrain.merge.lora import LoraError
    from difftrain.merge.tensorio import SafetensorsError
    from difftrain.storage import StorageError, StoreConfig

    config = _store_config(spec.storage)
    assert config is None or isinstance(config, StoreConfig)
    bar = tqdm(total=0, unit="tensor", desc=f"merge ({spec.method})", disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = merge(spec, config, progress=progress)
    except (MergeError, LoraError, SafetensorsError) as exc:
        bar.close()
        print(f"merge refused: {exc}", file=sys.stderr)
        report(f"merge refused: {exc}")
        return api.EXIT_CONFIG_ERROR
    except StorageError as exc:
        bar.close()
        verdict = "merge refused" if exc.permanent else "merge failed"
        print(f"{verdict}: {exc}", file=sys.stderr)
        report(f"{verdict}: {exc}")
        return api.EXIT_CONFIG_ERROR if exc.permanent else 1
    bar.close()
    summary = {
        "outputUri": result.output_uri,
        "sha256": result.sha256,
        "shortHash": result.short_hash,
        "sizeBytes": result.size_bytes,
        "tensors": result.tensors,
        "durationSeconds": result.duration_seconds,
    }
    print(json.dumps(summary, indent=1))
    report(json.dumps(summary))
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    import asyncio

    import kopf
    from kubernetes import config

    from difftrain_operator import handlers

    try:  # fail fast and clearly when there is no cluster to talk to
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            print(
                f"difftrain operator: no cluster credentials: not in a pod, and no usable "
                f"kubeconfig ({exc}); set KUBECONFIG or run it in the cluster",
                file=sys.stderr,
            )
            return 2

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    assert handlers.reconcile_training_job  # importing the module registers the handlers
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    settings = kopf.OperatorSettings()
    # without peering objects (a single replica), run at once instead of waiting for them
    settings.peering.standalone = args.standalone
    settings.peering.mandatory = not args.standalone
    settings.peering.name = args.peering
    settings.peering.priority = args.priority
    settings.peering.clusterwide = not args.namespace
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace or (),
            liveness_endpoint=args.liveness,
            settings=settings,
        )
    )
    return 0


def _add_dataset_parser(sub: Any) -> Any:
    """Add ``dataset`` and its ``check`` sub-command; return the sub-command parsers (``cache``
    and other dataset tools are added to it)."""
    dataset = sub.add_parser(
        "dataset",
        help="dataset tools: check (clean and report what is dropped), cache (encode ahead)",
        description="Work on an image–caption dataset in the object store or a local folder.",
    )
    commands = dataset.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="read and clean a dataset; print total, kept and dropped by reason",
        description="Read every pair of the dataset, clean it with the given settings and print "
        "the report: pairs found, kept, and dropped by reason with the first keys of each. "
        "s3:// URIs take --endpoint; the keys come from DIFFTRAIN_STORE_ACCESS_KEY and "
        "DIFFTRAIN_STORE_SECRET_KEY (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).",
    )
    check.add_argument("uri", metavar="URI", help="s3://bucket/prefix or a local folder")
    _add_dataset_flags(check)
    check.add_argument("--report-to", metavar="PREFIX", help="also commit the report JSON here")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_store_flags(check)
    check.set_defaults(func=_cmd_dataset_check)
    _add_dataset_cache_parser(commands)
    return commands


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """How a dataset is read and cleaned (as the job's dataset block)."""
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", "folder", "jsonl", "webdataset", "classes"],
        help="dataset layout (default: detected)",
    )
    parser.add_argument("--caption-column", help="metadata.jsonl caption column (default text)")
    parser.add_argument("--caption-template", help="class folders: e.g. 'a photo of a {class}'")
    parser.add_argument("--min-resolution", type=int, help="shorter side in pixels (default 256)")
    parser.add_argument("--max-aspect-ratio", type=float, help="long/short side (default 3)")
    parser.add_argument(
        "--near-duplicate-distance", type=int, help="pHash bits; 0 turns it off (default 4)"
    )
    parser.add_argument(
        "--keep-exact-duplicates", action="store_true", help="do not drop identical files"
    )
    parser.add_argument("--min-caption-words", type=int, help="default 1; 0 keeps empty captions")
    parser.add_argument(
        "--banned-word", action="append", metavar="WORD", help="drop captions with it (repeatable)"
    )
    parser.add_argument("--limit", type=int, help="stop once this many pairs are kept")
    parser.add_argument(
        "--caption-lines",
        choices=["alternatives", "first", "joined"],
        help="a caption's lines: each a caption of its own (default), the first only, or one",
    )
    parser.add_argument("--shuffle-tags", action="store_true", help="shuffle tags every epoch")
    parser.add_argument("--keep-tokens", type=int, help="leading tags never shuffled or dropped")
    parser.add_argument("--tag-dropout", type=float, help="probability each tag is left out")
    parser.add_argument("--tag-separator", help="what separates tags (default ',')")
    parser.add_argument("--repeats", type=int, help="times each image is seen per epoch")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads (default 4)")


def _add_dataset_cache_parser(commands: Any) -> None:
    cache = commands.add_parser(
        "cache",
        help="encode a dataset into the latent cache ahead of training (or find it there)",
        description="Clean the dataset as a training job would, load the base model, and encode "
        "the images (VAE latents) and captions (text embeddings) into the cache beside the "
        "dataset (URI/.difftrain-cache/KEY), which jobs with the same data, preprocessing and "
        "model reuse. Prints the key, hit or miss, the sample count and the size.",
    )
    cache.add_argument("uri", metavar="URI", nargs="?", help="s3://bucket/prefix or a local folder")
    cache.add_argument(
        "--job",
        metavar="JOB_YAML",
        help="instead of URI: a DiffusionTrainingJob file; each of its datasets (dataset, or "
        "every entry of datasets) is cached with the job's preprocessing, seed and base model "
        "(the flags for the dataset and preprocessing are then not read)",
    )
    cache.add_argument(
        "--model",
        metavar="MODEL_URI",
        help="base model: diffusers folder or .safetensors file (path or s3://); needed with "
        "URI, with --job the job's baseModel.uri by default",
    )
    cache.add_argument("--resolution", type=int, help="training resolution (default 512)")
    cache.add_argument("--crop", choices=["center", "random"], help="default center")
    cache.add_argument(
        "--flip-probability", type=float, help="> 0 also caches the mirrored images (default 0)"
    )
    cache.add_argument("--max-rotation-degrees", type=float, help="default 0")
    cache.add_argument("--buckets", action="store_true", help="aspect-ratio buckets")
    cache.add_argument("--boomerang-copies", type=int, help="add Boomerang variants per image")
    cache.add_argument("--boomerang-strength", type=float, help="Boomerang strength (default 0.2)")
    cache.add_argument("--seed", type=int, default=42, help="crops, rotations, Boomerang (42)")
    cache.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
    cache.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if any)")
    cache.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp16", "bf16", "fp32"],
        help="stored precision (default: fp16 on a GPU, fp32 on the CPU, as training)",
    )
    cache.add_argument("--cache-root", metavar="URI", help="default URI/.difftrain-cache")
    cache.add_argument("--json", action="store_true", help="print the outcome as JSON")
    _add_dataset_flags(cache)
    _add_store_flags(cache)
    cache.set_defaults(func=_cmd_dataset_cache)


def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    """--endpoint, --insecure and --region, for commands that take s3:// URIs."""
    parser.add_argument("--endpoint", help="object store host:port, for s3:// URIs")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP instead of TLS")
    parser.add_argument("--region", help="region, if the store needs one")


def _cmd_dataset_check(args: argparse.Namespace) -> int:
    from difftrain.data.command import cmd_check

    return cmd_check(args)


def _cmd_dataset_cache(args: argparse.Namespace) -> int:
    from difftrain.data.cache_command import cmd_cache

    return cmd_cache(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="difftrain",
        description="Fine-tune and merge Stable-Diffusion-style models, on Kubernetes or locally.",
    )
    parser.add_argument("--version", action="version", version=f"difftrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    crds = sub.add_parser("crds", help="write the CustomResourceDefinitions generated from the API")
    crds.add_argument("--out", type=Path, help="folder to write into (default: print to stdout)")
    crds.add_argument("--check", action="store_true", help="fail if the folder's CRDs are stale")
    crds.set_defaults(func=_cmd_crds)

    validate = sub.add_parser(
        "validate", help="check DiffusionTrainingJob / ModelMerge YAML files against the API"
    )
    validate.add_argument("files", type=Path, nargs="+", metavar="FILE")
    validate.set_defaults(func=_cmd_validate)

    merge = sub.add_parser(
        "merge",
        help="merge checkpoints or LoRAs (a ModelMerge YAML file, or inputs and flags)",
        description="Streaming merge with bounded memory; incompatible inputs are refused "
        "before anything is written. Give a ModelMerge YAML file, or the input files and flags.",
    )
    merge.add_argument("inputs", nargs="+", metavar="INPUT", help="ModelMerge YAML, or models")
    merge.add_argument("-o", "--output", help="output .safetensors (path or s3://bucket/key)")
    merge.add_argument(
        "--method", default="weighted_sum", help="merge method (default weighted_sum)"
    )
    merge.add_argument("--alpha", type=float, default=0.5, help="ratio toward the second model")
    merge.add_argument("--weights", type=float, nargs="+", help="one weight per model")
    merge.add_argument("--base", help="base model for add_difference, ties and dare")
    merge.add_argument("--density", type=float, help="ties: fraction kept")
    merge.add_argument("--drop-rate", type=float, help="dare: fraction dropped")
    merge.add_argument("--seed", type=int, help="dare: seed of the drop mask")
    merge.add_argument("--block-weights", type=float, nargs="+", help="block_weighted ratios")
    merge.add_argument("--lora-mode", choices=["sum", "concat", "svd"], help="lora_merge mode")
    merge.add_argument("--lora-rank", type=int, help="lora_merge svd: output rank")
    merge.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    merge.add_argument(
        "--termination-log",
        metavar="PATH",
        help="also write the result (JSON) or the error here; in a pod, /dev/termination-log",
    )
    merge.set_defaults(func=_cmd_merge)

    operator = sub.add_parser(
        "operator", help="run the Kubernetes operator (in a cluster or against a kubeconfig)"
    )
    operator.add_argument(
        "--namespace", action="append", help="watch this namespace (repeatable); default: all"
    )
    operator.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    operator.add_argument("--priority", type=int, default=0, help="peering priority")
    operator.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port"
    )
    operator.add_argument("--peering", default="difftrain", help="peering object name")
    operator.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    operator.add_argument("-v", "--verbose", action="store_true")
    operator.set_defaults(func=_cmd_operator)

    # returns the `dataset` sub-command parsers: `check`, and room for `cache` and others
    _add_dataset_parser(sub)

    from difftrain.train.command import add_parser as add_run_parser

    add_run_parser(sub)
    return parser


# bitsandbytes (the 8-bit optimizers) tries, on import, to fetch a CPU kernel from a model hub and
# warns when it cannot; the trainer never uses that kernel, so the warning is noise in every log.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``difftrain`` console script."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    if args.command == "crds" and args.check and args.out is None:
        args.out = Path("crds")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
