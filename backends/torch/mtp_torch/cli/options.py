"""Option parsing shared by the ``mtp`` subcommands: options from config fields.

``parse_policy`` lives in ``mtp_torch.decoding.policies`` (the layer that owns policies, below
``integrations`` too) and is re-exported here.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar

import attrs
import torch

from mtp_torch.decoding.policies import parse_policy as parse_policy

ItemT = TypeVar("ItemT")

__all__ = [
    "ConfigOption",
    "add_config_options",
    "comma_separated",
    "config_overrides",
    "parse_policy",
]


@attrs.frozen
class ConfigOption:
    """A command-line option that sets one field of an attrs config class.

    The flag is the field's name with dashes (``k_max`` -> ``--k-max``); its argparse type
    follows the field's annotation (``int``, ``float``, a ``Literal`` of choices, ``bool`` as
    ``--x/--no-x``), and its parsed default is ``None``: "keep the config's value", which the
    help shows, so every default stays written once, in the config.

    Attributes:
      field: the config field the option sets.
      help: help text; ``{default}`` is replaced by the config's value (``yes``/``no`` for a
        bool, ``none_text`` for ``None``).
      none_text: how a ``None`` default reads in the help.
      type: the argparse type, replacing the one the annotation gives.
      parse: turns the parsed value into the field's value (may raise ``ValueError``).
    """

    field: str
    help: str
    none_text: str = "none"
    type: Callable[[str], Any] | None = None
    parse: Callable[[Any], Any] | None = None

    @property
    def flag(self) -> str:
        """The option string, ``--`` and the field name with dashes."""
        return "--" + self.field.replace("_", "-")


def _describe(value: Any, none_text: str) -> str:
    """A default as the help shows it."""
    if value is None:
        return none_text
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _argparse_kind(annotation: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a field annotation (``X | None`` reads as ``X``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else annotation
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is Literal:
        return {"choices": typing.get_args(annotation)}
    if annotation in (int, float):
        return {"type": annotation}
    return {}


def add_config_options(
    parser: argparse._ActionsContainer,
    config_type: type[Any],
    defaults: Any,
    options: Iterable[ConfigOption],
) -> None:
    """Add one option per ``ConfigOption`` to ``parser`` (or an argument group).

    Args:
      parser: the parser or group that gets the options.
      config_type: the attrs class whose fields the options set.
      defaults: the config whose values the help shows as defaults.
      options: the options, in the order they should appear.

    Raises:
      KeyError: for an option whose field the config class lacks.
    """
    hints = typing.get_type_hints(config_type)
    fields = attrs.fields_dict(config_type)
    for option in options:
        field = fields[option.field]
        kind = _argparse_kind(hints[field.name])
        if option.type is not None:
            kind = {"type": option.type}
        default = _describe(getattr(defaults, field.name), option.none_text)
        parser.add_argument(
            option.flag, default=None, help=option.help.format(default=default), **kind
        )


def config_overrides(args: argparse.Namespace, options: Sequence[ConfigOption]) -> dict[str, Any]:
    """The config fields that the command line set (options left out keep the config's value).

    Args:
      args: the parsed command line.
      options: the options ``add_config_options`` added.

    Returns:
      Field name -> value, for every option given on the command line.

    Raises:
      ValueError: from an option's ``parse``.
    """
    overrides: dict[str, Any] = {}
    for option in options:
        value = getattr(args, option.field)
        if value is not None:
            overrides[option.field] = value if option.parse is None else option.parse(value)
    return overrides


def comma_separated(item: Callable[[str], ItemT], what: str) -> Callable[[str], tuple[ItemT, ...]]:
    """An argparse ``type=`` for comma-separated values: ``"2, 3"`` -> ``(2, 3)``, ``""`` -> ``()``.

    Args:
      item: converts one stripped, non-empty part (raises ``ValueError`` when it is bad).
      what: what the parts are, for the error message (``"integers"``).

    Example:
      >>> comma_separated(int, "integers")("2, 3")
      (2, 3)
    """

    def parse(text: str) -> tuple[ItemT, ...]:
        try:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from error

    return parse


def check_device(device: str) -> None:
    """Raise ``ValueError`` for a ``--device`` PyTorch does not know or this machine lacks."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {device!r} is not a device PyTorch knows; use cpu, cuda or cuda:N"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")


def check_sampling(temperature: float, top_p: float, seed: int) -> None:
    """Raise ``ValueError`` naming ``--temperature``, ``--top-p`` or ``--seed`` when out of range."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}"
        )
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")


def check_text(name: str, text: str) -> None:
    """Raise ``ValueError`` when ``text`` (an argument) is not valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid UTF-8 text; pass the text in UTF-8") from None
