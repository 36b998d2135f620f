"""The benchmark report: typed rows, the derived speed-ups, and its three outputs.

``run_benchmark`` returns a ``BenchReport``: one ``MethodRow`` per method, the measured
``CostCurve``, the cost-aware ``k_max`` per threshold (``KMaxChoice``) and the two headline
numbers (``Summary``).  ``BenchReport.to_dict`` is the JSON written by ``mtp bench --out``
(keys and values as before the report was typed, so existing readers keep working) and
``BenchReport.from_dict`` reads it back.  ``mtp_torch.bench.output`` prints the table and
``write_report`` writes the JSON; ``mtp_torch.bench.plot.plot_report`` draws the plot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from mtp_torch.bench.cost import CostCurve, speedup_ceiling
from mtp_torch.jsonl import float_tuple, int_tuple

__all__ = [
    "BenchReport",
    "Headline",
    "KMaxChoice",
    "MethodRow",
    "Summary",
    "as_report",
    "json_float",
    "summarize",
    "with_speedups",
]


def json_float(value: float | None) -> float | None:
    """``value`` as a float, or ``None`` when it is missing or not finite (strict JSON)."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _json_value(instance: object, field: object, value: object) -> object:
    """``attrs.asdict`` hook: tuples become lists, as JSON has them."""
    del instance, field
    return list(value) if isinstance(value, tuple) else value


def _histogram(values: Sequence[int] | None) -> tuple[int, ...] | None:
    """An accepted-tokens histogram as a tuple; ``None`` (or empty) stays ``None``."""
    return int_tuple(values) if values else None


def _spread(values: Sequence[float] | None) -> tuple[float, ...] | None:
    """A ``(lowest, highest)`` pair of finite floats, or ``None``."""
    if values is None:
        return None
    pair = tuple(json_float(v) for v in values)
    return (
        None if len(pair) != 2 or None in pair else tuple(float(v) for v in pair if v is not None)
    )


# Rows without these keys (full-precision rows) leave them out of the JSON.
_SAME_PRECISION_KEYS = ("agreement_prefix_same_precision", "token_f1_same_precision")


