"""A study over training budgets: every claim's contrast at each budget, how it changes between budgets, and a
plot per claim of the contrast against the budget (the second edition of the schedule x T x objective study).

The budget axis is the grid axis that sets train.steps: a bundle (`budget: {400: {train.steps: 400}, ...}`,
which may set more keys that change with it) or train.steps itself. Each contrast a - b of study_report.py is
found at every budget (the same other axes, the same a and b); between consecutive budgets B1 < B2 (in
training steps) its change is

    (a - b at B2) - (a - b at B1) = a2 - b2 - a1 + b1,

paired as the contrasts are: bits/dim per test image over the images all four points share (the same
evaluate.seed and bound settings: the same images, and the same noise in the exact terms, at both budgets; the
drawn t follow each model's own proposal), the FID-proxy by a bootstrap that resamples the shared reference
images once for all four points. The samples are resampled independently, although all points draw x_T from
the same sample.seed: that correlation is left out, so there the interval is conservative. Like every interval
of a study, these cover the estimator's noise for the trained networks as they are, not training noise: the
`seed` rows show that one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .summary import fmt, line_style, markdown

if TYPE_CHECKING:
    from .study import Study
    from .study_report import Pair

BUDGET_KEY = "train.steps"
VALUE_COLUMNS = ("a", "b", "budget_from", "budget_to", "diff_from", "diff_from_ci_low", "diff_from_ci_high",
                 "diff_to", "diff_to_ci_low", "diff_to_ci_high", "change", "change_ci_low", "change_ci_high",
                 "verdict")


def _keys(spec: "Study", axis: str) -> set[str]:
    return {k for value in spec.bundles[axis].values() for k in value} if axis in spec.bundles else {axis}


def budget_axis(spec: "Study") -> str | None:
    """The table name of the axis that sets train.steps, or None (a study at one budget)."""
    from .study_report import axis_of

    return next((name for name, axis in axis_of(spec).items() if BUDGET_KEY in _keys(spec, axis)), None)


def axis_key(spec: "Study") -> str:
    """The grid file's name of the budget axis (the bundle's name, or train.steps)."""
    from .study_report import axis_of

    return axis_of(spec)[budget_axis(spec)]


def budget_steps(spec: "Study", value: Any) -> int:
    """Training steps of a value of the budget axis."""
    axis = axis_key(spec)
    return int(spec.bundles[axis][value][BUDGET_KEY] if axis in spec.bundles else value)


def by_budget(spec: "Study", pairs: list["Pair"]) -> dict[tuple, dict[Any, "Pair"]]:
    """The contrasts grouped by what they compare, across budgets: (axis, metric, the axes a and b share except
    the budget, a, b) -> {budget value: pair}. Empty without a budget axis; the budget's own rows left out."""
    from .study_report import _row

    name = budget_axis(spec)
    groups: dict[tuple, dict[Any, Pair]] = {}
    for p in pairs if name is not None else ():
        if p.axis == name:
            continue
        row = _row(p, spec)
        shared = tuple((k, row[k]) for k in row if k not in ("axis", "metric", name, "a", "b") and k not in
                       ("a_value", "b_value", "diff", "ci_low", "ci_high", "verdict"))
        groups.setdefault((p.axis, p.metric, shared, row["a"], row["b"]), {})[row[name]] = p
    return groups


def changes(spec: "Study", pairs: list["Pair"]) -> pd.DataFrame:
    """One row per contrast and pair of consecutive budgets: a - b at both, the change and its interval."""
    from .study_report import axis_of, estimate, whole_axes

    rows = []
    for (axis, metric, shared, a, b), at in by_budget(spec, pairs).items():
        budgets = sorted(at, key=lambda v: budget_steps(spec, v))
        for lo, hi in zip(budgets, budgets[1:]):
            p1, p2 = at[lo], at[hi]
            est = estimate(metric, [p2.a, p2.b, p1.a, p1.b], [1.0, -1.0, -1.0, 1.0])
            row = {"axis": axis, "metric": metric, **dict(shared), "a": a, "b": b, "budget_from": lo, "budget_to": hi,
                   **_estimate_columns("diff_from", p1.est), **_estimate_columns("diff_to", p2.est),
                   **_estimate_columns("change", est)}
            row["verdict"] = ("not comparable" if est is None else "a - b rises" if est.ci_low > 0 else
                              "a - b falls" if est.ci_high < 0 else "no change detected")
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    names = [n for n in axis_of(spec) if n in frame.columns]  # the shared axes in grid order
    return whole_axes(frame[["axis", "metric", *names, *VALUE_COLUMNS]], names)


def _estimate_columns(prefix: str, est) -> dict[str, float | None]:
    if est is None:
        return {prefix: None, f"{prefix}_ci_low": None, f"{prefix}_ci_high": None}
    return {prefix: est.mean, f"{prefix}_ci_low": est.ci_low, f"{prefix}_ci_high": est.ci_high}


