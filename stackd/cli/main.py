"""`stackd` entry point: argument parsing, dispatch to verbs, and errors turned into exit codes.

Exit codes (docs/cli.md): 0 success, 1 failure while running, 2 usage error or invalid stack file,
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from stackd import __version__
from stackd.cli import config_verbs, exec_verb, logs_verb, service_verbs, stack_verbs
from stackd.errors import StackdError, leaf_exceptions

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _stack_options() -> argparse.ArgumentParser:
    """-f and -p, accepted before the verb (as in Compose) and after it."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "-f",
        "--file",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="the stack file (default: $STACKD_FILE, else stack.toml here or in a parent directory)",
    )
    options.add_argument(
        "-p",
        "--project-name",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="the project name (default: $STACKD_PROJECT_NAME, else the file's `name`, else its directory)",
    )
    return options


def build_parser() -> argparse.ArgumentParser:
    stack_options = _stack_options()
    parser = argparse.ArgumentParser(
        prog="stackd",
        description="Run multi-service stacks on one Linux host, with no daemon and no registry.",
        parents=[stack_options],
    )
    parser.add_argument("--version", action="version", version=f"stackd {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    stack_verbs.register(verbs, stack_options)
    service_verbs.register(verbs, stack_options)
    logs_verb.register(verbs, stack_options)
    exec_verb.register(verbs, stack_options)
    config_verbs.register(verbs, stack_options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.file = getattr(args, "file", None) or os.environ.get("STACKD_FILE") or None
    args.project_name = getattr(args, "project_name", None) or os.environ.get("STACKD_PROJECT_NAME") or None
    try:
        return int(args.run(args))
    except StackdError as error:
        print(f"stackd: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:  # from the supervisor's task groups: the errors themselves
        errors = leaf_exceptions(group)
        if not all(isinstance(leaf, StackdError | KeyboardInterrupt) for leaf in errors):
            raise
        reported = [leaf for leaf in errors if isinstance(leaf, StackdError)]
        for leaf in reported:
            print(f"stackd: {leaf}", file=sys.stderr)
        return reported[0].exit_code if reported else EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error of ours.
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