@attrs.frozen(kw_only=True)
class MethodRow:
    """One method's row of the report (one JSON object of ``"methods"``, same key order).

    Floats that are not finite are stored as ``None`` (the report is strict JSON).

    Attributes:
      name: the row name (``greedy``, ``static_2``, ``confadapt_0.9_k4`` ... ``_int8``).
      family: ``greedy``, ``prompt_lookup``, ``static``, ``confadapt`` or ``verify``.
      precision: the model's dtype (``float32`` ...) or ``int8``.
      policy: the MTP policy, written out (``None`` for the transformers baselines).
      verify: lossless mode.
      threshold: ConfAdapt threshold, if any.
      k_max: positions per step, if any.
      k_max_auto: ``k_max`` was chosen by ``auto_policy``.
      prompt_lookup_tokens: candidates of the prompt-lookup baseline, if any.
      num_prompts: prompts decoded.
      generated_tokens: tokens generated over all prompts (first repeat).
      forward_passes: forward calls of the model over all prompts.
      tokens_per_forward: ``generated_tokens / forward_passes`` (the paper's acceleration).
      mean_pass_width: mean tokens fed per decoding pass (prefill excluded).
      seconds: median over repeats of the time to decode all prompts.
      seconds_per_repeat: that time, per repeat.
      tokens_per_second: ``generated_tokens / seconds``.
      accuracy: GSM8K accuracy over the graded prompts.
      num_correct: graded prompts answered correctly (``None`` if none graded).
      num_graded: prompts with a reference answer.
      teacher_nll: the teacher's mean negative log-likelihood per generated token (nats).
      teacher_nll_skipped_tokens: generated tokens outside the teacher's vocabulary.
      agreement_prefix: mean common prefix with stock ``greedy`` (tokens).
      agreement_prefix_fraction: the same over the length of ``greedy``'s output.
      exact_match: fraction of prompts identical to ``greedy``.
      token_f1: mean bag-of-tokens F1 against ``greedy``.
      peak_memory_mb: peak memory while decoding (CUDA allocated, else resident set).
      accepted_histogram: ``[n]`` counts steps that kept ``n`` tokens (MTP rows only).
      agreement_prefix_same_precision: common prefix with ``greedy`` of the row's precision
        (quantised rows only).
      token_f1_same_precision: token F1 against it (quantised rows only).
      speedup: ``tokens_per_second`` over that of ``greedy`` of the same precision: the
        median over timed rounds of the per-round ratio (rounds interleave all methods).
      speedup_vs_fp32_greedy: the same over stock full-precision ``greedy``.
      speedup_ceiling: the speed-up the cost curve allows if passes were the only cost.
      speedup_spread: ``(lowest, highest)`` per-round ``speedup``.
      speedup_vs_fp32_greedy_spread: ``(lowest, highest)`` per-round ``speedup_vs_fp32_greedy``.
      speedup_vs_static1: over ``static_1`` of the same model and kernel (MTP's own gain).
      speedup_vs_static1_spread: ``(lowest, highest)`` per-round ``speedup_vs_static1``.
    """

    name: str
    family: str
    precision: str
    policy: str | None
    verify: bool
    threshold: float | None = attrs.field(converter=json_float)
    k_max: int | None
    k_max_auto: bool
    prompt_lookup_tokens: int | None
    num_prompts: int
    generated_tokens: int
    forward_passes: int
    tokens_per_forward: float | None = attrs.field(converter=json_float)
    mean_pass_width: float | None = attrs.field(converter=json_float)
    seconds: float | None = attrs.field(converter=json_float)
    seconds_per_repeat: tuple[float, ...] = attrs.field(converter=float_tuple)
    tokens_per_second: float | None = attrs.field(converter=json_float)
    accuracy: float | None = attrs.field(converter=json_float)
    num_correct: int | None
    num_graded: int
    teacher_nll: float | None = attrs.field(converter=json_float)
    teacher_nll_skipped_tokens: int
    agreement_prefix: float | None = attrs.field(converter=json_float)
    agreement_prefix_fraction: float | None = attrs.field(converter=json_float)
    exact_match: float | None = attrs.field(converter=json_float)
    token_f1: float | None = attrs.field(converter=json_float)
    peak_memory_mb: float | None = attrs.field(converter=json_float)
    accepted_histogram: tuple[int, ...] | None = attrs.field(converter=_histogram)
    agreement_prefix_same_precision: float | None = attrs.field(default=None, converter=json_float)
    token_f1_same_precision: float | None = attrs.field(default=None, converter=json_float)
    speedup: float | None = attrs.field(default=None, converter=json_float)
    speedup_vs_fp32_greedy: float | None = attrs.field(default=None, converter=json_float)
    speedup_ceiling: float | None = attrs.field(default=None, converter=json_float)
    speedup_spread: tuple[float, ...] | None = attrs.field(default=None, converter=_spread)
    speedup_vs_fp32_greedy_spread: tuple[float, ...] | None = attrs.field(
        default=None, converter=_spread
    )
    speedup_vs_static1: float | None = attrs.field(default=None, converter=json_float)
    speedup_vs_static1_spread: tuple[float, ...] | None = attrs.field(
        default=None, converter=_spread
    )

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict (tuples as lists; no same-precision keys when unset)."""
        data = attrs.asdict(self, value_serializer=_json_value)
        for key in _SAME_PRECISION_KEYS:
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodRow:
        """Rebuild a row from ``to_dict`` output (or a row of a report JSON file)."""
        known = {field.name for field in attrs.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@attrs.frozen(kw_only=True)
class KMaxChoice:
    """The cost-aware ``k_max`` for one threshold, from the widest ConfAdapt row's acceptance.

    Attributes:
      threshold: the ConfAdapt threshold.
      from_method: the row whose accepted histogram gave the acceptance rates.
      acceptance: per-offset acceptance rates (``acceptance_from_histogram``).
      expected_speedup: ``{str(k_max): expected speed-up}`` over the candidates.
      chosen_k_max: the best candidate (``choose_k_max``).
    """

    threshold: float
    from_method: str
    acceptance: tuple[float, ...] = attrs.field(converter=float_tuple)
    expected_speedup: dict[str, float]
    chosen_k_max: int

    def to_dict(self) -> dict[str, Any]:
        """The choice as a JSON-ready dict."""
        return attrs.asdict(self, value_serializer=_json_value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KMaxChoice:
        """Rebuild a choice from ``to_dict`` output."""
        return cls(**dict(data))


@attrs.frozen(kw_only=True)
class Headline:
    """The best row by one measure, with its speed and quality beside it.

    Attributes:
      name: the row name.
      precision: the row's precision.
      metric: which row field was maximised (``speedup`` or ``speedup_vs_fp32_greedy``).
      value: its value.
      tokens_per_forward: the row's tokens per forward pass.
      accuracy: the row's accuracy.
      teacher_nll: the row's teacher NLL.
      spread: ``(lowest, highest)`` per-round value of the metric, when measured.
    """

    name: str
    precision: str
    metric: str
    value: float
    tokens_per_forward: float | None
    accuracy: float | None
    teacher_nll: float | None
    spread: tuple[float, ...] | None = attrs.field(default=None, converter=_spread)

    @property
    def within_noise(self) -> bool:
        """True when the per-round spread reaches 1.0 (no speed-up or slow-down shown)."""
        return self.spread is not None and self.spread[0] <= 1.0 <= self.spread[1]

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "precision", <metric>: value, "tokens_per_forward", ...}``."""
        return {
            "name": self.name,
            "precision": self.precision,
            self.metric: self.value,
            "tokens_per_forward": self.tokens_per_forward,
            "accuracy": self.accuracy,
            "teacher_nll": self.teacher_nll,
            "spread": None if self.spread is None else list(self.spread),
            "within_noise": self.within_noise,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], metric: str) -> Headline:
        """Rebuild a headline from ``to_dict`` output, ``metric`` naming its measure."""
        return cls(
            name=data["name"],
            precision=data["precision"],
            metric=metric,
            value=data[metric],
            tokens_per_forward=data["tokens_per_forward"],
            accuracy=data["accuracy"],
            teacher_nll=data["teacher_nll"],
            spread=data.get("spread"),
        )

    @classmethod
    def best(cls, rows: Sequence[MethodRow], metric: str) -> Headline | None:
        """The row with the largest ``metric`` (first on ties), or ``None`` if none has it."""
        valid = [row for row in rows if getattr(row, metric) is not None]
        if not valid:
            return None
        top = max(valid, key=lambda row: getattr(row, metric))
        return cls(
            name=top.name,
            precision=top.precision,
            metric=metric,
            value=getattr(top, metric),
            tokens_per_forward=top.tokens_per_forward,
            accuracy=top.accuracy,
            teacher_nll=top.teacher_nll,
            spread=getattr(top, f"{metric}_spread", None),
        )


