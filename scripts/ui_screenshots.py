"""Take the README's MLflow UI screenshots with headless Chromium (Playwright driving Debian's /usr/bin/chromium).

    bash scripts/mlflow-ui.sh &                 # in the project whose runs are shown; stop it by its pid after
    python scripts/ui_screenshots.py --url http://127.0.0.1:5000 --sweep schedules [--live RUN_ID] [--out docs]

writes OUT/mlflow-runs.png (the experiment's runs table, the sweep's children expanded, with bpd and its interval
columns), OUT/mlflow-compare.png (the compare view of the sweep's children) and, with --live (a run that is
training now), OUT/mlflow-live-train-loss.png (its train_loss chart). MLflow 3.17's UI picks the GenAI or model
training view from its own switch (remembered by the browser, GenAI at first), so every page is opened with
?workflowType=machine_learning. Needs `pip install playwright` (no browser download: it drives /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
import tempfile

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODE = "workflowType=machine_learning"
METRICS = ["bpd", "bpd_ci_low", "bpd_ci_high", "fid_proxy", "fid_proxy_ci_low", "fid_proxy_ci_high"]
PARAMS = ["diffusion.schedule", "diffusion.T"]


def close_assistant(page) -> None:
    """The 'MLflow Assistant' side panel takes a third of the width."""
    close = page.locator("button[data-component-id='mlflow.assistant.chat_panel.close']")
    try:
        close.wait_for(timeout=15_000)
    except Exception:  # no assistant in this UI
        return
    close.click()
    page.wait_for_timeout(500)


def set_column(page, name: str, on: bool) -> None:
    """Tick or untick a column in the Columns popover (a checkable tree), found through its search box."""
    page.get_by_placeholder("Search columns").fill(name)
    node = page.locator(".du-bois-light-tree-treenode").filter(
        has=page.locator(".du-bois-light-tree-title").get_by_text(name, exact=True)).first
    box = node.locator(".du-bois-light-tree-checkbox")
    if ("du-bois-light-tree-checkbox-checked" in (box.get_attribute("class") or "")) != on:
        box.click()


def choose_columns(page) -> None:
    page.get_by_role("button", name="Columns").click()
    for name in ["Dataset", "Source", "Models"]:  # default attribute columns, off: room for the metrics
        set_column(page, name, False)
    for name in PARAMS + METRICS:
        set_column(page, name, True)
    page.keyboard.press("Escape")
    page.wait_for_timeout(1000)


def runs_table(page, url: str, experiment_id: str, sweep: str, out: Path) -> list[str]:
    page.goto(f"{url}/#/experiments/{experiment_id}/runs?{MODE}")
    page.wait_for_selector(f"text=sweep-{sweep}", timeout=120_000)
    close_assistant(page)
    choose_columns(page)
    row = page.get_by_role("row").filter(has_text=f"sweep-{sweep}").first
    row.locator("button, [role=button]").first.click()  # expand the parent: its children below it
    page.wait_for_timeout(2000)
    page.screenshot(path=str(out / "mlflow-runs.png"))
    return []


def compare(page, url: str, experiment_id: str, run_ids: list[str], out: Path) -> None:
    ids = ",".join(f'"{r}"' for r in run_ids)
    page.goto(f"{url}/#/compare-runs?runs=[{ids}]&experiments=[\"{experiment_id}\"]&{MODE}")
    page.wait_for_selector("text=Parallel Coordinates Plot", timeout=120_000)
    close_assistant(page)
    metrics = page.locator(".du-bois-light-select").nth(1)  # the plot's metrics: bpd and fid_proxy
    for remove in metrics.locator("[aria-label='close'], .du-bois-light-select-selection-item-remove").all():
        remove.click()
    for name in ("bpd", "fid_proxy"):
        metrics.click()
        page.keyboard.type(name)
        page.wait_for_timeout(500)
        page.keyboard.press("Enter")  # the first match, which is the name itself
    page.keyboard.press("Escape")
    page.wait_for_timeout(3000)
    page.screenshot(path=str(out / "mlflow-compare.png"))


def live_chart(page, url: str, experiment_id: str, run_id: str, out: Path) -> None:
    page.goto(f"{url}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{MODE}")
    page.wait_for_selector("text=train_loss", timeout=120_000)
    close_assistant(page)
    page.get_by_placeholder("Search metric charts").fill("train_loss")  # the one chart, full width
    page.wait_for_timeout(5000)
    page.screenshot(path=str(out / "mlflow-live-train-loss.png"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:5000")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow/mlflow.db", help="the store the UI shows")
    ap.add_argument("--experiment", default="ddpm")
    ap.add_argument("--sweep", required=True, help="the sweep whose children are shown and compared")
    ap.add_argument("--live", help="the id of a run that is training now")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    import mlflow
    from playwright.sync_api import sync_playwright

    client = mlflow.MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    parent = client.search_runs([exp.experiment_id], f"tags.sweep = '{args.sweep}' and tags.`mlflow.runName` = "
                                f"'sweep-{args.sweep}'", max_results=1)[0]
    children = [r.info.run_id for r in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")]
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(profile, executable_path="/usr/bin/chromium", headless=True,
                                                       args=FLAGS, viewport={"width": 1600, "height": 900})
        page = browser.new_page()
        if args.live:
            live_chart(page, args.url, exp.experiment_id, args.live, args.out)
        runs_table(page, args.url, exp.experiment_id, args.sweep, args.out)
        compare(page, args.url, exp.experiment_id, children, args.out)
        browser.close()
    print(f"screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
