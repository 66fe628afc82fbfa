"""What a study writes beside its sweep summary: the contrasts its claims rest on, three plots and a sample sheet
per trained model, all read back from the points' experiment commits.

A *model* is a point without its sampling keys (sample.*): the points of one model share the trained network
and its bits/dim (same evaluate.seed: same images and draws), and differ in the samples they draw.

Contrasts (contrasts.csv, contrasts.md): a minus b, where b differs from a in one axis only; each a paired
difference with its 95% interval (flows/analysis.py); bits/dim (and, where evaluate kept the t = T term per
image, bits/dim without it) once per model, FID-proxy at every sampling point. b is chosen among the values the
axis takes where every other axis is as in a:
    T         each T minus the next smaller one
    steps     each step count minus the largest of the same sampler (FID-proxy only)
    any other sampling axis (sample.*, e.g. sample.sampler)   each value minus the first (FID-proxy only)
    any other axis (schedule, a bundle such as training, seed, budget)   each value minus the grid's first value;
              the seed rows show how far training noise alone moves the same numbers
With a budget axis (an axis that sets train.steps), flows/study_budget.py adds each contrast's change between
budgets (budget_changes.csv, a section of contrasts.md) and a plot per claim against the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ddpm_core.stats import Estimate

from . import analysis, records, study_budget
from .points import SAMPLE_PREFIX, PointResult, short_key
from .records import SHEET_IMAGES
from .summary import fmt, markdown

if TYPE_CHECKING:
    from .study import Study

STEPS_KEY = "sample.steps"
SEED_KEY = analysis.SEED_KEY


# --- points as a table -----------------------------------------------------------------------------------
def axis_names(spec: "Study", axes: dict[str, Any]) -> dict[str, Any]:
    """A point's axes as the grid file names them: bundle keys folded back into the bundle's value name."""
    out = {}
    for axis in spec.grids[0]:
        if axis in spec.bundles:
            out[axis] = next((value for value, keys in spec.bundles[axis].items()
                              if all(axes.get(k) == v for k, v in keys.items())), None)
        else:
            out[short_key(axis, tuple(spec.grids[0]))] = axes.get(axis)
    return out


def model_of(spec: "Study", r: PointResult) -> tuple:
    return tuple((k, v) for k, v in axis_names(spec, r.axes).items() if not _is_sampling(spec, k))


def _is_sampling(spec: "Study", name: str) -> bool:
    """Whether the axis (by its table name) sets sampling keys only: a bundle counts when all its keys do."""
    axis = axis_of(spec).get(name, "")
    keys = {k for value in spec.bundles[axis].values() for k in value} if axis in spec.bundles else {axis}
    return bool(keys) and all(k.startswith(SAMPLE_PREFIX) for k in keys)


def model_label(model: tuple) -> str:
    return ", ".join(f"{k} {v}" if k in ("T", "seed", "budget") else str(v) for k, v in model)


# --- contrasts -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One contrast: a minus b, points that differ in axis `axis` only, for one metric, with its estimate."""

    axis: str
    metric: str
    a: PointResult
    b: PointResult
    est: Estimate | None


def _row(pair: Pair, spec: "Study") -> dict:
    """One contrast: the axes a and b share (sampling axes left out for bits/dim), a, b, a - b, its interval."""
    axis, metric, est = pair.axis, pair.metric, pair.est
    names_a, names_b = axis_names(spec, pair.a.axes), axis_names(spec, pair.b.axes)
    bound = metric in analysis.BPD_METRICS
    same = {k: v for k, v in names_a.items() if names_b.get(k) == v and not (bound and _is_sampling(spec, k))}
    row = {"axis": axis, "metric": metric, **same, "a": names_a[axis], "b": names_b[axis],
           "a_value": pair.a.metrics.get(metric), "b_value": pair.b.metrics.get(metric)}
    if est is None:
        return {**row, "diff": None, "ci_low": None, "ci_high": None, "verdict": "not comparable"}
    verdict = "a lower" if est.ci_high < 0 else "a higher" if est.ci_low > 0 else "no difference detected"
    return {**row, "diff": est.mean, "ci_low": est.ci_low, "ci_high": est.ci_high, "verdict": verdict}


def axis_of(spec: "Study") -> dict[str, str]:
    """Name in tables (bundle name, or the params key's short form) -> the grid file's axis."""
    keys = tuple(spec.grids[0])
    return {(a if a in spec.bundles else short_key(a, keys)): a for a in keys}


