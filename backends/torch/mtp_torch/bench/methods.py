"""The decoding methods the benchmark compares, one small class each behind ``BenchMethod``.

- ``GreedyGenerate``: transformers' greedy ``generate``, the baseline every speed-up is
  measured from;
- ``PromptLookup``: transformers' prompt-lookup decoding (``prompt_lookup_num_tokens``), a
  training-free speculative baseline;
- ``StaticKDecoding``: MTP decoding keeping all ``k`` proposals (paper: static k);
- ``ConfAdaptDecoding``: MTP decoding with ConfAdapt (paper: the threshold sweep); with
  ``verify=True`` the lossless mode (the same weights verify their own proposals, so the output
  equals greedy exactly);
- ``VerifyStaticDecoding``: the lossless mode drafting every mask proposal whatever its
  confidence (``StaticK(k)`` with ``verify=True``), beside the confidence-gated verify rows;
- ``AutoKDecoding``: ConfAdapt whose ``k_max`` ``auto_policy`` chose for this hardware
  (``k_max="auto"``), plain or lossless.

Every method has a ``precision``: ``"base"`` runs on the model as loaded, ``"int8"`` on the
dynamically quantised copy (its name gets an ``_int8`` suffix), ``"skinny"`` on the model as
loaded with the weight-first CPU product (``_skinny``; see ``mtp_torch.decoding.kernels``).  ``bench_methods`` lists the
methods of one precision, baselines first.

Reference: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs
import numpy as np
import torch
from transformers import GenerationConfig

from mtp_core import AcceptancePolicy, ConfAdapt, StaticK
from mtp_torch.bench.config import (
    PROMPT_LOOKUP_TOKENS,
    SWEEP_K_MAX,
    SWEEP_STATIC,
    SWEEP_THRESHOLDS,
    SWEEP_VERIFY,
)
from mtp_torch.decoding.plan import KernelPlan
from mtp_torch.jsonl import int_tuple

__all__ = [
    "AutoKDecoding",
    "BenchMethod",
    "ConfAdaptDecoding",
    "Generated",
    "GreedyGenerate",
    "MethodInfo",
    "ModelsUnderTest",
    "PromptLookup",
    "RunSettings",
    "StaticKDecoding",
    "VerifyStaticDecoding",
    "bench_methods",
    "policy_label",
]


@attrs.frozen
class RunSettings:
    """What every method's ``generate`` shares: the budget and the stop and pad tokens.

    Attributes:
      max_new_tokens: generation budget per prompt.
      eos_token_ids: token ids that end a sequence (empty: none).
      pad_token_id: the pad id transformers' ``generate`` writes after a finished row.
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = attrs.field(converter=int_tuple)
    pad_token_id: int

    def eos_argument(self) -> list[int] | None:
        """``eos_token_id`` as the generate functions take it (``None`` when there is none)."""
        return list(self.eos_token_ids) if self.eos_token_ids else None


@attrs.define
class ModelsUnderTest:
    """The models of one precision that methods run on.

    Attributes:
      precision: ``"base"``, ``"int8"`` or a kernel name (``"skinny"``, ``"native"``,
        ``"auto"``).
      hf_model: the transformers model (``mtp_model.model``).
      mtp_model: the ``MTPModel`` wrapping it.
      baseline_model: whose transformers ``generate`` the baselines run; ``None``: ``hf_model``.
      kernel: ``None`` (PyTorch's own products) or the ``KernelPlan`` every method of this
        bundle runs in (baselines included; ``mtp_torch.decoding.kernels.use_kernels``).
    """

    precision: str
    hf_model: Any  # a transformers PreTrainedModel (its generate() is untyped)
    mtp_model: Any
    baseline_model: Any = None
    kernel: KernelPlan | None = None

    @property
    def reference_model(self) -> Any:
        """The model the transformers baselines decode with."""
        return self.baseline_model if self.baseline_model is not None else self.hf_model


@attrs.frozen
class Generated:
    """One method's output for one prompt.

    Attributes:
      sequences: token ids, shape ``(1, prompt_len + generated)``.
      accepted_histogram: ``[n]`` counts steps that kept ``n`` tokens (empty for baselines).
    """

    sequences: torch.Tensor
    accepted_histogram: tuple[int, ...] = ()


