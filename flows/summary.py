"""A sweep's summary: one table (CSV and markdown) of every point, and bits/dim and FID-proxy against T."""

from __future__ import annotations

import base64
import csv
from pathlib import Path
from typing import Any

from .points import PointResult

COLUMNS = ("schedule", "T", "status", "bpd", "prior_bpd", "decoder_bpd", "fid_proxy", "fid_proxy_floor",
           "kid_proxy", "classifier_accuracy", "n_fid", "sample_seconds", "final_train_loss", "seconds", "cached",
           "exp_name", "mlflow_run_id", "reason")
MD_COLUMNS = ("schedule", "T", "status", "bpd", "prior_bpd", "decoder_bpd", "fid_proxy", "fid_proxy_floor",
              "sample_seconds", "seconds", "cached", "exp_name", "reason")


def sweep_dir(root: Path, name: str) -> Path:
    return root / "reports" / "sweeps" / name


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def sorted_results(results: list[PointResult]) -> list[PointResult]:
    return sorted(results, key=lambda r: (r.schedule, r.T))


def write_csv(results: list[PointResult], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in sorted_results(results):
            w.writerow({k: ("" if v is None else v) for k, v in r.row().items()})


def markdown_table(results: list[PointResult]) -> str:
    lines = ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    for r in sorted_results(results):
        row = r.row()
        lines.append("| " + " | ".join(fmt(row[k]).replace("|", "/") for k in MD_COLUMNS) + " |")
    return "\n".join(lines)


def plot(results: list[PointResult], path: Path, title: str) -> None:
    """bits/dim and FID-proxy against T, one line per schedule (failed points left out, named below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    Ts = sorted({r.T for r in results})
    for ax, key, label in ((axes[0], "bpd", "negative ELBO (bits/dim)"), (axes[1], "fid_proxy", "FID-proxy")):
        for schedule in sorted({r.schedule for r in ok}):
            pts = sorted((r.T, r.metrics[key]) for r in ok if r.schedule == schedule and key in r.metrics)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=schedule)
        if key == "fid_proxy":
            floors = [r.metrics["fid_proxy_floor"] for r in ok if "fid_proxy_floor" in r.metrics]
            if floors:
                ax.axhline(min(floors), color="grey", ls=":", label="real-vs-real floor")
        if len(Ts) > 1 and Ts[-1] / max(Ts[0], 1) >= 5:
            ax.set_xscale("log")
        ax.set_xticks(Ts, [str(t) for t in Ts])
        ax.minorticks_off()
        ax.set_xlabel("T (diffusion steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ok:
            ax.legend()
    failed = [f"{r.schedule} T={r.T}" for r in results if r.status != "ok"]
    fig.suptitle(title + (f"\nfailed: {', '.join(failed)}" if failed else ""), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(root: Path, name: str, results: list[PointResult], header: str) -> dict[str, Path]:
    out = sweep_dir(root, name)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "summary.csv", "md": out / "summary.md", "plot": out / "sweep.png"}
    write_csv(results, files["csv"])
    plot(results, files["plot"], f"sweep {name}")
    files["md"].write_text(f"# Sweep {name}\n\n{header}\n\n{markdown_table(results)}\n\n![bpd and FID-proxy "
                           f"against T](sweep.png)\n")
    return files


def publish_prefect(name: str, results: list[PointResult], files: dict[str, Path], header: str) -> None:
    """The table and the plot as Prefect artifacts, shown on the flow run's Artifacts tab."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = "sweep-" + "".join(c if c.isalnum() else "-" for c in name.lower())
    create_table_artifact([{k: fmt(v) for k, v in r.row().items()} for r in sorted_results(results)],
                          key=key + "-table", description=f"Sweep {name}: every point ({files['csv']})")
    png = base64.b64encode(files["plot"].read_bytes()).decode()
    create_markdown_artifact(f"# Sweep {name}\n\n{header}\n\n![sweep plot](data:image/png;base64,{png})\n\n"
                             f"{markdown_table(results)}\n\nFiles: `{files['md'].parent}`",
                             key=key + "-summary", description=f"Sweep {name}: bits/dim and FID-proxy against T")
