"""The ``mtp`` command line: ``mtp generate``, ``mtp convert``, ``mtp bench``.

Each subcommand lives in a module ``mtp_torch._cmd_<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; only the subcommands whose module is
installed are registered, so new ones plug in without editing this file's logic.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from mtp_core import AcceptancePolicy, ConfAdapt, StaticK

__all__ = ["SUBCOMMANDS", "build_parser", "main", "parse_policy"]

SUBCOMMANDS = ("generate", "convert", "bench")

_POLICY_FORMS = "'confadapt', 'confadapt:THRESHOLD', 'confadapt:THRESHOLD:K_MAX' or 'static:K'"


def parse_policy(spec: str, default: AcceptancePolicy | None = None) -> AcceptancePolicy:
    """Parse a policy spec such as ``confadapt:0.9``, ``confadapt:0.9:8`` or ``static:3``.

    Args:
      spec: ``confadapt`` (defaults), ``confadapt:THRESHOLD``, ``confadapt:THRESHOLD:K_MAX`` or
        ``static:K``.
      default: the model's stored policy (``MTPModel.default_policy``): a ConfAdapt spec that
        leaves out the threshold or ``k_max`` takes them from it, so a checkpoint trained for
        ``k_max = 4`` decodes with 4 unless told otherwise.

    Returns:
      The ``ConfAdapt`` or ``StaticK`` policy.

    Raises:
      ValueError: for any other form, non-numeric fields or out-of-range values.

    Example:
      >>> parse_policy("confadapt:0.8:4")
      ConfAdapt(threshold=0.8, k_max=4)
    """
    parts = spec.strip().split(":")
    name, fields = parts[0].lower(), parts[1:]
    try:
        if name == "confadapt" and len(fields) <= 2:
            settings: dict[str, float | int] = {}
            if isinstance(default, ConfAdapt):
                settings.update(threshold=default.threshold, k_max=default.k_max)
            if fields:
                settings["threshold"] = float(fields[0])
            if len(fields) == 2:
                settings["k_max"] = int(fields[1])
            return ConfAdapt(**settings)  # type: ignore[arg-type]
        if name == "static" and len(fields) == 1:
            return StaticK(int(fields[0]))
    except ValueError as error:
        raise ValueError(f"bad policy {spec!r}: {error}; use {_POLICY_FORMS}") from error
    raise ValueError(f"bad policy {spec!r}; use {_POLICY_FORMS}")


def _available_subcommands() -> list[str]:
    return [
        name
        for name in SUBCOMMANDS
        if importlib.util.find_spec(f"mtp_torch._cmd_{name}") is not None
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
        module = importlib.import_module(f"mtp_torch._cmd_{name}")
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
