"""Policy specs as the commands and the lm-eval model take them (``confadapt:0.9:8``, ``static:3``).

Parsing lives with the decoding layer, below both of its users (``cli`` and ``integrations``).
"""

from __future__ import annotations

from mtp_core import AcceptancePolicy, ConfAdapt, StaticK

__all__ = ["parse_policy"]

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
