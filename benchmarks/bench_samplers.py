"""FID-proxy against network evaluations: ancestral, DDIM and DPM-Solver++ 2M on one trained model.

Every configuration (sampler x evaluations) draws --n samples from the same x_T seeds (sample(..., seed=0): batch b
starts from the same x_T whatever the sampler), scored in the FID-proxy features `evaluate` uses, against the
same --n test images. Reported per configuration: FID-proxy with its 95% bootstrap interval (samples and reference
resampled), the paired difference against DDIM at 30 evaluations (today's default) with its 95% interval
(ddpm_core.fid.fid_bootstrap(..., minus=, paired_rows=True): the shared reference resampled once for both sides,
and sample i of both configurations, which start from the same x_T, resampled together), and the seconds of
sampling.
The goal check: DPM-Solver++ 2M at 10 evaluations minus DDIM at 30; it holds when that interval includes 0 or
lies below it. Intervals cover the sampling noise (samples, reference images), not training's (one model).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_samplers.py --n 1000      # the default model, build/model.pt
    PYTHONPATH=. .venv/bin/python benchmarks/bench_samplers.py --tiny        # smoke: a tiny digits model, n = 40
writes reports/benchmarks/samplers.md, samplers.json, samplers.png and sample grids of the goal pair
(samplers_tiny.* with --tiny). Seconds are wall time of sampling in this process, one configuration after the
other: compare them only within one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import platform
import sys
import time

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402
from ddpm_core.data import ImageData, from_model_range, load_dataset  # noqa: E402
from ddpm_core.fid import (FeaturizerConfig, FidFeatures, classifier_featurize, fid_bootstrap,  # noqa: E402
                           fid_features, load_or_train_featurizer)
from ddpm_core.sampling import max_steps, sample  # noqa: E402
from ddpm_core.schedules import NoiseSchedule  # noqa: E402
from ddpm_core.train import train  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402
from pipeline.params import validate  # noqa: E402
from pipeline.reports import _figure, save_grid  # noqa: E402
from pipeline.stages import featurizer_config, load_ema_model, train_config  # noqa: E402

# name: (sampler, order, eta); the default run compares the first three
SAMPLERS = {"ancestral": ("ancestral", 2, 0.0), "ddim": ("ddim", 2, 0.0), "dpm2m": ("dpm_solver++", 2, 0.0),
            "dpm3m": ("dpm_solver++", 3, 0.0), "dpm2m_sde": ("dpm_solver++", 2, 1.0)}
LABELS = {"ancestral": "ancestral", "ddim": "DDIM (eta 0)", "dpm2m": "DPM-Solver++ 2M", "dpm3m": "DPM-Solver++ 3M",
          "dpm2m_sde": "DPM-Solver++ 2M SDE"}
BASELINE = ("ddim", 30)      # today's default sample stage
GOAL = ("dpm2m", 10)         # the goal: no worse than the baseline at a third of the evaluations
TINY = {"data": {"dataset": "digits"}, "diffusion": {"T": 100},
        "model": {"channels": 16, "channel_mults": [1, 2], "attention_resolutions": [4]},
        "train": {"steps": 60, "batch_size": 64, "checkpoint_every": 60, "threads": 1}}


def tiny_model(work: Path):
    """A digits model trained here in seconds (--tiny), its schedule and data, and a digits featurizer."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        raw[section].update(values)
    p = validate(raw)
    data = load_dataset("digits", None, False)
    torch.manual_seed(p.train.seed)
    net = build_unet(p.model.model_dump(), 1, 8)
    schedule = NoiseSchedule.named(p.diffusion.schedule, p.diffusion.T)
    res = train(net, schedule, torch.from_numpy(data.train_images), train_config(p), work / "tiny_model.pt",
                progress=False)
    feat, info = load_or_train_featurizer(work / "tiny_featurizer.pt", data, FeaturizerConfig(epochs=1, seed=0),
                                          progress=False)
    return res.ema_model.eval(), schedule, p, data, feat, info


def default_model(args):
    """build/model.pt (or --model) with the data and featurizer of the same `dvc repro`."""
    p = validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    net, meta, schedule = load_ema_model(torch.device("cpu"), args.model)
    with np.load(args.data) as z:
        data = ImageData(str(z["name"]), z["train_images"], z["train_labels"], z["test_images"], z["test_labels"])
    feat, info = load_or_train_featurizer(args.featurizer, data, featurizer_config(p), train_missing=False)
    return net, schedule, p, data, feat, info, meta


