"""Policy specs as the commands and the lm-eval model take them (``confadapt:0.9:8``, ``static:3``),
and the default policy a checkpoint stores in its config under the same specs.

Parsing lives with the decoding layer, below both of its users (``cli`` and ``integrations``).
``policy_spec`` is its inverse: every policy ``parse_policy`` returns has a spec that parses back
to an equal policy, which is how ``MTPModel.save_pretrained`` stores the default policy
(config key ``mtp_policy``) and ``from_pretrained`` restores it.
"""

from __future__ import annotations

from typing import Any

from mtp_core import AcceptancePolicy, ConfAdapt, StaticK
from mtp_torch.decoding.mask import (
    K_MAX_CONFIG_KEY,
    POLICY_CONFIG_KEY,
    THRESHOLD_CONFIG_KEY,
    VERIFY_POLICY_CONFIG_KEY,
)

__all__ = [
    "parse_policy",
    "policy_config_settings",
    "policy_from_config",
    "policy_spec",
    "policy_to_save",
    "verify_policy_from_config",
]

_POLICY_FORMS = "'confadapt', 'confadapt:THRESHOLD', 'confadapt:THRESHOLD:K_MAX' or 'static:K'"


def parse_policy(spec: str, default: AcceptancePolicy | None = None) -> AcceptancePolicy:
    """Parse a policy spec such as ``confadapt:0.9``, ``confadapt:0.9:8`` or ``static:3``.

    Args:
      spec: ``confadapt`` (defaults), ``confadapt:THRESHOLD``, ``confadapt:THRESHOLD:K_MAX`` or
        ``static:K``.
      default: the model's stored policy (``MTPModel.default_policy``): a ConfAdapt spec that
        leaves out the threshold or ``k_max`` takes them from it, so a checkpoint trained for
        ``k_max = 4`` decodes with 4 unless told otherwise (a default of another kind gives
        its positions per step as ``k_max``, and ConfAdapt's own threshold).

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
            elif default is not None:
                settings.update(k_max=int(default.num_positions))
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


def policy_spec(policy: AcceptancePolicy) -> str:
    """The spec ``parse_policy`` reads back as an equal policy: the inverse of ``parse_policy``.

    Args:
      policy: a ``ConfAdapt`` or a ``StaticK`` (not a subclass: it would read back as its base).

    Returns:
      ``"confadapt:THRESHOLD:K_MAX"`` (the threshold written so that it reads back exactly) or
      ``"static:K"``.

    Raises:
      ValueError: for any other policy, which no spec names.

    Example:
      >>> policy_spec(ConfAdapt(0.8, 4)), policy_spec(StaticK(3))
      ('confadapt:0.8:4', 'static:3')
    """
    if type(policy) is ConfAdapt:
        spec = f"confadapt:{float(policy.threshold)!r}:{int(policy.k_max)}"
    elif type(policy) is StaticK:
        spec = f"static:{int(policy.k)}"
    else:
        spec = None
    if spec is None or parse_policy(spec) != policy:
        raise ValueError(
            f"the policy {policy!r} has no spec: parse_policy reads {_POLICY_FORMS} only, so a "
            f"{type(policy).__name__} cannot be written as one and read back.  To store it as a "
            "checkpoint's default, add its form to mtp_torch.decoding.policies (parse_policy "
            "and policy_spec); otherwise save with a ConfAdapt or StaticK default and pass your "
            "policy to generate(policy=...)"
        )
    return spec


def policy_to_save(
    current: AcceptancePolicy, k_max: int | None = None, threshold: float | None = None
) -> AcceptancePolicy:
    """The default policy ``MTPModel.save_pretrained(k_max=, threshold=)`` stores.

    With neither, ``current`` as it is.  ``k_max`` and ``threshold`` are the settings of a
    ``ConfAdapt``: given either, a ConfAdapt, its other setting taken from ``current`` (a
    ConfAdapt's own; for another policy its positions per step as ``k_max``, and ConfAdapt's
    default threshold).

    Raises:
      ValueError: if ``k_max`` or ``threshold`` is out of range.
    """
    if k_max is None and threshold is None:
        return current
    if isinstance(current, ConfAdapt):
        base = current
    else:
        base = ConfAdapt(k_max=int(current.num_positions))
    return ConfAdapt(
        threshold=base.threshold if threshold is None else threshold,
        k_max=base.k_max if k_max is None else k_max,
    )


def policy_config_settings(policy: AcceptancePolicy) -> dict[str, Any]:
    """The config keys a checkpoint stores for its default ``policy``.

    ``mtp_policy`` holds its spec (``policy_spec``), which ``policy_from_config`` reads first;
    ``mtp_k_max`` its positions per step and ``mtp_threshold`` a ConfAdapt's threshold
    (``None`` for other policies), which older readers use.

    Raises:
      ValueError: for a policy with no spec (see ``policy_spec``).
    """
    return {
        POLICY_CONFIG_KEY: policy_spec(policy),
        K_MAX_CONFIG_KEY: int(policy.num_positions),
        THRESHOLD_CONFIG_KEY: float(policy.threshold) if isinstance(policy, ConfAdapt) else None,
    }


def policy_from_config(config: Any) -> AcceptancePolicy:
    """The default policy a model config stores.

    The spec under ``mtp_policy`` when there is one (a ConfAdapt spec that leaves out a field
    takes it from the keys below); else (a save from before that key, or a config written by
    hand) a ``ConfAdapt`` with the ``mtp_threshold`` / ``mtp_k_max`` it holds, ConfAdapt's
    defaults for those it lacks.

    Raises:
      ValueError: if ``mtp_policy`` holds something ``parse_policy`` does not read.
    """
    settings: dict[str, Any] = {}
    threshold = getattr(config, THRESHOLD_CONFIG_KEY, None)
    k_max = getattr(config, K_MAX_CONFIG_KEY, None)
    if threshold is not None:
        settings["threshold"] = float(threshold)
    if k_max is not None:
        settings["k_max"] = int(k_max)
    legacy = ConfAdapt(**settings)
    policy = _config_spec(
        config, POLICY_CONFIG_KEY, legacy,
        f"'confadapt:0.9:16' or 'static:3' in its config.json, or remove the key to use "
        f"{THRESHOLD_CONFIG_KEY} / {K_MAX_CONFIG_KEY}",
    )  # fmt: skip
    return legacy if policy is None else policy


def _config_spec(
    config: Any, key: str, default: AcceptancePolicy | None, remedy: str
) -> AcceptancePolicy | None:
    """The policy whose spec ``config`` holds under ``key`` (``None`` when it holds none).

    Raises:
      ValueError: naming the key and its value, and ``remedy`` (what to write instead).
    """
    spec = getattr(config, key, None)
    if spec is None:
        return None
    try:
        if not isinstance(spec, str):
            raise ValueError(f"a spec is a string, got {type(spec).__name__}")
        return parse_policy(spec, default)
    except ValueError as error:
        raise ValueError(
            f"the model config's {key}={spec!r} is not a policy spec ({error}); write one such "
            f"as {remedy}"
        ) from error


def verify_policy_from_config(
    config: Any, default: AcceptancePolicy | None = None
) -> AcceptancePolicy | None:
    """The policy ``generate(verify=True)`` drafts with when given none (``None``: the default).

    Lossless verification wants other drafts than unverified decoding: every proposal it drafts
    is checked, so it pays to draft what the pass width makes cheap (``StaticK`` drafts every mask
    proposal), where unverified decoding keeps only what it is confident of.  A checkpoint stores
    this policy's spec under ``mtp_verify_policy``; without one, verification drafts with the
    default policy (``None`` here).  ``default`` fills a ConfAdapt spec's missing fields.

    Raises:
      ValueError: if ``mtp_verify_policy`` holds something ``parse_policy`` does not read.
    """
    return _config_spec(
        config, VERIFY_POLICY_CONFIG_KEY, default,
        "'static:2' in its config.json, or remove the key to verify with the default policy",
    )  # fmt: skip
