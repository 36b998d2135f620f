"""The benchmark report: typed rows, the derived speed-ups, and its three outputs.

``run_benchmark`` returns a ``BenchReport``: one ``MethodRow`` per method, the measured
``CostCurve``, the cost-aware ``k_max`` per threshold (``KMaxChoice``) and the two headline
numbers (``Summary``).  ``BenchReport.to_dict`` is the JSON written by ``mtp bench --out``
(keys and values as before the report was typed, so existing readers keep working) and
``BenchReport.from_dict`` reads it back.  ``format_markdown`` prints the table and
``write_report`` writes the JSON; ``mtp_torch.bench.plot.plot_report`` draws the plot.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from mtp_torch.bench.cost import CostCurve, float_tuple, int_tuple, speedup_ceiling

__all__ = [
    "BenchReport",
    "Headline",
    "KMaxChoice",
    "MethodRow",
    "Summary",
    "as_report",
    "format_markdown",
    "json_float",
    "summarize",
    "with_speedups",
    "write_report",
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
      speedup: ``tokens_per_second`` over that of ``greedy`` of the same precision.
      speedup_vs_fp32_greedy: over that of stock full-precision ``greedy``.
      speedup_ceiling: the speed-up the cost curve allows if passes were the only cost.
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
    """

    name: str
    precision: str
    metric: str
    value: float
    tokens_per_forward: float | None
    accuracy: float | None
    teacher_nll: float | None

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "precision", <metric>: value, "tokens_per_forward", ...}``."""
        return {
            "name": self.name,
            "precision": self.precision,
            self.metric: self.value,
            "tokens_per_forward": self.tokens_per_forward,
            "accuracy": self.accuracy,
            "teacher_nll": self.teacher_nll,
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
        )


# Each summary slot and the row field it maximises.
_SUMMARY_METRICS = {
    "mtp_speedup_same_precision": "speedup",
    "lossless_speedup_same_precision": "speedup",
    "fastest_vs_fp32_greedy": "speedup_vs_fp32_greedy",
}


@attrs.frozen(kw_only=True)
class Summary:
    """The headline numbers, kept apart: MTP alone, lossless MTP, and the fastest of all.

    Attributes:
      mtp_speedup_same_precision: the full-precision MTP row with the best ``speedup``.
      lossless_speedup_same_precision: the same among the lossless (verify) rows.
      fastest_vs_fp32_greedy: any row (int8 included) with the best ``speedup_vs_fp32_greedy``.
    """

    mtp_speedup_same_precision: Headline | None = None
    lossless_speedup_same_precision: Headline | None = None
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
    """

    meta: dict[str, Any]
    cost_curve: CostCurve | None
    k_max_choice: tuple[KMaxChoice, ...] = attrs.field(converter=_choice_tuple)
    methods: tuple[MethodRow, ...] = attrs.field(converter=_row_tuple)
    summary: Summary

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
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchReport:
        """Read a report back from ``to_dict`` output (e.g. a loaded ``--out`` file)."""
        curve = data.get("cost_curve")
        return cls(
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


def with_speedups(
    rows: Sequence[MethodRow],
    baselines: Sequence[str],
    stock_baseline: str,
    curve: CostCurve | None,
) -> list[MethodRow]:
    """The rows with ``speedup``, ``speedup_vs_fp32_greedy`` and ``speedup_ceiling`` filled in.

    Args:
      rows: the measured rows.
      baselines: per row, the name of the greedy row of its precision (``speedup``'s reference).
      stock_baseline: the name of stock full-precision greedy; its own ``speedup`` is 1 exactly.
      curve: the cost curve for the ceilings; ``None`` leaves them ``None``.

    Returns:
      New rows, same order.
    """
    rate = {row.name: row.tokens_per_second for row in rows}
    stock = rate[stock_baseline]
    result = []
    for row, baseline in zip(rows, baselines, strict=True):
        own, mine = rate[baseline], row.tokens_per_second
        ceiling = None
        if curve is not None and row.tokens_per_forward:
            width = row.mean_pass_width or row.tokens_per_forward
            ceiling = speedup_ceiling(row.tokens_per_forward, curve, width)
        speedup = mine / own if mine and own else None
        if row.name == stock_baseline and speedup is not None:
            speedup = 1.0
        result.append(
            attrs.evolve(
                row,
                speedup=speedup,
                speedup_vs_fp32_greedy=mine / stock if mine and stock else None,
                speedup_ceiling=ceiling,
            )
        )
    return result


def summarize(rows: Sequence[MethodRow]) -> Summary:
    """The headline numbers of the rows (MTP rows are those with a policy; int8 rows are apart).

    Args:
      rows: the rows, speed-ups filled in (``with_speedups``).

    Returns:
      The ``Summary``.
    """
    full_precision_mtp = [row for row in rows if row.policy is not None and row.precision != "int8"]
    lossless = [row for row in full_precision_mtp if row.verify]
    return Summary(
        mtp_speedup_same_precision=Headline.best(full_precision_mtp, "speedup"),
        lossless_speedup_same_precision=Headline.best(lossless, "speedup"),
        fastest_vs_fp32_greedy=Headline.best(rows, "speedup_vs_fp32_greedy"),
    )


# --- output ------------------------------------------------------------------------------------


def _fmt(value: object, digits: int = 2) -> str:
    """A table cell: ``-`` for missing, floats to ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_TABLE_HEADER = (
    "| method | precision | tok/fwd | tok/s | speed-up | vs fp32 greedy | ceiling | "
    "accuracy | teacher NLL | prefix | token F1 | peak MB |"
)


def _table_line(row: MethodRow) -> str:
    """One Markdown table line of a row."""
    cells = [
        row.name,
        str(row.precision),
        _fmt(row.tokens_per_forward),
        _fmt(row.tokens_per_second, 1),
        _fmt(row.speedup),
        _fmt(row.speedup_vs_fp32_greedy),
        _fmt(row.speedup_ceiling),
        _fmt(row.accuracy, 3),
        _fmt(row.teacher_nll, 3),
        _fmt(row.agreement_prefix, 1),
        _fmt(row.token_f1, 3),
        _fmt(row.peak_memory_mb, 0),
    ]
    return "| " + " | ".join(cells) + " |"


def _summary_notes(report: BenchReport) -> list[str]:
    """The lines under the table: headline numbers and the cost-aware ``k_max``."""
    summary, notes = report.summary, []
    best = summary.mtp_speedup_same_precision
    if best:
        notes.append(
            f"MTP alone (same precision as greedy): best {best.name} at "
            f"{_fmt(best.value)}x, {_fmt(best.tokens_per_forward)} tokens/forward"
        )
    lossless = summary.lossless_speedup_same_precision
    if lossless:
        notes.append(f"Lossless mode: best {lossless.name} at {_fmt(lossless.value)}x")
    fastest = summary.fastest_vs_fp32_greedy
    if fastest:
        notes.append(
            f"Fastest configuration vs stock fp32 greedy: {fastest.name} "
            f"({fastest.precision}) at {_fmt(fastest.value)}x"
        )
    for choice in report.k_max_choice:
        notes.append(f"Cost-aware k_max at threshold {choice.threshold:g}: {choice.chosen_k_max}")
    return notes


def format_markdown(report: BenchReport | Mapping[str, Any]) -> str:
    """The report's methods as a Markdown table (plus the summary lines).

    Args:
      report: the output of ``run_benchmark``, or its JSON form (``BenchReport.to_dict``).

    Returns:
      Markdown text.
    """
    report = as_report(report)
    lines = [_TABLE_HEADER, "|" + "---|" * 12]
    lines += [_table_line(row) for row in report.methods]
    notes = _summary_notes(report)
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])) + "\n"


def write_report(report: BenchReport | Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the report as indented, strict JSON (parent directories created).

    Args:
      report: the output of ``run_benchmark``, or its JSON form.
      path: the file to write.
    """
    data = report.to_dict() if isinstance(report, BenchReport) else dict(report)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