@attrs.frozen
class MethodInfo:
    """What a report row says about the method that produced it.

    Attributes:
      name: the row name (``greedy``, ``prompt_lookup``, ``static_2``, ``confadapt_0.9_k4``,
        ``verify_confadapt_0.9_k4``, ``confadapt_0.9_kauto``; ``_int8`` for the quantised copy).
      family: ``"greedy"``, ``"prompt_lookup"``, ``"static"``, ``"confadapt"`` or ``"verify"``
        (the report's label; the plot styles rows by it).
      policy: the MTP policy (``None`` for the transformers baselines).
      verify: lossless mode.
      threshold: ConfAdapt threshold, if any.
      k_max: positions per step (``k`` of static, ``k_max`` of ConfAdapt), if any.
      k_max_auto: ``k_max`` was chosen by ``auto_policy``.
      prompt_lookup_tokens: ``prompt_lookup_num_tokens`` of the prompt-lookup baseline.
    """

    name: str
    family: str
    policy: AcceptancePolicy | None = None
    verify: bool = False
    threshold: float | None = None
    k_max: int | None = None
    k_max_auto: bool = False
    prompt_lookup_tokens: int | None = None


class BenchMethod(Protocol):
    """One decoding configuration of the benchmark: how it decodes, and what it is called."""

    @property
    def precision(self) -> str:
        """``"base"`` (the model as loaded), ``"int8"`` (the quantised copy) or ``"skinny"``."""
        ...

    @property
    def name(self) -> str:
        """The unique row name."""
        ...

    def describe(self) -> MethodInfo:
        """The method's report fields."""
        ...

    def generate(
        self, models: ModelsUnderTest, input_ids: torch.Tensor, settings: RunSettings
    ) -> Generated:
        """Decode one prompt (``input_ids``, shape ``(1, prompt_len)``) greedily."""
        ...


def policy_label(policy: AcceptancePolicy | None) -> str | None:
    """A policy written out for the report: ``"ConfAdapt(threshold=0.9, k_max=4)"``, ``"StaticK(2)"``."""
    if policy is None:
        return None
    if isinstance(policy, ConfAdapt):
        return f"ConfAdapt(threshold={_format_threshold(policy.threshold)}, k_max={policy.k_max})"
    if isinstance(policy, StaticK):
        return f"StaticK({policy.k})"
    return repr(policy)


def _format_threshold(threshold: float) -> str:
    return f"{float(threshold):g}"


def _suffix(precision: str) -> str:
    """The row-name suffix of a precision: none for ``"base"``, else ``_int8`` / ``_skinny``."""
    return "" if precision == "base" else f"_{precision}"


def _transformers_generate(
    models: ModelsUnderTest,
    input_ids: torch.Tensor,
    settings: RunSettings,
    prompt_lookup: int | None,
) -> Generated:
    """Greedy transformers ``generate`` on the reference model (batch 1, no padding)."""
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=settings.eos_argument(),
        pad_token_id=settings.pad_token_id,
        prompt_lookup_num_tokens=prompt_lookup,
    )
    with torch.inference_mode():
        sequences = models.reference_model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
    return Generated(sequences)


def _mtp_generate(
    models: ModelsUnderTest,
    input_ids: torch.Tensor,
    settings: RunSettings,
    policy: AcceptancePolicy,
    verify: bool,
) -> Generated:
    """``MTPModel.generate`` with ``policy`` (lossless when ``verify``)."""
    out = models.mtp_model.generate(
        input_ids,
        policy=policy,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=settings.eos_argument(),
        verify=verify,
    )
    histogram = tuple(int(count) for count in np.asarray(out.accepted_histogram).ravel())
    return Generated(out.sequences, histogram)


@attrs.frozen
class GreedyGenerate:
    """transformers' greedy ``generate``: the baseline every speed-up is measured from."""

    precision: str = "base"

    @property
    def name(self) -> str:
        """``greedy`` (``greedy_int8``)."""
        return f"greedy{_suffix(self.precision)}"

    def describe(self) -> MethodInfo:
        """The report fields (no policy)."""
        return MethodInfo(name=self.name, family="greedy")

    def generate(
        self, models: ModelsUnderTest, input_ids: torch.Tensor, settings: RunSettings
    ) -> Generated:
        """Decode with the reference model."""
        return _transformers_generate(models, input_ids, settings, prompt_lookup=None)


