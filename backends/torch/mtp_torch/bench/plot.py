"""The benchmark's plot: quality against wall-clock speed-up, one series per method family.

matplotlib is imported inside ``plot_report`` only, so importing this module (or the rest of
the benchmark) does not load it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from mtp_torch.bench.report import BenchReport, MethodRow, as_report

__all__ = ["plot_report"]

# Plot styles per family (the row's ``family`` label).
_FAMILY_ORDER = ("greedy", "prompt_lookup", "static", "confadapt", "verify")
_SWEEPS = ("confadapt", "verify")  # families drawn as threshold sweeps, one line per k_max
_MARKERS = {"greedy": "*", "prompt_lookup": "D", "static": "s", "confadapt": "o", "verify": "^"}
_COLORS = {
    "greedy": "black",
    "prompt_lookup": "tab:gray",
    "static": "tab:red",
    "verify": "tab:green",
}

_Group = tuple[str, int | None, str]  # (family, k_max of a sweep, "base", "int8" or a kernel)


def _plot_groups(rows: Sequence[MethodRow], key: str) -> dict[_Group, list[MethodRow]]:
    """The rows that have ``key`` and a speed-up, grouped into plotted series."""
    groups: dict[_Group, list[MethodRow]] = {}
    for row in rows:
        if getattr(row, key) is None or row.speedup_vs_fp32_greedy is None:
            continue
        k_max = row.k_max if row.family in _SWEEPS else None
        precision = "int8" if row.precision == "int8" else "base"
        if len(row.precision.split()) > 1:  # "float32 auto": a kernel's rows
            precision = row.precision.split()[-1]
        groups.setdefault((row.family, k_max, precision), []).append(row)
    return groups


def _group_order(item: tuple[_Group, list[MethodRow]]) -> tuple[bool, int, int]:
    """Legend order: base precision first, then baselines, static, ConfAdapt, verify; k rising."""
    family, k_max, precision = item[0]
    rank = _FAMILY_ORDER.index(family) if family in _FAMILY_ORDER else len(_FAMILY_ORDER)
    return (precision != "base", rank, -1 if k_max is None else int(k_max))


def _point_tag(row: MethodRow) -> str | None:
    """The label written next to a point: the threshold of a sweep, ``k=`` of static k."""
    if row.family in _SWEEPS and row.threshold is not None:
        return f"{row.threshold:g}"
    if row.family == "static":
        return f"k={row.k_max}"
    return None


def _draw_series(axis: Any, group: _Group, members: list[MethodRow], key: str, color: Any) -> None:
    """Plot one series (sweeps joined strict to loose threshold) and tag its points."""
    family, k_max, precision = group
    members = sorted(members, key=lambda row: -(row.threshold or 0.0))
    name = family if k_max is None else f"{family} k_max={k_max}"
    if precision != "base":
        name += f" ({precision})"
    axis.plot(
        [row.speedup_vs_fp32_greedy for row in members],
        [getattr(row, key) for row in members],
        marker=_MARKERS.get(family, "o"),
        markersize=12 if family == "greedy" else 7,
        linestyle="-" if family in _SWEEPS and len(members) > 1 else "none",
        color=color,
        markerfacecolor="none" if precision != "base" else color,
        label=name,
    )
    for row in members:
        tag = _point_tag(row)
        if tag is not None:
            point = (row.speedup_vs_fp32_greedy, getattr(row, key))
            axis.annotate(tag, point, fontsize=7, xytext=(3, 3), textcoords="offset points")


def plot_report(report: BenchReport | Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Plot quality against wall-clock speed-up over stock greedy, baselines marked (PNG).

    One panel for the teacher NLL (lower is better) and, when prompts were graded, one for
    accuracy.  ConfAdapt rows are joined per ``k_max`` along the threshold sweep; int8 and
    skinny-kernel rows are drawn hollow.  matplotlib is imported here, not with the module.

    Args:
      report: the output of ``run_benchmark``, or its JSON form.
      path: the PNG file to write.
    """
    # Lazy: matplotlib is slow to import and only the plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = as_report(report)
    panels = [("teacher_nll", "teacher NLL per token (lower is better)")]
    if any(row.accuracy is not None for row in report.methods):
        panels.append(("accuracy", "accuracy"))
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        groups = _plot_groups(report.methods, key)
        ks = sorted({g[1] for g in groups if g[0] in _SWEEPS and g[1] is not None})
        for group, members in sorted(groups.items(), key=_group_order):
            color: Any = _COLORS.get(group[0])
            if group[0] in _SWEEPS and group[1] in ks:
                color = cmap(ks.index(group[1]) / max(len(ks) - 1, 1))
            _draw_series(axis, group, members, key, color)
        axis.axvline(1.0, color="black", linewidth=0.6, linestyle=":")
        axis.set_xlabel("wall-clock speed-up over stock greedy generate")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    meta = report.meta
    figure.suptitle(
        f"{meta.get('model', 'model')} on {meta.get('device', '?')}: "
        f"{meta.get('num_prompts', '?')} prompts x {meta.get('max_new_tokens', '?')} tokens",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=120)
    plt.close(figure)