def draw(net, schedule, p, data, name: str, steps: int, n: int, batch: int) -> tuple[torch.Tensor, float]:
    sampler, order, eta = SAMPLERS[name]
    start = time.perf_counter()
    x = sample(net, schedule, n, data.image_shape, seed=0, sampler=sampler, steps=steps, eta=eta, batch_size=batch,
               variance=p.diffusion.variance, objective=p.diffusion.objective, clip_x0=True, progress=False,
               order=order)
    return from_model_range(x), time.perf_counter() - start


def score(features: FidFeatures, base: FidFeatures | None, reps: int) -> dict:
    """FID-proxy with its interval, and minus the baseline's: the same reference, and row i of both from the same
    x_T (a bootstrap paired on both sides)."""
    fid = fid_bootstrap(features.gen, features.test, reps, 0)
    out = {"fid_proxy": fid.mean, "fid_proxy_ci_low": fid.ci_low, "fid_proxy_ci_high": fid.ci_high}
    if base is not None:
        d = fid_bootstrap(features.gen, features.test, reps, 0, minus=base.gen, paired_rows=True)
        out |= {"minus_baseline": d.mean, "minus_baseline_ci_low": d.ci_low, "minus_baseline_ci_high": d.ci_high}
    return out


def run_all(net, schedule, p, data, featurize, args) -> dict:
    """Every configuration, the baseline first; features of each are scored against the same reference."""
    top = {name: max_steps(SAMPLERS[name][0], schedule.T) for name in args.samplers}
    configs = [BASELINE] + [(s, k) for s in args.samplers for k in args.steps if k <= top[s] and (s, k) != BASELINE]
    results, base = {}, None
    for name, steps in configs:
        images, seconds = draw(net, schedule, p, data, name, steps, args.n, args.batch_size)
        features = fid_features(featurize, images, data, args.n, seed=0)
        base = base or features
        r = {"sampler": name, "evaluations": steps, "seconds": seconds, "n": args.n,
             **score(features, None if (name, steps) == BASELINE else base, args.reps)}
        results[f"{name}-{steps}"] = r
        if (name, steps) in (BASELINE, GOAL):
            save_grid(images[:64].numpy(), args.out / f"{args.stem}_{name}_{steps}.png")
        print(f"{name} {steps:>4} evaluations: FID-proxy {r['fid_proxy']:.2f} ({r['fid_proxy_ci_low']:.2f} to "
              f"{r['fid_proxy_ci_high']:.2f}), {seconds:.1f} s", flush=True)
    floor = fid_bootstrap(base.train, base.test, args.reps, 1)
    return {"results": results, "floor": {"fid_proxy": floor.mean, "ci_low": floor.ci_low, "ci_high": floor.ci_high}}


def goal_sentence(summary: dict) -> str:
    g = summary["results"].get(f"{GOAL[0]}-{GOAL[1]}")
    if g is None:
        return "The goal pair was not run."
    held = g["minus_baseline_ci_low"] <= 0 or g["minus_baseline_ci_high"] <= 0
    verdict = ("holds: the interval includes 0 or lies below it" if held else
               "does not hold: the interval lies above 0")
    return (f"Goal: {LABELS[GOAL[0]]} at {GOAL[1]} evaluations minus DDIM at {BASELINE[1]}: "
            f"{g['minus_baseline']:+.2f} (95% CI {g['minus_baseline_ci_low']:+.2f} to "
            f"{g['minus_baseline_ci_high']:+.2f}), paired over the same {g['n']} x_T and {g['n']} reference images; "
            f"the goal {verdict}.")