@attrs.frozen
class PromptLookup:
    """transformers' prompt-lookup decoding: a training-free speculative baseline."""

    num_tokens: int = PROMPT_LOOKUP_TOKENS
    precision: str = "base"

    @property
    def name(self) -> str:
        """``prompt_lookup`` (``prompt_lookup_int8``)."""
        return f"prompt_lookup{_suffix(self.precision)}"

    def describe(self) -> MethodInfo:
        """The report fields (``prompt_lookup_tokens`` set)."""
        return MethodInfo(
            name=self.name, family="prompt_lookup", prompt_lookup_tokens=self.num_tokens
        )

    def generate(
        self, models: ModelsUnderTest, input_ids: torch.Tensor, settings: RunSettings
    ) -> Generated:
        """Decode with ``prompt_lookup_num_tokens=num_tokens`` on the reference model."""
        return _transformers_generate(models, input_ids, settings, prompt_lookup=self.num_tokens)


@attrs.frozen
class StaticKDecoding:
    """MTP decoding keeping all ``k`` proposals of each step (paper: static k)."""

    k: int
    precision: str = "base"

    @property
    def name(self) -> str:
        """``static_{k}``."""
        return f"static_{self.k}{_suffix(self.precision)}"

    @property
    def policy(self) -> StaticK:
        """``StaticK(k)``."""
        return StaticK(self.k)

    def describe(self) -> MethodInfo:
        """The report fields (``k_max`` is ``k``)."""
        return MethodInfo(name=self.name, family="static", policy=self.policy, k_max=self.k)

    def generate(
        self, models: ModelsUnderTest, input_ids: torch.Tensor, settings: RunSettings
    ) -> Generated:
        """Decode with ``MTPModel.generate``."""
        return _mtp_generate(models, input_ids, settings, self.policy, verify=False)


@attrs.frozen
class VerifyStaticDecoding:
    """Lossless MTP decoding that drafts all ``k - 1`` mask proposals of each step, whatever
    their confidence (``StaticK(k)`` with ``verify=True``): the output is greedy decoding."""

    k: int
    precision: str = "base"

    @property
    def name(self) -> str:
        """``verify_static_{k}``."""
        return f"verify_static_{self.k}{_suffix(self.precision)}"

    @property
    def policy(self) -> StaticK:
        """``StaticK(k)``."""
        return StaticK(self.k)

    def describe(self) -> MethodInfo:
        """The report fields (family ``verify``, ``k_max`` is ``k``)."""
        return MethodInfo(
            name=self.name, family="verify", policy=self.policy, k_max=self.k, verify=True
        )

    def generate(
        self, models: ModelsUnderTest, input_ids: torch.Tensor, settings: RunSettings
    ) -> Generated:
        """Decode with ``MTPModel.generate(..., verify=True)``."""
        return _mtp_generate(models, input_ids, settings, self.policy, verify=True)


def _confadapt_name(verify: bool, threshold: float, k_label: str, precision: str) -> str:
    """``confadapt_{tau}_k{k}`` with a ``verify_`` prefix and a precision suffix."""
    prefix = "verify_confadapt" if verify else "confadapt"
    return f"{prefix}_{_format_threshold(threshold)}_k{k_label}{_suffix(precision)}"


@attrs.frozen
class ConfAdaptDecoding:
    """MTP decoding with ``ConfAdapt(threshold, k_max)``; lossless when ``verify``."""

    threshold: float
    k_max: int
    verify: bool = False
    precision: str = "base"

    @property
    def name(self) -> str:
        """``confadapt_{tau}_k{k_max}`` (``verify_`` in front for the lossless mode)."""
        return _confadapt_name(self.verify, self.threshold, str(self.k_max), self.precision)

    @property
    def policy(self) -> ConfAdapt:
        """``ConfAdapt(threshold, k_max)``."""
        return ConfAdapt(threshold=self.threshold, k_max=self.k_max)

    def describe(self) -> MethodInfo:
        """The report fields."""
        return MethodInfo(
            name=self.name,
            family="verify" if self.verify else "confadapt",
            policy=self.policy,
            verify=self.verify,
            threshold=self.threshold,
            k_max=self.k_max,
        )

    def generate(
        self, models: ModelsUnderTest, input_ids: torch.Tensor, settings: RunSettings
    ) -> Generated:
        """Decode with ``MTPModel.generate``."""
        return _mtp_generate(models, input_ids, settings, self.policy, self.verify)


