"""The ``difftrain`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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
            try:
                res = api.parse_resource(doc)
            except api.SpecError as exc:
                print(f"{path}: {exc}", file=sys.stderr)
                failures += 1
            else:
                print(f"{path}: {res.kind} {res.metadata.name or '(unnamed)'} is valid")
    return 1 if failures else 0


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``difftrain`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "crds" and args.check and args.out is None:
        args.out = Path("crds")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