def estimate(metric: str, points: list[PointResult], weights: list[float]) -> Estimate | None:
    """sum_k w_k * metric(points[k]), paired (flows/analysis.py): per test image for bits/dim, a bootstrap with
    the shared reference images for the FID-proxy."""
    if metric in analysis.BPD_METRICS:
        return analysis.bpd_change(points, weights, metric)
    if len(points) == 2 and weights == [1.0, -1.0]:
        return analysis.fid_difference(points[0], points[1])
    return analysis.fid_change(points, weights)


def _pairs(spec: "Study", points: list[PointResult], name: str, pick_b, metric: str) -> list[Pair]:
    """Every point a against the point b that differs from it only in axis `name`, b's value chosen by
    pick_b(a's value, the values that axis takes where every other axis is as in a, in grid order). For bits/dim
    `points` has one point per model and the sampling axes are not compared: two models pair whichever of their
    points stand for them (a study part-way through may not have sampled both alike)."""
    axis = axis_of(spec)[name]
    order = {v: i for i, v in enumerate(dict.fromkeys(v for g in spec.grids for v in g.get(axis, [])))}
    bound = metric in analysis.BPD_METRICS  # a model's bound: whichever of its points stands for it

    def names_of(r: PointResult) -> dict[str, Any]:
        return {k: v for k, v in axis_names(spec, r.axes).items() if not (bound and _is_sampling(spec, k))}

    index, present = {}, {}
    for r in points:
        names = names_of(r)
        index[tuple(sorted((k, str(v)) for k, v in names.items()))] = r
        present.setdefault(_without(names, name), []).append(names[name])
    pairs = []
    for a in points:
        names = names_of(a)
        b_value = pick_b(names[name], sorted(present[_without(names, name)], key=lambda v: order.get(v, len(order))))
        if b_value is None or b_value == names[name]:
            continue
        b = index.get(tuple(sorted((k, str(b_value if k == name else v)) for k, v in names.items())))
        if b is not None:
            pairs.append(Pair(name, metric, a, b, estimate(metric, [a, b], [1.0, -1.0])))
    return pairs


def _without(names: dict[str, Any], name: str) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in names.items() if k != name))


def _first(value, values):
    return values[0] if values else None


def _next_smaller(value, values):
    smaller = [v for v in values if v < value]
    return max(smaller) if smaller else None


def _largest(value, values):
    return max(values) if values else None


RULES = {"T": _next_smaller, "steps": _largest}  # every other axis: each value minus the grid's first value


def metrics_of(spec: "Study", name: str, ok: list[PointResult]) -> tuple[str, ...]:
    """Sampling axes change only the samples: FID-proxy. Every other axis: bits/dim (and, where the points
    carry the t = T term per image, bits/dim without it), then the FID-proxy."""
    if _is_sampling(spec, name):
        return ("fid_proxy",)
    last = ("bpd_without_last_term",) if any(r.last_term_per_image for r in ok) else ()
    return ("bpd", *last, "fid_proxy")


def contrast_pairs(spec: "Study", results: list[PointResult]) -> list[Pair]:
    """Every axis's contrasts (see the module's doc), axes in grid order; bits/dim once per model."""
    ok = [r for r in results if r.status == "ok"]
    per_model = _one_point_per_model(spec, ok)
    pairs: list[Pair] = []
    for name in axis_of(spec):
        for metric in metrics_of(spec, name, ok):
            pairs += _pairs(spec, per_model if metric in analysis.BPD_METRICS else ok, name,
                            RULES.get(name, _first), metric)
    return pairs


def contrasts(spec: "Study", results: list[PointResult], pairs: list[Pair] | None = None) -> pd.DataFrame:
    """The contrasts as a table: axis, metric, the axes a and b share, a, b, their values, a - b, its interval."""
    rows = [_row(p, spec) for p in (contrast_pairs(spec, results) if pairs is None else pairs)]
    frame = pd.DataFrame(rows)
    names = [n for n in axis_of(spec) if n in frame.columns]
    return whole_axes(frame[["axis", "metric", *names, *[c for c in frame.columns if c not in ("axis", "metric",
                                                                                              *names)]]], names) \
        if rows else frame