@attrs.frozen
class AutoKDecoding:
    """ConfAdapt at ``threshold`` with the ``k_max`` ``auto_policy`` chose (``k_max="auto"``).

    ``policy`` is ``auto_policy``'s answer: ``ConfAdapt(threshold, k_max)``, or ``StaticK(1)``
    when multi-token decoding does not pay on this hardware.
    """

    threshold: float
    policy: AcceptancePolicy
    verify: bool = False
    precision: str = "base"

    @property
    def name(self) -> str:
        """``confadapt_{tau}_kauto`` (``verify_`` in front for the lossless mode)."""
        return _confadapt_name(self.verify, self.threshold, "auto", self.precision)

    def describe(self) -> MethodInfo:
        """The report fields (``k_max`` is the chosen one)."""
        return MethodInfo(
            name=self.name,
            family="verify" if self.verify else "confadapt",
            policy=self.policy,
            verify=self.verify,
            threshold=self.threshold,
            k_max=int(self.policy.num_positions),
            k_max_auto=True,
        )

    def generate(
        self, models: ModelsUnderTest, input_ids: torch.Tensor, settings: RunSettings
    ) -> Generated:
        """Decode with ``MTPModel.generate``."""
        return _mtp_generate(models, input_ids, settings, self.policy, self.verify)


def _confadapt_methods(
    thresholds: Sequence[float],
    k_max: Sequence[int | str],
    verify: bool,
    auto_policies: Mapping[float, AcceptancePolicy],
    precision: str,
) -> list[BenchMethod]:
    """The ConfAdapt sweep: every threshold with every ``k_max`` (``"auto"`` resolved)."""
    methods: list[BenchMethod] = []
    for tau in thresholds:
        for k in k_max:
            if k != "auto":
                methods.append(ConfAdaptDecoding(float(tau), int(k), verify, precision))
                continue
            policy = auto_policies.get(float(tau))
            if policy is None:
                raise ValueError(
                    f"k_max='auto' needs a policy chosen for threshold {tau}; call "
                    "auto_policy first (run_benchmark does) and pass auto_policies"
                )
            methods.append(AutoKDecoding(float(tau), policy, verify, precision))
    return methods


def bench_methods(
    k_max: Sequence[int | str] = SWEEP_K_MAX,
    thresholds: Sequence[float] = SWEEP_THRESHOLDS,
    static: Sequence[int] = SWEEP_STATIC,
    verify_thresholds: Sequence[float] = SWEEP_VERIFY,
    verify_static: Sequence[int] = (),
    prompt_lookup_tokens: int | None = PROMPT_LOOKUP_TOKENS,
    auto_policies: Mapping[float, AcceptancePolicy] | None = None,
    precision: str = "base",
    baselines: bool = True,
) -> list[BenchMethod]:
    """The list of methods one precision runs, baselines first.

    Args:
      k_max: ConfAdapt ``k_max`` values; the string ``"auto"`` adds the cost-aware choice
        (resolved per threshold in ``auto_policies``).
      thresholds: ConfAdapt thresholds (paper sweep 0.995 ... 0.6).
      static: ``k`` values of static-k MTP rows (``1`` is MTP's own one-token decoding).
      verify_thresholds: thresholds whose ConfAdapt rows (each ``k_max``) also run lossless.
      verify_static: ``k`` values of lossless rows that draft every mask proposal
        (``StaticK(k)`` with ``verify=True``, rows ``verify_static_{k}``).
      prompt_lookup_tokens: candidate tokens of the prompt-lookup baseline; ``None`` skips it.
      auto_policies: ``{threshold: policy}`` chosen by ``auto_policy`` for ``"auto"``.
      precision: ``"base"``, ``"int8"`` or ``"skinny"`` (names get that suffix).
      baselines: include ``greedy`` (always, when True) and ``prompt_lookup``.

    Returns:
      The methods, names unique.

    Raises:
      ValueError: for ``"auto"`` without a policy for a threshold, or a method listed twice.
    """
    methods: list[BenchMethod] = []
    if baselines:
        methods.append(GreedyGenerate(precision))
        if prompt_lookup_tokens is not None:
            methods.append(PromptLookup(int(prompt_lookup_tokens), precision))
    methods += [StaticKDecoding(int(k), precision) for k in static]
    chosen = auto_policies or {}
    methods += _confadapt_methods(thresholds, k_max, False, chosen, precision)
    methods += _confadapt_methods(verify_thresholds, k_max, True, chosen, precision)
    methods += [VerifyStaticDecoding(int(k), precision) for k in verify_static]
    names = [method.name for method in methods]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate methods {duplicates}: list each k_max/threshold/k once")
    return methods