def changes_markdown(spec: "Study", frame: pd.DataFrame) -> str:
    """The section of contrasts.md on budgets (empty text when there is nothing to compare)."""
    if frame.empty:
        return ""
    parts = ["# Across training budgets", "",
             f"Each row: the contrast a - b at two budgets ({budget_axis(spec)}, in grid values) and its change "
             "(a - b at the larger) - (a - b at the smaller), paired: bits/dim over the test images and noise "
             "all four points share; FID-proxy by a bootstrap with the shared reference images resampled once "
             "(the samples independently, though all share x_T seeds: conservative). 95% intervals of the "
             "estimator's noise, not of training noise (see the seed rows).", ""]
    for (axis, metric), rows in frame.groupby(["axis", "metric"], sort=False):
        shared = [c for c in frame.columns[2:frame.columns.get_loc("a")] if c != axis and rows[c].notna().any()]
        table = rows[shared].copy()
        table["a - b"] = [f"{a} - {b}" for a, b in zip(rows["a"], rows["b"])]
        table["budgets"] = [f"{lo} -> {hi}" for lo, hi in zip(rows["budget_from"], rows["budget_to"])]
        for col, title in (("diff_from", "at the first"), ("diff_to", "at the second"), ("change", "change")):
            table[f"{title} (95% CI)"] = [_ci(d, lo, hi) for d, lo, hi in
                                          zip(rows[col], rows[f"{col}_ci_low"], rows[f"{col}_ci_high"])]
        table["verdict"] = rows["verdict"]
        parts += [f"## {axis}: {metric}, across budgets", "", markdown(table, list(table.columns)), ""]
    return "\n".join(parts)


def _ci(d, lo, hi) -> str:
    return f"{fmt(d)} ({fmt(lo)} to {fmt(hi)})" if d is not None and not pd.isna(d) else ""


PANEL_COLUMNS = 4  # claim plots: panels a row


def claim_panels(spec: "Study", groups: dict[tuple, dict], axis: str) -> list[tuple[str, str, str, list[tuple[str, dict]]]]:
    """The panels of claim_AXIS_vs_budget.png: (metric, sampling setting, what a - b is, [(line label,
    {budget: pair})]).

    A metric measured on samples gets a panel per sampling setting (sampler and steps, where the contrast holds
    them fixed), so each panel has a line per model, not one per model and setting; a line's label is the rest
    of what its two points share (and a - b where the panel holds several). `groups`: by_budget's."""
    from .study_report import _is_sampling, axis_of

    sampling = {name for name in axis_of(spec) if _is_sampling(spec, name)}
    panels: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for (name, metric, shared, a, b), at in groups.items():
        if name != axis:
            continue
        setting = ", ".join(f"{k} {v}" for k, v in shared if k in sampling)
        panels.setdefault((metric, setting), []).append((shared, a, b, at))
    out = []
    for (metric, setting), lines in panels.items():
        contrasts = list(dict.fromkeys(f"{a} - {b}" for _, a, b, _ in lines))
        several = len(contrasts) > 1  # e.g. steps: 10 - 100 and 25 - 100
        out.append((metric, setting, "a - b" if several else contrasts[0],
                    [(", ".join([f"{k} {v}" for k, v in shared if k not in sampling] + ([f"{a} - {b}"] if several else [])),
                      at) for shared, a, b, at in lines]))
    return out


def plot_claims(spec: "Study", pairs: list["Pair"], out: Path) -> dict[str, Path]:
    """claim_AXIS_vs_budget.png for every contrasted axis but the budget: a panel per metric (and sampling
    setting, for the FID-proxy), the contrast a - b with its 95% interval against training steps, a line per
    comparison, coloured alike in every panel, with one legend under the panels."""
    from .study_report import _log_ticks, _plt

    plt = _plt()
    files = {}
    groups = by_budget(spec, pairs)
    for axis in dict.fromkeys(key[0] for key in groups):
        panels = claim_panels(spec, groups, axis)
        labels = list(dict.fromkeys(label for *_, lines in panels for label, _ in lines))
        cols = min(len(panels), PANEL_COLUMNS)
        rows = -(-len(panels) // cols)
        legend_rows = -(-len(labels) // 2)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows + 0.5 + 0.16 * legend_rows),
                                 constrained_layout=True, squeeze=False)
        shared_y: dict[str, Any] = {}
        for ax, (metric, setting, contrast, lines) in zip(axes.flat, panels):
            if metric in shared_y:
                ax.sharey(shared_y[metric])  # one metric's panels on one scale
            shared_y.setdefault(metric, ax)
            _draw_panel(ax, spec, lines, labels)
            _log_ticks(ax, sorted({budget_steps(spec, v) for _, at in lines for v in at}))
            ax.set_ylabel(f"{metric}: {contrast}")
            ax.set_title(f"{metric}, {setting}" if setting else metric, fontsize=9)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        handles = [plt.Line2D([], [], marker="o", ms=3, lw=1, **line_style(n)) for n in range(len(labels))]
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=7)
        fig.suptitle(f"{spec.name}: {axis} contrast against the training budget (paired 95% intervals; "
                     "estimator noise, not training noise)", fontsize=9)
        files[f"claim_{axis}"] = out / f"claim_{axis}_vs_budget.png"
        fig.savefig(files[f"claim_{axis}"], dpi=110)
        plt.close(fig)
    return files


def _draw_panel(ax, spec: "Study", lines: list[tuple[str, dict]], labels: list[str]) -> None:
    for i, (label, at) in enumerate(lines):
        budgets = sorted(at, key=lambda v: budget_steps(spec, v))
        shift = 1 + 0.06 * (i - (len(lines) - 1) / 2) / max(1, len(lines))  # side by side, not on top
        ests = [at[v].est for v in budgets]
        ax.errorbar([budget_steps(spec, v) * shift for v in budgets], [e.mean if e else np.nan for e in ests],
                    yerr=[[e.mean - e.ci_low if e else 0 for e in ests], [e.ci_high - e.mean if e else 0 for e in ests]],
                    fmt="o", **line_style(labels.index(label)), ms=3, capsize=3, lw=1, alpha=0.85)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("training steps")
    ax.grid(alpha=0.3)
