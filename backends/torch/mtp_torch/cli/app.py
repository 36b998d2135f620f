"""The ``mtp`` command line: ``mtp generate``, ``mtp convert``, ``mtp bench``.

Each subcommand lives in a module ``mtp_torch.cli.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``.  The names are listed in ``SUBCOMMANDS``: a
new subcommand is its module plus its name added there (the parser is built from that list,
skipping a listed module that is not installed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS = ("generate", "convert", "bench")


def _available_subcommands() -> list[str]:
    return [
        name
        for name in SUBCOMMANDS
        if importlib.util.find_spec(f"mtp_torch.cli.{name}") is not None
    ]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every installed subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="mtp",
        description="Multi-token prediction via self-distillation (arXiv 2602.06019).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback when a command fails"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name in _available_subcommands():
        module = importlib.import_module(f"mtp_torch.cli.{name}")
        summary = (module.__doc__ or name).strip().splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mtp`` command line.

    Args:
      argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
      The process exit status: 0 on success, 2 when the command fails (one line
      ``mtp <command>: error: ...`` on stderr; ``--debug`` raises instead, with the traceback).
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        status: int = args._run(args)
    except BrokenPipeError:  # the reader went away (| head): say so once, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"mtp {args.command}: error: the output pipe was closed", file=sys.stderr)
        return 2
    except Exception as error:  # every failure is one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"mtp {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 2
    return status


def _describe(error: BaseException) -> str:
    """One line for the user: our own errors as they are, others with their type and a hint."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, TypeError, FileNotFoundError, FileExistsError)):
        return message
    return f"{type(error).__name__}: {message} (rerun with --debug for the traceback)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
