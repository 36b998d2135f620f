"""The benchmark report's outputs: the Markdown table with its summary lines, and the JSON file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtp_torch.bench.report import (
    MIN_CREDITED_TOKENS_PER_FORWARD,
    BenchReport,
    Headline,
    MethodRow,
    as_report,
)

__all__ = ["format_markdown", "write_report"]


def _fmt(value: object, digits: int = 2) -> str:
    """A table cell: ``-`` for missing, floats to ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_TABLE_HEADER = (
    "| method | precision | tok/fwd | tok/s | speed-up [spread] | vs static_1 [spread] | "
    "vs stock greedy | ceiling | accuracy | teacher NLL | prefix | token F1 | peak MB |"
)
_TABLE_COLUMNS = 13


def _with_spread(value: float | None, spread: Sequence[float] | None) -> str:
    """``1.23 [1.10-1.31]``; ``-`` when missing."""
    if value is None:
        return "-"
    if spread is None:
        return _fmt(value)
    return f"{value:.2f} [{spread[0]:.2f}-{spread[1]:.2f}]"


def _table_line(row: MethodRow) -> str:
    """One Markdown table line of a row."""
    cells = [
        row.name,
        str(row.precision),
        _fmt(row.tokens_per_forward),
        _fmt(row.tokens_per_second, 1),
        _with_spread(row.speedup, row.speedup_spread),
        _with_spread(row.speedup_vs_static1, row.speedup_vs_static1_spread),
        _with_spread(row.speedup_vs_fp32_greedy, row.speedup_vs_fp32_greedy_spread),
        _fmt(row.speedup_ceiling),
        _fmt(row.accuracy, 3),
        _fmt(row.teacher_nll, 3),
        _fmt(row.agreement_prefix, 1),
        _fmt(row.token_f1, 3),
        _fmt(row.peak_memory_mb, 0),
    ]
    return "| " + " | ".join(cells) + " |"


def _headline_text(line: Headline) -> str:
    """``name at 1.23x [1.10-1.31], 1.40 tokens/forward`` plus a noise verdict."""
    text = f"{line.name} at {_with_spread(line.value, line.spread)}x"
    if line.tokens_per_forward is not None:
        text += f", {_fmt(line.tokens_per_forward)} tokens/forward"
    if line.within_noise:
        text += " (within noise: the per-round spread covers 1.0)"
    return text


def _skipped_note(rows: Sequence[MethodRow]) -> str | None:
    """Says how many generated tokens the teacher NLL column leaves out, and why; ``None``
    when it scored them all."""
    counts = [(row.name, row.teacher_nll_skipped_tokens) for row in rows]
    counts = [(name, count) for name, count in counts if count]
    if not counts:
        return None
    total = sum(count for _, count in counts)
    per_row = ", ".join(f"{name}: {count}" for name, count in counts)
    return (
        f"Teacher NLL leaves out {total} generated tokens ({per_row}): they are outside the "
        "teacher's vocabulary (the teacher has another tokenizer), so that column scores the "
        "rest only"
    )


def _machine_note(machine: Any) -> str | None:
    """The CPU and its ISA flags beside the figures (reports written before they were recorded
    have neither: no line)."""
    if not isinstance(machine, Mapping) or not machine.get("cpu"):
        return None
    load = machine.get("load_average_at_start")
    return (
        f"Machine: {machine['cpu']}, {machine.get('cpu_count')} cores, "
        f"torch threads {machine.get('torch_threads')}; ISA: {machine.get('isa') or 'none listed'}"
        + ("" if load is None else f"; 1-minute load average at the start {load:g}")
    )


def _summary_notes(report: BenchReport) -> list[str]:
    """The lines under the table: MTP's own gain, the kernel's, and the cost-aware ``k_max``."""
    summary, notes = report.summary, []
    best = summary.mtp_speedup_same_precision
    if best:
        notes.append(f"MTP's own gain (vs static_1, same model and kernel): {_headline_text(best)}")
    else:
        notes.append(
            "MTP's own gain: none to credit, no MTP row decodes "
            f"{MIN_CREDITED_TOKENS_PER_FORWARD:g} tokens per forward pass or more"
        )
    lossless = summary.lossless_speedup_same_precision
    if lossless:
        notes.append(f"Lossless mode (vs static_1): {_headline_text(lossless)}")
    kernel = summary.kernel_speedup
    if kernel:
        plan = report.meta.get("kernel_plan")
        notes.append(
            f"The kernel's own gain ({plan or kernel.precision}) vs stock greedy: "
            f"{_headline_text(kernel)}"
        )
    fastest = summary.fastest_vs_fp32_greedy
    if fastest:
        notes.append(
            f"Fastest configuration vs stock fp32 greedy: {fastest.name} "
            f"({fastest.precision}) at {_with_spread(fastest.value, fastest.spread)}x"
        )
    skipped = _skipped_note(report.methods)
    if skipped:
        notes.append(skipped)
    for choice in report.k_max_choice:
        notes.append(f"Cost-aware k_max at threshold {choice.threshold:g}: {choice.chosen_k_max}")
    machine = _machine_note(report.meta.get("machine"))
    if machine:
        notes.append(machine)
    for label, curve in (("stock", report.cost_curve), ("kernel", report.kernel_cost_curve)):
        if curve is not None and curve.measured_seconds:
            first = curve.measured_seconds[0]
            ratios = " ".join(
                f"{n}:{s / first:.2f}"
                for n, s in zip(curve.num_tokens, curve.measured_seconds, strict=True)
            )
            shape = ", 1 token + n-1 mask rows" if curve.mask_rows else ""
            notes.append(
                f"Pass cost t(n)/t(1), {label}{shape}, t(1) = {first * 1e3:.1f} ms: {ratios}"
            )
    return notes


def format_markdown(report: BenchReport | Mapping[str, Any]) -> str:
    """The report's methods as a Markdown table (plus the summary lines).

    Args:
      report: the output of ``run_benchmark``, or its JSON form (``BenchReport.to_dict``).

    Returns:
      Markdown text.
    """
    report = as_report(report)
    lines = [_TABLE_HEADER, "|" + "---|" * _TABLE_COLUMNS]
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