def whole_axes(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Integer axis values stay integers (T 100, not 100.0) in columns that are empty on some rows (the axis's
    own contrasts): pandas makes such columns float."""
    for n in names:
        col = frame[n]
        if col.dtype.kind == "f" and (col.dropna() % 1 == 0).all():
            frame[n] = col.astype("Int64")
    return frame


def _one_point_per_model(spec: "Study", ok: list[PointResult]) -> list[PointResult]:
    """The model's point with the most sampling steps: every point of a model has the same bits/dim."""
    best: dict[tuple, PointResult] = {}
    for r in ok:
        key = model_of(spec, r)
        if key not in best or r.metrics.get("sample_steps", 0) > best[key].metrics.get("sample_steps", 0):
            best[key] = r
    return list(best.values())


def contrasts_markdown(name: str, frame: pd.DataFrame, note: str = "") -> str:
    parts = [f"# Study {name}: contrasts", "", *([note, ""] if note else []),
             "Each row: a minus b, where a and b differ in one axis only; paired (bits/dim: the same test images "
             "and noise draws; FID-proxy: bootstrap with the same reference images), with its 95% interval. The "
             "intervals cover the estimator's noise for the two trained models as they are; the `seed` rows show "
             "how far training noise alone moves the same numbers.", ""]
    if frame.empty:
        return "\n".join(parts + ["No contrasts: no two points differ in one axis.", ""])
    for (axis, metric), rows in frame.groupby(["axis", "metric"], sort=False):
        shared = [c for c in frame.columns[2:frame.columns.get_loc("a")] if c != axis and rows[c].notna().any()]
        table = rows[shared].copy()
        table["a - b"] = [f"{a} - {b}" for a, b in zip(rows["a"], rows["b"])]
        table["a"], table["b"] = rows["a_value"].map(fmt), rows["b_value"].map(fmt)
        table["difference (95% CI)"] = [f"{fmt(d)} ({fmt(lo)} to {fmt(hi)})" for d, lo, hi in
                                        zip(rows["diff"], rows["ci_low"], rows["ci_high"])]
        table["verdict"] = rows["verdict"]
        parts += [f"## {axis}: {metric}", "", markdown(table, list(table.columns)), ""]
    return "\n".join(parts)


# --- plots -----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(spec: "Study", model: dict[str, Any]) -> dict[str, Any]:
    """Colour by schedule, line style by the first bundle that is neither the budget nor a sampling axis."""
    schedules = ["linear", "cosine", "sigmoid", "quadratic"]
    budget = study_budget.budget_axis(spec)
    bundle = next((b for b in spec.bundles if b != budget and not _is_sampling(spec, b)), None)
    kinds = list(spec.bundles[bundle]) if bundle else []
    color = f"C{schedules.index(model['schedule']) if model.get('schedule') in schedules else 4}"
    ls = ["-", "--", ":", "-."][kinds.index(model[bundle]) % 4] if bundle in model else "-"
    return {"color": color, "ls": ls}


def _log_ticks(ax, values: list) -> None:
    """A log axis labelled with the grid's own values (10, 25, 100), not powers of ten."""
    ax.set_xscale("log")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()


def _budget_alpha(spec: "Study", names: dict[str, Any]) -> dict[str, float]:
    """Lighter lines for every budget but the largest ({} in a study at one budget)."""
    budget = study_budget.budget_axis(spec)
    if budget is None or names.get(budget) is None:
        return {}
    largest = max(study_budget.budget_steps(spec, v) for g in spec.grids for v in g[study_budget.axis_key(spec)])
    return {"alpha": 1.0 if study_budget.budget_steps(spec, names[budget]) == largest else 0.45}


def _label(spec: "Study", items) -> str:
    """Axis values for a legend: the budget named ('budget 400'), the others by their value alone."""
    budget = study_budget.budget_axis(spec)
    return ", ".join(f"{k} {v}" if k == budget else str(v) for k, v in items)


def _sampler(spec: "Study", r: PointResult) -> str | None:
    """The values of the point's sampling axes other than the step count (e.g. 'dpm_solver++'), or None."""
    names = axis_names(spec, r.axes)
    values = [str(v) for k, v in names.items() if _is_sampling(spec, k) and k != "steps"]
    return ", ".join(values) or None


def _err(m: dict, key: str) -> list[list[float]]:
    return [[m[key] - m[f"{key}_ci_low"]], [m[f"{key}_ci_high"] - m[key]]]


def plot_bpd_vs_T(spec: "Study", results: list[PointResult], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    lines: dict[tuple, list[tuple[dict, PointResult]]] = {}
    for r in _one_point_per_model(spec, [r for r in results if r.status == "ok"]):
        names = dict(model_of(spec, r))
        lines.setdefault(tuple((k, v) for k, v in names.items() if k not in ("T", "seed")), []).append((names, r))
    for line, members in lines.items():
        style = _style(spec, dict(line))
        Ts = sorted({n["T"] for n, _ in members})
        means = [np.mean([r.metrics["bpd"] for n, r in members if n["T"] == T]) for T in Ts]
        ax.plot(Ts, means, label=_label(spec, line), **style, **_budget_alpha(spec, dict(line)))
        for n, r in members:
            shift = 1 + 0.04 * (n.get("seed", 0) or 0)
            ax.errorbar([n["T"] * shift], [r.metrics["bpd"]], yerr=_err(r.metrics, "bpd"), fmt="o", ms=4,
                        capsize=3, color=style["color"], alpha=0.8)
    _log_ticks(ax, sorted({n["T"] for members in lines.values() for n, _ in members}))
    ax.set_xlabel("T (diffusion steps)")
    ax.set_ylabel("negative ELBO (bits/dim)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{spec.name}: bits/dim against T\n95% intervals (test images, noise); one marker per seed",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fid_vs_steps(spec: "Study", results: list[PointResult], path: Path) -> None:
    """FID-proxy against sampling steps: a panel per T (a row per budget), a series per model and sampler."""
    plt = _plt()
    ok = [r for r in results if r.status == "ok"]
    Ts = sorted({axis_names(spec, r.axes).get("T") for r in ok}, key=lambda v: (v is None, v))
    budget = study_budget.budget_axis(spec)
    budgets = sorted({axis_names(spec, r.axes)[budget] for r in ok}, key=lambda v: study_budget.budget_steps(spec, v)) \
        if budget else [None]
    samplers = list(dict.fromkeys(_sampler(spec, r) for r in ok))
    cols, rows = max(1, len(Ts)), max(1, len(budgets))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), sharey=True, constrained_layout=True,
                             squeeze=False)
    for panels, B in zip(axes, budgets):
        for ax, T in zip(panels, Ts):
            series: dict[tuple, list[PointResult]] = {}
            for r in ok:
                names = axis_names(spec, r.axes)
                if names.get("T") == T and (budget is None or names[budget] == B):
                    series.setdefault((model_of(spec, r), _sampler(spec, r)), []).append(r)
            for (model, sampler), members in series.items():
                names = dict(model)
                members.sort(key=lambda r: r.metrics["sample_steps"])
                seed = names.get("seed", 0) or 0
                xs = [r.metrics["sample_steps"] * (1 + 0.04 * seed) for r in members]
                label = ", ".join([str(v) for k, v in model if k not in ("T", budget)] + ([sampler] if sampler else []))
                ax.errorbar(xs, [r.metrics["fid_proxy"] for r in members],
                            yerr=np.hstack([_err(r.metrics, "fid_proxy") for r in members]), capsize=3, ms=4,
                            fmt="os^vD"[samplers.index(sampler) % 5], label=label, alpha=0.9 if seed == 0 else 0.5,
                            **_style(spec, names))
            if ok:
                ax.axhline(min(r.metrics["fid_proxy_floor"] for r in ok), color="grey", ls=":",
                           label="real-vs-real floor")
            _log_ticks(ax, sorted({r.metrics["sample_steps"] for members in series.values() for r in members}))
            ax.set_title(f"T = {T}" + (f", {budget} {B}" if budget else ""), fontsize=9)
            ax.set_xlabel("sampling steps (respaced)")
            ax.grid(alpha=0.3)
        panels[0].set_ylabel("FID-proxy")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{spec.name}: FID-proxy against sampling steps, per trained model (95% intervals)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bpd_per_t(spec: "Study", curves: dict[tuple, np.ndarray], path: Path) -> None:
    """The bound's terms against t, one panel per T, the first seed of every schedule and bundle value."""
    plt = _plt()
    Ts = sorted({dict(m).get("T") for m in curves})
    fig, axes = plt.subplots(1, max(1, len(Ts)), figsize=(4.2 * max(1, len(Ts)), 4.2), sharey=True,
                             constrained_layout=True, squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for model, terms in curves.items():
            names = dict(model)
            if names.get("T") != T:
                continue
            t = np.arange(1, len(terms) + 1)
            label = _label(spec, [(k, v) for k, v in model if k not in ("T", "seed")])
            ax.plot(t, np.maximum(terms, 1e-6), label=label,
                    **_style(spec, names), **_budget_alpha(spec, names))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"T = {T}", fontsize=9)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("bits/dim of the term L_{t-1} (L_0 at t = 1)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{spec.name}: where the bound lives (exact at small t and t = T, per geometric bin between)",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_sheet(panels: list[tuple[str, np.ndarray]], path: Path, title: str) -> None:
    """One row of 6x6 sample grids, one per point of a model (e.g. per step count)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), constrained_layout=True,
                             squeeze=False)
    for ax, (label, images) in zip(axes[0], panels):
        ax.imshow(_tile(images[:SHEET_IMAGES]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tile(images: np.ndarray, pad: int = 1) -> np.ndarray:
    n, c, h, w = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img[0]
    return out


# --- everything ------------------------------------------------------------------------------------------
def write_all(root: Path, spec: "Study", results: list[PointResult], out: Path, note: str = "") -> dict[str, Path]:
    """contrasts.csv / .md (`note` under the title), budget_changes.csv and a plot per claim where a budget axis
    has two budgets, the plots and a sample sheet per model, in `out`; points not "ok" are left out."""
    ok = [r for r in results if r.status == "ok"]
    files = {"contrasts_csv": out / "contrasts.csv", "contrasts_md": out / "contrasts.md",
             "bpd_vs_T": out / "bpd_vs_T.png", "fid_vs_steps": out / "fid_vs_steps.png",
             "bpd_per_t": out / "bpd_per_t.png"}
    pairs = contrast_pairs(spec, results)
    frame = contrasts(spec, results, pairs)
    frame.to_csv(files["contrasts_csv"], index=False)
    changes = study_budget.changes(spec, pairs)  # empty at one budget: the tables are as they always were
    across = "\n" + study_budget.changes_markdown(spec, changes) if not changes.empty else ""
    files["contrasts_md"].write_text(contrasts_markdown(spec.name, frame, note) + across)
    if not changes.empty:
        files["budget_changes_csv"] = out / "budget_changes.csv"
        changes.to_csv(files["budget_changes_csv"], index=False)
        files |= study_budget.plot_claims(spec, pairs, out)
    if any("T" in dict(model_of(spec, r)) for r in ok):  # a study whose grid has no T axis has no such plot
        plot_bpd_vs_T(spec, results, files["bpd_vs_T"])
    else:
        del files["bpd_vs_T"]
    plot_fid_vs_steps(spec, results, files["fid_vs_steps"])
    curves = {}
    for r in _one_point_per_model(spec, ok):
        model = model_of(spec, r)
        if dict(model).get("seed", 0) in (0, None):
            curves[model] = pd.read_csv(io.StringIO(records.bpd_per_t(root, r)))["bpd"].to_numpy()
    plot_bpd_per_t(spec, curves, files["bpd_per_t"])
    sheets = out / "samples"
    sheets.mkdir(exist_ok=True)
    by_model: dict[tuple, list[PointResult]] = {}
    for r in ok:
        by_model.setdefault(model_of(spec, r), []).append(r)
    for model, members in by_model.items():
        panels = []
        samplers = list(dict.fromkeys(_sampler(spec, r) for r in members))
        for r in sorted(members, key=lambda r: (samplers.index(_sampler(spec, r)), r.metrics["sample_steps"])):
            images = records.sheet_images(root, r)
            m, sampler = r.metrics, _sampler(spec, r)
            panels.append((f"{sampler + ' ' if sampler else ''}{m['sample_steps']:.0f} steps: "
                           f"FID-proxy {m['fid_proxy']:.1f} "
                           f"({m['fid_proxy_ci_low']:.1f}-{m['fid_proxy_ci_high']:.1f})", images))
        name = "-".join(str(v) for _, v in model)
        files[f"samples_{name}"] = sheets / f"{name}.png"
        bpd = members[0].metrics
        sample_sheet(panels, files[f"samples_{name}"], f"{model_label(model)}: bits/dim {bpd['bpd']:.3f} "
                     f"({bpd['bpd_ci_low']:.3f}-{bpd['bpd_ci_high']:.3f})")
    return files