# Each summary slot and the row field it maximises.
_SUMMARY_METRICS = {
    "mtp_speedup_same_precision": "speedup_vs_static1",
    "lossless_speedup_same_precision": "speedup_vs_static1",
    "kernel_speedup": "speedup_vs_fp32_greedy",
    "fastest_vs_fp32_greedy": "speedup_vs_fp32_greedy",
}

MIN_CREDITED_TOKENS_PER_FORWARD = 1.05
"""Below this many tokens per forward pass a row's speed-up is never credited to MTP."""


@attrs.frozen(kw_only=True)
class Summary:
    """The headline numbers, kept apart: MTP's own gain, lossless MTP, the kernel, the fastest.

    Attributes:
      mtp_speedup_same_precision: MTP's own gain: the MTP row (int8 apart) with the best
        ``speedup_vs_static1`` among those at ``MIN_CREDITED_TOKENS_PER_FORWARD`` tokens per
        forward or more (``None``: no row decodes more than one token per pass to speak of).
      lossless_speedup_same_precision: the same among the lossless (verify) rows.
      kernel_speedup: the kernel's own gain: greedy/``static_1`` with the kernel against stock
        full-precision greedy (``None`` without kernel rows).
      fastest_vs_fp32_greedy: any row (int8 included) with the best ``speedup_vs_fp32_greedy``.
    """

    mtp_speedup_same_precision: Headline | None = None
    lossless_speedup_same_precision: Headline | None = None
    kernel_speedup: Headline | None = None
    fastest_vs_fp32_greedy: Headline | None = None

    def to_dict(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict (``None`` where no row qualifies)."""
        slots = {slot: getattr(self, slot) for slot in _SUMMARY_METRICS}
        return {slot: None if line is None else line.to_dict() for slot, line in slots.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        """Rebuild the summary from ``to_dict`` output."""
        return cls(
            **{
                slot: None if data.get(slot) is None else Headline.from_dict(data[slot], metric)
                for slot, metric in _SUMMARY_METRICS.items()
            }
        )


def _choice_tuple(choices: Iterable[KMaxChoice]) -> tuple[KMaxChoice, ...]:
    return tuple(choices)


def _row_tuple(rows: Iterable[MethodRow]) -> tuple[MethodRow, ...]:
    return tuple(rows)


@attrs.frozen(kw_only=True)
class BenchReport:
    """What ``run_benchmark`` returns and ``mtp bench --out`` writes (via ``to_dict``).

    Attributes:
      meta: provenance, free-form JSON: machine, versions, date, command, dtype, prompts,
        budget, teacher, plus the caller's extra fields.
      cost_curve: the measured cost of one forward pass, or ``None`` when not measured.
      k_max_choice: the cost-aware ``k_max`` per threshold (empty without a cost curve).
      methods: one row per method, in run order.
      summary: the headline numbers.
      kernel_cost_curve: the cost curve measured with the kernel the ``..._{kernel}`` rows
        ran (``meta["kernel_plan"]`` says which implementation each width used), or ``None``.
    """

    meta: dict[str, Any]
    cost_curve: CostCurve | None
    k_max_choice: tuple[KMaxChoice, ...] = attrs.field(converter=_choice_tuple)
    methods: tuple[MethodRow, ...] = attrs.field(converter=_row_tuple)
    summary: Summary
    kernel_cost_curve: CostCurve | None = None

    def row(self, name: str) -> MethodRow:
        """The row called ``name``; ``KeyError`` if there is none."""
        for row in self.methods:
            if row.name == name:
                return row
        raise KeyError(f"no method {name!r} in the report; it has {[r.name for r in self.methods]}")

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready dicts and lists: the ``mtp bench --out`` file."""
        return {
            "meta": dict(self.meta),
            "cost_curve": None if self.cost_curve is None else self.cost_curve.to_dict(),
            "k_max_choice": [choice.to_dict() for choice in self.k_max_choice],
            "methods": [row.to_dict() for row in self.methods],
            "summary": self.summary.to_dict(),
            "kernel_cost_curve": (
                None if self.kernel_cost_curve is None else self.kernel_cost_curve.to_dict()
            ),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchReport:
        """Read a report back from ``to_dict`` output (e.g. a loaded ``--out`` file)."""
        curve = data.get("cost_curve")
        kernel_curve = data.get("kernel_cost_curve")
        return cls(
            kernel_cost_curve=None if kernel_curve is None else CostCurve.from_dict(kernel_curve),
            meta=dict(data.get("meta") or {}),
            cost_curve=None if curve is None else CostCurve.from_dict(curve),
            k_max_choice=[KMaxChoice.from_dict(c) for c in data.get("k_max_choice") or ()],
            methods=[MethodRow.from_dict(row) for row in data["methods"]],
            summary=Summary.from_dict(data.get("summary") or {}),
        )


def as_report(report: BenchReport | Mapping[str, Any]) -> BenchReport:
    """A ``BenchReport`` from itself or from its JSON form."""
    return report if isinstance(report, BenchReport) else BenchReport.from_dict(report)


# --- derived figures (pure) ---------------------------------------------------------------------


def _round_rates(row: MethodRow) -> list[float]:
    """Tokens per second of each timed round (all rounds decode the same tokens)."""
    return [row.generated_tokens / s if s > 0 else math.nan for s in row.seconds_per_repeat]


def paired_ratio(
    row: MethodRow, reference: MethodRow
) -> tuple[float | None, tuple[float, float] | None]:
    """Median and range over timed rounds of ``row``'s tokens/s over ``reference``'s.

    Round ``r`` of one method is compared with round ``r`` of the other: rounds interleave
    all methods, so a slow stretch of the machine hits both sides of a ratio alike.

    Returns:
      ``(median, (lowest, highest))``; ``(None, None)`` when either row has no timing.
    """
    mine, theirs = _round_rates(row), _round_rates(reference)
    ratios = [
        a / b
        for a, b in zip(mine, theirs, strict=False)
        if math.isfinite(a) and math.isfinite(b) and b > 0
    ]
    if not ratios:
        return None, None
    ratios.sort()
    middle = len(ratios) // 2
    median = ratios[middle] if len(ratios) % 2 else 0.5 * (ratios[middle - 1] + ratios[middle])
    return median, (ratios[0], ratios[-1])


def with_speedups(
    rows: Sequence[MethodRow],
    baselines: Sequence[str],
    stock_baseline: str,
    curves: Mapping[str, CostCurve | None] | CostCurve | None,
    *,
    static_baselines: Sequence[str] | None = None,
) -> list[MethodRow]:
    """The rows with every speed-up (median of per-round ratios, and its spread) filled in.

    Args:
      rows: the measured rows.
      baselines: per row, the name of the greedy row of its precision (``speedup``'s reference).
      stock_baseline: the name of stock full-precision greedy; its own ``speedup`` is 1 exactly.
      curves: the cost curve for the ceilings, one for all rows or per row precision label
        (``row.precision``'s last word, e.g. ``"float32 auto"`` -> ``"auto"``, else ``"base"``);
        ``None`` leaves them ``None``.
      static_baselines: per row, the name of ``static_1`` of its precision
        (``speedup_vs_static1``'s reference; rows without one keep ``None``).

    Returns:
      New rows, same order.
    """
    by_name = {row.name: row for row in rows}
    stock = by_name[stock_baseline]
    statics: Sequence[str | None] = static_baselines or [None] * len(rows)
    result = []
    for row, baseline, static in zip(rows, baselines, statics, strict=True):
        speedup, spread = paired_ratio(row, by_name[baseline])
        if row.name == stock_baseline and speedup is not None:
            speedup, spread = 1.0, (1.0, 1.0)
        vs_stock, vs_stock_spread = paired_ratio(row, stock)
        vs_static, vs_static_spread = (None, None)
        if static is not None and static in by_name and row.policy is not None:
            vs_static, vs_static_spread = paired_ratio(row, by_name[static])
        curve = curves.get(_curve_key(row.precision)) if isinstance(curves, Mapping) else curves
        ceiling = None
        if curve is not None and row.tokens_per_forward:
            width = row.mean_pass_width or row.tokens_per_forward
            ceiling = speedup_ceiling(row.tokens_per_forward, curve, width)
        result.append(
            attrs.evolve(
                row,
                speedup=speedup,
                speedup_spread=spread,
                speedup_vs_fp32_greedy=vs_stock,
                speedup_vs_fp32_greedy_spread=vs_stock_spread,
                speedup_vs_static1=vs_static,
                speedup_vs_static1_spread=vs_static_spread,
                speedup_ceiling=ceiling,
            )
        )
    return result


def _curve_key(precision: str) -> str:
    """``"float32 auto"`` -> ``"auto"``; ``"int8"`` -> ``"int8"``; a bare dtype -> ``"base"``."""
    words = precision.split()
    if len(words) > 1:
        return words[-1]
    return "int8" if precision == "int8" else "base"


def summarize(rows: Sequence[MethodRow]) -> Summary:
    """The headline numbers of the rows (MTP rows are those with a policy; int8 rows are apart).

    MTP is credited with a speed-up only by rows that decode at least
    ``MIN_CREDITED_TOKENS_PER_FORWARD`` tokens per forward pass, measured against ``static_1``
    of the same model and kernel; the kernel's own gain is greedy or ``static_1`` with the
    kernel against stock full-precision greedy.

    Args:
      rows: the rows, speed-ups filled in (``with_speedups``).

    Returns:
      The ``Summary``.
    """
    mtp = [
        row
        for row in rows
        if row.policy is not None
        and row.precision != "int8"
        and not (row.family == "static" and row.k_max == 1 and not row.verify)
    ]
    credited = [
        row for row in mtp if (row.tokens_per_forward or 0.0) >= MIN_CREDITED_TOKENS_PER_FORWARD
    ]
    lossless = [row for row in credited if row.verify]
    kernel_rows = [
        row
        for row in rows
        if len(row.precision.split()) > 1
        and row.family in ("greedy", "static")
        and not row.verify
        and row.k_max in (None, 1)
    ]
    return Summary(
        mtp_speedup_same_precision=Headline.best(credited, "speedup_vs_static1"),
        lossless_speedup_same_precision=Headline.best(lossless, "speedup_vs_static1"),
        kernel_speedup=Headline.best(kernel_rows, "speedup_vs_fp32_greedy"),
        fastest_vs_fp32_greedy=Headline.best(rows, "speedup_vs_fp32_greedy"),
    )
