"""`stackd config` and `stackd schema`: validate and print the resolved stack, print the JSON Schema."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import tomli_w

from stackd.spec import find_stack_file, load_stack, stack_to_dict
from stackd.spec.graph import with_dependencies
from stackd.spec.schema import stack_schema


def register(verbs: Any, stack_options: argparse.ArgumentParser) -> None:
    config = verbs.add_parser(
        "config",
        parents=[stack_options],
        help="validate the stack file and print it resolved",
        description="Validate the stack file and print it with defaults filled in and variables interpolated. "
        "The output is itself a valid stack file. Exit code 2 when the file is invalid.",
    )
    config.add_argument("--format", choices=("toml", "json"), default="toml", help="output format (default: toml)")
    config.add_argument("--services", action="store_true", help="print only the service names, one per line")
    config.add_argument("-q", "--quiet", action="store_true", help="only validate; print nothing")
    config.add_argument(
        "service", nargs="*", metavar="SERVICE", help="print only these services and their dependencies"
    )
    config.set_defaults(run=run_config)

    schema = verbs.add_parser(
        "schema",
        help="print the JSON Schema of the stack file",
        description="Print the JSON Schema (draft 2020-12) of the stack file, for editors and CI.",
    )
    schema.set_defaults(run=run_schema)


def stack_file(args: argparse.Namespace) -> Path:
    """The stack file the user means: -f, $STACKD_FILE, else stack.toml here or above."""
    return Path(args.file) if args.file else find_stack_file()


def run_config(args: argparse.Namespace) -> int:
    stack = load_stack(stack_file(args), project=args.project_name)
    for warning in stack.warnings:
        print(f"stackd: warning: {warning}", file=sys.stderr)
    unknown = [name for name in args.service if name not in stack.services]
    if unknown:
        print(
            f"stackd: no such service: {', '.join(unknown)} (services: {', '.join(stack.services)})",
            file=sys.stderr,
        )
        return 2
    if args.quiet:
        return 0
    if args.services:
        names = with_dependencies(stack, args.service) if args.service else list(stack.services)
        print("\n".join(names))
        return 0
    # Like Compose, the services named come with everything they depend on, so the output stays valid.
    selected = with_dependencies(stack, args.service) if args.service else None
    document = stack_to_dict(stack, selected)
    if args.format == "json":
        print(json.dumps(document, indent=2))
    else:
        sys.stdout.write(tomli_w.dumps(document))
    return 0


def run_schema(args: argparse.Namespace) -> int:
    print(json.dumps(stack_schema(), indent=2))
    return 0
