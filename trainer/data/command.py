"""``difftrain dataset check``: read and clean a dataset, print the report.

The argument parser lives in :mod:`difftrain.cli` (this module imports the dataset pipeline, and
with it torch, which the operator's image does not have).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from difftrain.api import EXIT_CONFIG_ERROR


def open_store_from_args(uri: str, args: argparse.Namespace) -> Any:
    """The store holding ``uri``, configured from the flags and the environment's keys."""
    from difftrain.api import StorageSpec
    from difftrain.cli import _store_config
    from difftrain.storage import StorageError, is_s3, open_store

    if not is_s3(uri):
        return open_store(uri, None)
    if not args.endpoint:
        raise StorageError(
            f"{uri} is in an object store: give its address with --endpoint HOST:PORT"
        )
    storage = StorageSpec(endpoint=args.endpoint, secure=not args.insecure, region=args.region)
    return open_store(uri, _store_config(storage))  # type: ignore[arg-type]


def _dataset_spec(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from difftrain.api import DatasetSpec, SpecError
    from difftrain.api.base import format_validation_error

    cleaning = {
        "minResolution": args.min_resolution,
        "maxAspectRatio": args.max_aspect_ratio,
        "nearDuplicateDistance": args.near_duplicate_distance,
        "minCaptionWords": args.min_caption_words,
        "bannedWords": args.banned_word,
        "dropExactDuplicates": False if args.keep_exact_duplicates else None,
    }
    captions = {
        "lines": args.caption_lines,
        "shuffleTags": True if args.shuffle_tags else None,
        "keepTokens": args.keep_tokens,
        "tagDropout": args.tag_dropout,
        "separator": args.tag_separator,
    }
    doc = {
        "uri": args.uri,
        "format": args.format,
        "captionColumn": args.caption_column,
        "captionTemplate": args.caption_template,
        "limit": args.limit,
        "repeats": args.repeats,
        "cleaning": {k: v for k, v in cleaning.items() if v is not None},
        "captions": {k: v for k, v in captions.items() if v is not None},
    }
    try:
        return DatasetSpec.model_validate({k: v for k, v in doc.items() if v is not None})
    except ValidationError as exc:
        raise SpecError("dataset", format_validation_error(exc)) from None


def cmd_check(args: argparse.Namespace) -> int:
    """Read, clean and report; exit 3 when the dataset or the store cannot be read as given."""
    from tqdm import tqdm

    from difftrain.api import SpecError
    from difftrain.data.captions import format_captions
    from difftrain.data.cleaning import format_report, load_dataset, write_report
    from difftrain.data.sources import DatasetError
    from difftrain.storage import StorageError

    bar = tqdm(desc="dataset check", unit="pair", file=sys.stderr, disable=None)

    def progress(seen: int) -> None:
        bar.update(seen - bar.n)

    try:
        spec = _dataset_spec(args)
        store = open_store_from_args(spec.uri, args)
        result = load_dataset(
            spec,
            store,
            workers=args.workers,
            progress=progress,
        )
        report_uri = None
        if args.report_to:
            report_store = open_store_from_args(args.report_to, args)
            report_uri = write_report(report_store, args.report_to, result)
    except SpecError as exc:
        bar.close()
        print(f"dataset check: {'; '.join(exc.errors)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except DatasetError as exc:
        bar.close()
        print(f"dataset check: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except StorageError as exc:
        bar.close()
        message = str(exc)
        if "access refused" in message:
            message += " (here: DIFFTRAIN_STORE_ACCESS_KEY and DIFFTRAIN_STORE_SECRET_KEY)"
        print(f"dataset check: {message}", file=sys.stderr)
        return EXIT_CONFIG_ERROR if exc.permanent else 1
    bar.close()
    if args.json:
        print(json.dumps(result.report.to_wire(), indent=1))
    else:
        print(f"dataset {spec.uri}")
        print(format_report(result))
        print(format_captions(result.pairs, spec))
        if report_uri:
            print(f"report committed to {report_uri}")
    return 0
