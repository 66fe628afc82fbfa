"""A sweep's summary: the table (CSV and markdown) of every point with intervals and paired differences, the
spread across seeds, the verdicts in sentences, and a plot with error bars."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import analysis
from .points import PointResult, short_key

MAX_LEGEND_LINES = 12      # more lines than this in sweep.png: its legend goes under the panels
LINE_STYLES = ("-", "--", ":", "-.")
PENDING = "pending"  # a study's point not computed yet, in a report written from its records (flows/study.py)

MD_METRICS = ("status", "bpd", "bpd_ci_low", "bpd_ci_high", "bpd_diff", "bpd_diff_ci_low", "bpd_diff_ci_high",
              "decoder_bpd", "fid_proxy", "fid_proxy_ci_low", "fid_proxy_ci_high", "fid_proxy_diff",
              "fid_proxy_diff_ci_low", "fid_proxy_diff_ci_high", "fid_proxy_floor", "sample_steps", "seconds",
              "cached", "exp_name", "reason")


def sweep_dir(root: Path, name: str) -> Path:
    return root / "reports" / "sweeps" / name


def fmt(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def markdown(frame: pd.DataFrame, columns: list[str]) -> str:
    cols = [c for c in columns if c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


def axis_columns(results: list[PointResult]) -> list[str]:
    keys = tuple(results[0].axes) if results else ()
    return [short_key(k, keys) for k in keys]


def _x_axis(results: list[PointResult]) -> str | None:
    """The key plotted along x: diffusion.T if it is an axis, else the first numeric axis, else the first."""
    keys = list(results[0].axes)
    if "diffusion.T" in keys:
        return "diffusion.T"
    numeric = [k for k in keys if k != analysis.SEED_KEY and all(isinstance(r.axes[k], (int, float)) for r in results)]
    return numeric[0] if numeric else (keys[0] if keys else None)


def plot(results: list[PointResult], path: Path, title: str) -> None:
    """bits/dim and FID-proxy along one axis, a line per combination of the others (seeds: one marker each,
    the line through their mean), error bars the points' own 95% intervals; failed points named below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    x_key = _x_axis(results)
    xs = list(dict.fromkeys(r.axes[x_key] for r in results))
    numeric = all(isinstance(x, (int, float)) for x in xs)
    pos = {x: (x if numeric else i) for i, x in enumerate(xs)}
    line_keys = [k for k in results[0].axes if k not in (x_key, analysis.SEED_KEY)]
    lines: dict[tuple, list[PointResult]] = {}
    for r in ok:
        lines.setdefault(tuple(r.axes[k] for k in line_keys), []).append(r)
    below = len(lines) > MAX_LEGEND_LINES  # many lines: one legend under both panels, in columns
    rows = -(-(len(lines) + 1) // 3) if below else 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + 0.17 * rows), constrained_layout=True)
    for ax, key, label in ((axes[0], "bpd", "negative ELBO (bits/dim)"), (axes[1], "fid_proxy", "FID-proxy")):
        for n, (line, members) in enumerate(lines.items()):
            name = ", ".join(str(v) for v in line) or "all points"
            _plot_line(ax, members, x_key, pos, key, line_style(n), name)
        if key == "fid_proxy" and ok:
            ax.axhline(min(r.metrics["fid_proxy_floor"] for r in ok), color="grey", ls=":", label="real-vs-real floor")
        _x_ticks(ax, xs, pos, numeric, short_key(x_key))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ok and not below:
            ax.legend(fontsize=8)
    if below:
        fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=7)
    failed = [r.label for r in results if r.status not in ("ok", PENDING)]
    pending = sum(r.status == PENDING for r in results)
    fig.suptitle(title + "\nerror bars: 95% intervals of each run (test images, noise, samples); markers: seeds"
                 + (f"\nfailed: {'; '.join(failed)}" if failed else "")
                 + (f"\n{pending} of {len(results)} points not run yet" if pending else ""), fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def line_style(n: int) -> dict[str, str]:
    """The n-th line of a plot: ten colours, then the same colours in the next line style."""
    return {"color": f"C{n % 10}", "ls": LINE_STYLES[n // 10 % len(LINE_STYLES)]}


def _plot_line(ax, members: list[PointResult], x_key: str, pos: dict, key: str, style: dict[str, str],
               name: str) -> None:
    color = style["color"]
    by_x: dict[Any, list[PointResult]] = {}
    for r in members:
        by_x.setdefault(r.axes[x_key], []).append(r)
    xs = sorted(by_x, key=lambda x: pos[x])
    ax.plot([pos[x] for x in xs], [np.mean([r.metrics[key] for r in by_x[x]]) for x in xs], **style,
            label=name)
    for x in xs:
        k = len(by_x[x])
        for j, r in enumerate(by_x[x]):  # seeds side by side: a small offset each (relative on a log axis)
            m, shift = r.metrics, 0.03 * (j - (k - 1) / 2)
            at = pos[x] * (1 + shift) if ax.get_xscale() == "log" or pos[x] > 1 else pos[x] + shift
            if f"{key}_ci_low" in m:
                err = [[m[key] - m[f"{key}_ci_low"]], [m[f"{key}_ci_high"] - m[key]]]
                ax.errorbar([at], [m[key]], yerr=err, fmt="o", color=color, ms=4, capsize=3, alpha=0.8)


def _x_ticks(ax, xs: list, pos: dict, numeric: bool, name: str) -> None:
    values = sorted(pos[x] for x in xs)
    if numeric and len(values) > 1 and values[0] > 0 and values[-1] / values[0] >= 5:
        ax.set_xscale("log")
    if len(values) == 1:  # one x: keep the seeds' small offsets small on screen
        v = values[0]
        ax.set_xlim(*((0.8 * v, 1.2 * v) if numeric and v > 0 else (v - 0.5, v + 0.5)))
    ax.set_xticks([pos[x] for x in xs], [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(name)


def write_all(root: Path, name: str, results: list[PointResult], header: str,
              reference: dict[str, Any] | None = None, out: Path | None = None, kind: str = "Sweep") -> dict[str, Any]:
    """summary.csv, summary.md (with verdicts and the seeds table), seeds.csv and sweep.png in `out` (default
    reports/sweeps/NAME); returns the paths and the table (`frame`) and verdicts for the caller."""
    out = out or sweep_dir(root, name)
    out.mkdir(parents=True, exist_ok=True)
    ref = analysis.reference_index(results, reference)
    frame = analysis.table(results, ref)
    seeds = analysis.seed_spread(results)
    verdicts = analysis.verdicts(results, frame, ref)
    files = {"csv": out / "summary.csv", "md": out / "summary.md", "plot": out / "sweep.png"}
    frame.to_csv(files["csv"], index=False)
    if not seeds.empty:
        files["seeds"] = out / "seeds.csv"
        seeds.to_csv(files["seeds"], index=False)
    plot(results, files["plot"], f"{kind.lower()} {name}")
    files["md"].write_text(report_markdown(name, header, results, frame, seeds, verdicts, ref, kind))
    return {"files": files, "frame": frame, "verdicts": verdicts, "reference": ref}


def report_markdown(name: str, header: str, results: list[PointResult], frame: pd.DataFrame, seeds: pd.DataFrame,
                    verdicts: list[str], ref: int | None, kind: str = "Sweep") -> str:
    ref_text = (f"Reference point: **{results[ref].label}**. Differences are point minus reference, paired: the "
                "same test images and noise draws for bits/dim, the same reference images for the FID-proxy; their "
                "intervals cover the estimator's noise, not training seeds." if ref is not None else
                "The reference point has not succeeded (or not run yet): no differences."
                if any(r.status == "ok" for r in results) else "No point succeeded: no reference, no differences.")
    parts = [f"# {kind} {name}", "", header, "", ref_text, ""]
    parts += [f"- {v}" for v in verdicts] + ([""] if verdicts else [])
    parts += [markdown(frame, [*axis_columns(results), "reference", *MD_METRICS]), ""]
    if not seeds.empty:
        parts += ["## Across training seeds", "", "sd across seeds (training noise) beside the mean within-run "
                  "95% half-width (estimator noise):", "", markdown(seeds, list(seeds.columns)), ""]
    parts += ["![bpd and FID-proxy with 95% intervals](sweep.png)", ""]
    return "\n".join(parts)


def publish_prefect(name: str, summary: dict[str, Any], header: str) -> None:
    """The table and the report (verdicts, plot inlined) as Prefect artifacts on the flow run's Artifacts tab."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    files, frame = summary["files"], summary["frame"]
    key = "sweep-" + "".join(c if c.isalnum() else "-" for c in name.lower())
    create_table_artifact([{k: fmt(v) for k, v in row.items()} for row in frame.to_dict("records")],
                          key=key + "-table", description=f"Sweep {name}: every point ({files['csv']})")
    png = base64.b64encode(files["plot"].read_bytes()).decode()
    body = files["md"].read_text().replace("](sweep.png)", f"](data:image/png;base64,{png})")
    create_markdown_artifact(body + f"\n\nFiles: `{files['md'].parent}`", key=key + "-summary",
                             description=f"Sweep {name}: verdicts, intervals and paired differences")
