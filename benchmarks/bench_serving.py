"""A bounded load test of the served generator on loopback: N clients posting at once for S seconds.

    python benchmarks/bench_serving.py                       # build/model.pt (after `dvc repro`), 8 clients, 60 s
    python benchmarks/bench_serving.py --clients 8 --seconds 60 --rows 8 --steps 30
    python benchmarks/bench_serving.py --smoke               # a tiny untrained model, 2 clients, 5 s (a check)
writes reports/benchmarks/serving.md and serving.json (--smoke: serving-smoke.md / .json).

The model is logged into a temporary MLflow store as evaluate logs it and served by `python -m pipeline.serve`
(MLflow's scoring server behind the request gate) on 127.0.0.1. First one client alone measures how many
network evaluations per second one request gets (what the cost limit DDPM_SERVE_MAX_EVALS should allow in
30 s, half of MLflow's 60 s request timeout: the slowest of 5 requests alone, x 30 s); then the clients run
together, each with its own seeds, and every answer is checked (HTTP 200 and the asked number of images;
anything else is an error). Requests/s come with a 95% interval over 5 equal windows of the run, latency
percentiles with bootstrap intervals. An oversize request's refusal time is measured too.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import json
import os
from pathlib import Path
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402

OUT = ROOT / "reports" / "benchmarks"
TARGET_S = 30.0  # a request at the limit should take at most this long alone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_model(store: Path, model_file: Path | None) -> str:
    """The model logged and registered in a store of its own; returns its models:/ URI."""
    import tempfile as tf

    import torch

    from ddpm_core.schedules import NoiseSchedule
    from ddpm_core.serving import save_eps_model
    from ddpm_core.unet import build_unet
    from pipeline import tracking

    os.environ["DDPM_PROJECT_ROOT"] = str(store)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tf.TemporaryDirectory() as tmp:
        eps = Path(tmp) / "eps_model.pt"
        if model_file is None:  # --smoke: a tiny untrained network on 8x8 images
            tiny = {"channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
                    "dropout": 0.0}
            meta = {"model": tiny, "image_shape": [1, 8, 8], "variance": "fixed_small", "objective": "eps",
                    "dataset": "digits", "sampling": {"sampler": "ddim", "steps": 10, "eta": 0.0, "clip_x0": True,
                                                      "batch_size": 250}}
            torch.manual_seed(0)
            save_eps_model(eps, build_unet(tiny, 1, 8), NoiseSchedule.named("linear", 50), meta)
        else:
            from pipeline.params import load_params
            from pipeline.stages import load_ema_model, sampling_defaults

            net, meta, schedule = load_ema_model(torch.device("cpu"), model_file)
            p = load_params(ROOT / "params.yaml")
            save_eps_model(eps, net, schedule, {**meta, "variance": p.diffusion.variance,
                                                "objective": p.diffusion.objective,
                                                "sampling": sampling_defaults(p, schedule.T)})
        ids = tracking.log_run("bench", {}, {}, ([], []), [], eps, {"run_name": "bench-serving"}, "ddpm-bench")
    return f"models:/ddpm-bench/{ids['model_version']}"


def serve(uri: str, store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow' / 'mlflow.db'}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "-m", uri, "-p", str(port)], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    end = time.time() + 300
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc, f"http://127.0.0.1:{port}/invocations"
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("the server did not answer /ping in 300 s")


def ask(url: str, seeds: list[int], steps: int) -> tuple[float, bool, str]:
    """(seconds, ok, error) of one request."""
    body = json.dumps({"inputs": {"seed": seeds}, "params": {"steps": steps}}).encode()
    start = time.perf_counter()
    try:
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            n = len(json.loads(r.read())["predictions"])
        ok, err = n == len(seeds), "" if n == len(seeds) else f"{n} images for {len(seeds)} seeds"
    except urllib.error.HTTPError as e:
        ok, err = False, f"HTTP {e.code}: {e.read()[:200]!r}"
    except OSError as e:
        ok, err = False, f"{type(e).__name__}: {e}"
    return time.perf_counter() - start, ok, err


def load(url: str, clients: int, seconds: float, rows: int, steps: int) -> list[tuple[float, float, bool, str]]:
    """Every request of `clients` threads posting back to back for `seconds`: (end time, latency, ok, error)."""
    stop, out, lock = time.perf_counter() + seconds, [], threading.Lock()

    def client(c: int) -> None:
        k = 0
        while time.perf_counter() < stop:
            seeds = [(c * 1_000_000 + k * rows + j) % 2**32 for j in range(rows)]
            latency, ok, err = ask(url, seeds, steps)
            with lock:
                out.append((time.perf_counter(), latency, ok, err))
            k += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return [(t - t0, lat, ok, err) for t, lat, ok, err in out]


def interval(values: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    m, se = float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    h = float(stats.t.ppf(0.975, len(values) - 1)) * se if len(values) > 1 else float("nan")
    return m, m - h, m + h


def percentile_ci(lat: np.ndarray, q: float, rng=np.random.default_rng(0)) -> tuple[float, float, float]:
    boot = [np.percentile(rng.choice(lat, len(lat)), q) for _ in range(1000)]
    return float(np.percentile(lat, q)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "build" / "model.pt", help="train's checkpoint to serve")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rows", type=int, default=8, help="images per request")
    ap.add_argument("--steps", type=int, default=30, help="sampling steps per request (network evaluations per image)")
    ap.add_argument("--smoke", action="store_true", help="tiny untrained model, 2 clients, 5 s")
    args = ap.parse_args(argv)
    if args.smoke:
        args.clients, args.seconds, args.steps = 2, 5.0, 10
    name = "serving-smoke" if args.smoke else "serving"
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        uri = log_model(store, None if args.smoke else args.model)
        proc, url = serve(uri, store, store / "serve.log")
        try:
            alone = [ask(url, list(range(args.rows)), args.steps) for _ in range(6)][1:]  # the first one warms up
            evals_s = np.array([args.rows * args.steps / lat for lat, ok, _ in alone if ok])
            started = time.perf_counter()
            refused = ask(url, list(range(1024)), args.steps)
            refused_s = time.perf_counter() - started
            done = load(url, args.clients, args.seconds, args.rows, args.steps)
        finally:
            proc.terminate()
            proc.wait(30)
    report(name, args, evals_s, refused, refused_s, done)
    return 0


def report(name, args, evals_s, refused, refused_s, done) -> None:
    ok = [d for d in done if d[2]]
    lat = np.array([d[1] for d in ok]) if ok else np.array([float("nan")])
    windows = np.histogram([d[0] for d in ok], bins=5, range=(0, max(args.seconds, 1e-9)))[0] / (args.seconds / 5)
    rps = interval(windows.astype(float))
    p50, p99 = percentile_ci(lat, 50), percentile_ci(lat, 99)
    ev = interval(evals_s) if len(evals_s) > 1 else (float("nan"),) * 3
    result = {"clients": args.clients, "seconds": args.seconds, "rows": args.rows, "steps": args.steps,
              "smoke": args.smoke, "requests": len(done), "errors": len(done) - len(ok),
              "error_examples": sorted({d[3] for d in done if not d[2]})[:5], "requests_per_s": rps,
              "images_per_s": [v * args.rows for v in rps], "latency_p50_s": p50, "latency_p99_s": p99,
              "alone_evals_per_s": ev, "alone_evals_per_s_slowest": float(evals_s.min()) if len(evals_s) else None,
              "suggested_max_evals": int(evals_s.min() * TARGET_S) if len(evals_s) else None,
              "oversize_refused": {"seconds": refused_s, "ok": refused[1], "error": refused[2][:200]},
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    f = lambda t: f"{t[0]:.3g} (95% CI {t[1]:.3g} to {t[2]:.3g})"  # noqa: E731
    lines = [f"# Serving load test{' (smoke: tiny untrained model)' if args.smoke else ''}", "",
             f"`python benchmarks/bench_serving.py{' --smoke' if args.smoke else ''} --clients {args.clients} "
             f"--seconds {args.seconds:g} --rows {args.rows} --steps {args.steps}` on {result['cores']} cores; "
             f"`python -m pipeline.serve` on 127.0.0.1; each request {args.rows} images x {args.steps} steps.", "",
             "| measure | value |", "|---|---|",
             f"| requests (errors) | {len(done)} ({result['errors']}) |",
             f"| requests/s, {args.clients} clients | {f(rps)} |",
             f"| images/s | {f(result['images_per_s'])} |",
             f"| latency p50 (s) | {f(p50)} |", f"| latency p99 (s) | {f(p99)} |",
             f"| one client alone: network evaluations/s | {f(ev)} |",
             f"| cost limit that the slowest of these requests alone finishes in {TARGET_S:.0f} s | "
             f"{result['suggested_max_evals']} |",
             f"| a 1024-row request refused in (s) | {refused_s:.3f} ({'served!' if refused[1] else refused[2][:60]}) |",
             ""]
    if result["error_examples"]:
        lines += ["Errors: " + "; ".join(result["error_examples"]), ""]
    write_report(OUT, name, result, "\n".join(lines), indent=2)


if __name__ == "__main__":
    sys.exit(main())