def markdown(summary: dict) -> str:
    res, args = summary["results"], summary["args"]
    lines = ["| sampler | network evaluations | FID-proxy (95% CI) | minus DDIM-30 (95% CI) | seconds |",
             "|---|---|---|---|---|"]
    order = {name: k for k, name in enumerate(SAMPLERS)}
    for r in sorted(res.values(), key=lambda r: (order[r["sampler"]], r["evaluations"])):
        d = (f"{r['minus_baseline']:+.2f} ({r['minus_baseline_ci_low']:+.2f} to {r['minus_baseline_ci_high']:+.2f})"
             if "minus_baseline" in r else "(baseline)")
        lines.append(f"| {LABELS[r['sampler']]} | {r['evaluations']} | {r['fid_proxy']:.2f} "
                     f"({r['fid_proxy_ci_low']:.2f} to {r['fid_proxy_ci_high']:.2f}) | {d} | {r['seconds']:.1f} |")
    f = summary["floor"]
    return (f"# FID-proxy against network evaluations ({summary['model']})\n\n"
            f"Command: `{summary['command']}`  \nMachine: {summary['machine']}\n\n"
            f"{args['n']} samples per configuration from the same x_T seeds, against {args['n']} test images in the "
            f"FID-proxy features (classifier test accuracy {summary['classifier_accuracy']:.3f}); x_0 clipped to "
            f"[-1, 1] for every sampler; DPM-Solver++ on diffusers' linspace grid. Intervals: bootstrap over samples "
            f"and reference images ({args['reps']} replicates); differences are paired twice: the same reference "
            f"images, and "
            f"sample i of both configurations starts from the same x_T (they are resampled together). "
            f"Real-vs-real floor at this n: {f['fid_proxy']:.2f} ({f['ci_low']:.2f} to {f['ci_high']:.2f}). "
            f"One trained model: the intervals cover sampling noise, not training's.\n\n"
            + "\n".join(lines) + f"\n\n{goal_sentence(summary)}\n\n![FID-proxy against evaluations]({args['stem']}.png)"
            f"\n\nSamples: ![DDIM-30]({args['stem']}_ddim_30.png) "
            f"![DPM-Solver++ 2M, 10]({args['stem']}_dpm2m_10.png)\n")


def plot(summary: dict, path: Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    res = summary["results"]
    for k, name in enumerate(dict.fromkeys(r["sampler"] for r in res.values())):
        rows = sorted((r for r in res.values() if r["sampler"] == name), key=lambda r: r["evaluations"])
        x, y = [r["evaluations"] for r in rows], np.array([r["fid_proxy"] for r in rows])
        err = np.array([[r["fid_proxy"] - r["fid_proxy_ci_low"] for r in rows],
                        [r["fid_proxy_ci_high"] - r["fid_proxy"] for r in rows]])
        ax.errorbar(x, y, yerr=err, fmt="o-", ms=4, capsize=3, color=f"C{k}", label=LABELS[name])
    base = res[f"{BASELINE[0]}-{BASELINE[1]}"]
    ax.axhspan(base["fid_proxy_ci_low"], base["fid_proxy_ci_high"], color="0.85", zorder=0,
               label=f"DDIM-{BASELINE[1]} (default) 95% CI")
    ax.axhline(summary["floor"]["fid_proxy"], color="k", lw=0.8, ls="--", label="real-vs-real floor")
    ticks = sorted({r["evaluations"] for r in res.values()})
    ax.set(xscale="log", xlabel="network evaluations", ylabel="FID-proxy (95% CI)", ylim=(0, None),
           title=f"FID-proxy against network evaluations, n = {summary['args']['n']}")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine() -> str:
    return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="samples per configuration (and reference test images)")
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100], help="network evaluations")
    ap.add_argument("--samplers", nargs="+", default=["ancestral", "ddim", "dpm2m"], choices=list(SAMPLERS))
    ap.add_argument("--model", type=Path, default=ROOT / "build" / "model.pt")
    ap.add_argument("--data", type=Path, default=ROOT / "build" / "data.npz")
    ap.add_argument("--featurizer", type=Path, default=ROOT / "build" / "featurizer.pt")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--reps", type=int, default=200, help="bootstrap replicates")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke run: a digits model trained here, n = 40")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench_samplers")
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.steps, args.reps = min(args.n, 40), [s for s in args.steps if s <= 10] or [5, 10], 20
    args.stem = "samplers_tiny" if args.tiny else "samplers"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        net, schedule, p, data, feat, info = tiny_model(args.work)
        model = f"tiny digits model, T = {schedule.T}, {p.train.steps} training steps"
    else:
        net, schedule, p, data, feat, info, meta = default_model(args)
        model = f"{args.model.name}: {meta['dataset']}, {p.diffusion.schedule} T = {schedule.T}"
    with torch.no_grad():
        summary = run_all(net, schedule, p, data, classifier_featurize(feat), args)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/bench_samplers.py " + " ".join(argv or sys.argv[1:])
    summary |= {"command": command,
                "machine": machine(), "model": model, "classifier_accuracy": info["accuracy"],
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    summary["goal"] = goal_sentence(summary)
    write_report(args.out, args.stem, summary, markdown(summary), indent=2)
    plot(summary, args.out / f"{args.stem}.png")
    print(summary["goal"])
    return summary


if __name__ == "__main__":
    main()
