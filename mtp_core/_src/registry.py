"""Backend registry: names mapped to lazily imported ``module:attr`` entry points.

Backends are found under the entry-point group ``mtp_core.backends``, so a third-party package
adds one from its own ``pyproject.toml``::

    [project.entry-points."mtp_core.backends"]
    mybackend = "my_package:MyBackend"

A name stands for a backend class or factory.  ``mtp_torch.MTPModel(model, backend="mybackend")``
(and ``mtp generate --backend``, ``mtp bench --backend``) calls it with the transformers model
and decodes on what it returns; the numpy reference (``numpy``) is built from a checkpoint
instead and driven through ``mtp_core.decode``.

Nothing is imported until ``load_backend`` is called with that name, so importing ``mtp_core``
never imports a framework the user did not ask for.  ``register_backend`` adds a name at run time
(tests, notebooks) without packaging.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

__all__ = ["ENTRY_POINT_GROUP", "available_backends", "load_backend", "register_backend"]

ENTRY_POINT_GROUP = "mtp_core.backends"

_runtime: dict[str, str] = {}


def register_backend(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:attr"`` for this process (overrides an entry point).

    Args:
      name: the backend name users pass to ``load_backend``.
      target: ``"module:attr"``; the attribute is a backend class or factory.

    Raises:
      ValueError: if ``target`` is not of the form ``"module:attr"``.
    """
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"backend target must look like 'module:attr', got {target!r}")
    _runtime[name] = target


def _entry_point_targets() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    """Names of all registered backends (entry points and run-time registrations), sorted."""
    return sorted({**_entry_point_targets(), **_runtime})


def load_backend(name: str) -> object:
    """Import and return the object registered as ``name`` (a backend class or factory).

    Raises:
      KeyError: if no backend of that name is registered; the message lists the known names.
    """
    targets = {**_entry_point_targets(), **_runtime}
    if name not in targets:
        raise KeyError(
            f"no backend named {name!r}; registered backends: {sorted(targets)}. Install the "
            f"package that provides it or register it under the '{ENTRY_POINT_GROUP}' entry-point group"
        )
    module_name, _, attr = targets[name].partition(":")
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
