"""Training objectives at the default budget: today's default against learned_range + hybrid and Min-SNR.

Three models train with the library on Fashion-MNIST at params.yaml's budget (same steps, seed, batch, lr, EMA):
    default   loss simple, variance fixed_small (today's defaults)
    hybrid    variance learned_range, loss hybrid (improved DDPM's L_hybrid, uniform t)
    min_snr   loss simple, fixed_small, loss_weighting min_snr (gamma from params.yaml)
Each EMA model is scored as `evaluate` scores it, on the same test images with the same noise and t draws
(common random numbers): the negative ELBO by the importance estimator at evaluate.bpd_passes (mean, 95%
interval, and the paired difference against `default` with a 95% t-interval over images), the decoder term,
and the FID-proxy of DDIM samples (and of ancestral samples on respaced steps, where the learned variance is
used) with bootstrap intervals and the paired bootstrap difference against `default` on the same reference.
These intervals cover the estimator's noise (images, draws, samples), not training's: one seed per model.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_objectives.py            # full run
    PYTHONPATH=. .venv/bin/python benchmarks/bench_objectives.py --steps 20 --bpd-passes 400 --n-fid 40 --quick
writes reports/benchmarks/objectives.json, objectives.md and one sample grid per model. Trained models are
kept under build/bench_objectives/ and reused when their checkpoint is complete.
"""

from __future__ import annotations

import argparse
import copy
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
from ddpm_core.data import from_model_range, load_dataset, to_model_range  # noqa: E402
from ddpm_core.diffusion import output_channels  # noqa: E402
from ddpm_core.elbo_mc import estimate_bound  # noqa: E402
from ddpm_core.fid import (FeaturizerConfig, classifier_featurize, fid_bootstrap, fid_features,  # noqa: E402
                           load_or_train_featurizer, report_from_features)
from ddpm_core.stats import paired_difference  # noqa: E402
from ddpm_core.sampling import sample as draw_samples  # noqa: E402
from ddpm_core.schedules import NoiseSchedule  # noqa: E402
from ddpm_core.train import train  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402
from pipeline.params import Params, bound_design, validate  # noqa: E402
from pipeline.reports import save_grid  # noqa: E402
from pipeline.stages import sample_compute, train_compute, train_config  # noqa: E402

CONFIGS = {
    "default": {},
    "hybrid": {"diffusion": {"variance": "learned_range"}, "train": {"loss": "hybrid"}},
    "min_snr": {"train": {"loss_weighting": "min_snr"}},
}


def params_for(name: str) -> Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in CONFIGS[name].items():
        raw[section].update(values)
    if ARGS.steps:
        raw["train"]["steps"] = ARGS.steps
    raw["train"]["checkpoint_every"] = max(raw["train"]["checkpoint_every"], 100)
    return validate(copy.deepcopy(raw))


def train_model(name: str, p: Params, images: torch.Tensor) -> tuple[torch.nn.Module, NoiseSchedule, dict]:
    torch.manual_seed(p.train.seed)
    net = build_unet(p.model.model_dump(), 1, 28, output_channels(1, p.diffusion.variance))
    schedule = NoiseSchedule.named(p.diffusion.schedule, p.diffusion.T)
    path = ARGS.work / f"{name}-{p.train.steps}.pt"
    start = time.perf_counter()
    c = train_compute(p)  # as the train stage: params' device and precision, resolved on this machine
    res = train(net, schedule, images, train_config(p, c), path, c.device, progress=False)
    seconds = time.perf_counter() - start
    info = {"train_steps": res.step, "train_seconds": seconds if res.resumed_from < res.step else None,
            "final_train_loss": float(res.losses[-max(1, len(res.losses) // 20):].mean())}
    return res.ema_model.eval(), schedule, info


def score_bpd(model, schedule, p: Params, data) -> dict:
    """The negative ELBO as `evaluate` computes it: the same images, noise and t draws for every model."""
    design = bound_design(p.evaluate, schedule.T)
    n = min(len(data.test_images), ARGS.bpd_passes // design.passes_per_image())
    pick = np.random.default_rng(p.evaluate.seed).permutation(len(data.test_images))[:n]
    start = time.perf_counter()
    device = next(model.parameters()).device  # the bound in fp32, on the device the model trained on
    est = estimate_bound(model, schedule, to_model_range(data.test_images[pick]).to(device), pick, design,
                         p.diffusion.variance, p.diffusion.objective, 250, p.evaluate.seed)
    t = est.total
    return {"bpd": t.mean, "bpd_se": t.stderr, "bpd_ci_low": t.ci_low, "bpd_ci_high": t.ci_high, "n_bpd": n,
            "bpd_network_passes": est.network_passes, "decoder_bpd": est.decoder_bpd,
            "terms_t_le_10_bpd": float(est.terms_bpd[:10].sum()), "prior_bpd": est.prior_bpd,
            "per_image_bpd": est.per_image.tolist(), "bpd_seconds": time.perf_counter() - start}


def score_samples(model, schedule, p: Params, sampler: str, steps: int, featurize, data, tag: str) -> dict:
    start = time.perf_counter()
    c = sample_compute(p)
    x = draw_samples(c.network(model), schedule, ARGS.n_fid, (1, 28, 28), seed=0, sampler=sampler, steps=steps,
                     eta=0.0, batch_size=250, variance=p.diffusion.variance, objective=p.diffusion.objective,
                     clip_x0=True, device=c.device, progress=False)
    seconds = time.perf_counter() - start
    images = from_model_range(x)
    save_grid(images[:64].numpy(), ARGS.out / f"objectives_{tag}.png")
    features = fid_features(featurize, images, data, ARGS.n_fid, seed=0)
    fid = report_from_features(features, 0, 200)
    return {**{k: float(v) for k, v in fid.items()}, "sample_seconds": seconds, "features": features}


def paired(a: list[float], b: list[float]) -> dict:
    """b - a per image: mean and 95% t-interval over images."""
    d = paired_difference(np.asarray(b), np.asarray(a))
    return {"diff": d.mean, "diff_se": d.stderr, "ci_low": d.ci_low, "ci_high": d.ci_high, "n": d.n}


def fid_paired(default: dict, other: dict) -> dict:
    """FID(other) - FID(default) on the shared reference, bootstrap 95% interval."""
    d = fid_bootstrap(other["features"].gen, other["features"].test, 200, 0, minus=default["features"].gen)
    return {"diff": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high}


def evaluate_one(name: str, p: Params, data, featurize) -> dict:
    print(f"{name}: training {p.train.steps} steps", flush=True)
    model, schedule, result = train_model(name, p, torch.from_numpy(data.train_images))
    print(f"{name}: {result}", flush=True)
    result.update(score_bpd(model, schedule, p, data))
    print(f"{name}: bpd {result['bpd']:.3f} +/- {result['bpd_se']:.3f}", flush=True)
    result["ddim"] = score_samples(model, schedule, p, "ddim", ARGS.ddim_steps, featurize, data, name)
    if name in ("default", "hybrid"):
        result["ancestral"] = score_samples(model, schedule, p, "ancestral", ARGS.ancestral_steps, featurize,
                                            data, f"{name}_ancestral")
    result["config"] = {k: v for k, v in p.flat().items() if k.split(".")[0] in ("diffusion", "train")}
    print(f"{name}: ddim {result['ddim']['fid_proxy']:.2f}, "
          f"ancestral {result.get('ancestral', {}).get('fid_proxy', float('nan')):.2f}", flush=True)
    return result


def fid_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    ci = f" ({r['fid_proxy_ci_low']:.2f} to {r['fid_proxy_ci_high']:.2f})" if "fid_proxy_ci_low" in r else ""
    d = r.get("vs_default")
    diff = f"; vs default {d['diff']:+.2f} ({d['ci_low']:+.2f} to {d['ci_high']:+.2f})" if d else ""
    return f"{r['fid_proxy']:.2f}{ci}{diff}"


def markdown(summary: dict) -> str:
    res = summary["results"]
    lines = ["| model | bpd (95% CI) | paired diff vs default (95% CI) | decoder bpd | terms t<=10 | "
             f"FID-proxy DDIM-{ARGS.ddim_steps} | FID-proxy ancestral-{ARGS.ancestral_steps} | "
             "final train loss | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        d = r.get("vs_default")
        diff = f"{d['diff']:+.3f} ({d['ci_low']:+.3f} to {d['ci_high']:+.3f})" if d else "-"
        secs = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "reused"
        lines.append(f"| {name} | {r['bpd']:.3f} ({r['bpd_ci_low']:.3f} to {r['bpd_ci_high']:.3f}) | {diff} | {r['decoder_bpd']:.3f} | "
                     f"{r['terms_t_le_10_bpd']:.3f} | {fid_cell(r['ddim'])} | {fid_cell(r.get('ancestral'))} | "
                     f"{r['final_train_loss']:.4f} | {secs} |")
    floor = res["default"]["ddim"]["fid_proxy_floor"]
    grids = " ".join(f"![{k}](objectives_{k}.png)" for k in res)
    return (f"# Training objectives at the default budget ({summary['steps']} steps, seed 0)\n\n"
            f"Command: `{summary['command']}`  \nMachine: {summary['machine']}\n\n"
            f"bits/dim: negative ELBO by `evaluate`'s importance estimator ({summary['bpd_passes']} network passes, "
            f"{summary['n_bpd']} test images, the same images, noise and t draws for every model); intervals are over "
            f"images and draws (the estimator's noise), one training seed per model. FID differences: bootstrap over "
            f"samples and the shared reference. "
            f"FID-proxy: {summary['n_fid']} samples against {summary['n_fid']} test images (real-vs-real floor "
            f"{floor:.2f}); featurizer test accuracy {summary['classifier_accuracy']:.3f}. `train s` is the wall time "
            f"of each run's training on a shared CPU (a run resumed from a checkpoint counts only its own steps): "
            f"not a speed comparison.\n\n"
            + "\n".join(lines) + f"\n\nDDIM grids: {grids}\n\nAncestral grids: "
            f"![default](objectives_default_ancestral.png) ![hybrid](objectives_hybrid_ancestral.png)\n")


def machine() -> str:
    return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end (shared CPU)")


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    ARGS.out.mkdir(parents=True, exist_ok=True)
    ARGS.work.mkdir(parents=True, exist_ok=True)
    data = load_dataset("fashion_mnist", None, False)
    feat, info = load_or_train_featurizer(ARGS.work / "featurizer.pt", data, FeaturizerConfig(epochs=1, seed=0))
    featurize = classifier_featurize(feat)
    results = {name: evaluate_one(name, params_for(name), data, featurize) for name in CONFIGS}
    for name in ("hybrid", "min_snr"):
        results[name]["vs_default"] = paired(results["default"]["per_image_bpd"], results[name]["per_image_bpd"])
        for kind in ("ddim", "ancestral"):
            if kind in results[name]:
                results[name][kind]["vs_default"] = fid_paired(results["default"][kind], results[name][kind])
    for r in results.values():
        for kind in ("ddim", "ancestral"):
            r.get(kind, {}).pop("features", None)
    summary = {"command": "PYTHONPATH=. .venv/bin/python benchmarks/bench_objectives.py " + " ".join(sys.argv[1:]),
               "machine": machine(), "steps": results["default"]["train_steps"],
               "n_bpd": results["default"]["n_bpd"], "bpd_passes": results["default"]["bpd_network_passes"],
               "n_fid": ARGS.n_fid, "classifier_accuracy": info["accuracy"],
               "results": results}
    stem = "objectives_quick" if ARGS.quick else "objectives"
    write_report(ARGS.out, stem, summary, markdown(summary), indent=2)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: params.yaml's train.steps)")
    ap.add_argument("--bpd-passes", type=int, default=8000, help="network passes for the negative ELBO")
    ap.add_argument("--n-fid", type=int, default=500, help="samples (and test images) for the FID-proxy")
    ap.add_argument("--ddim-steps", type=int, default=30)
    ap.add_argument("--ancestral-steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="write objectives_quick.* (a smoke test)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench_objectives")
    ARGS = ap.parse_args()
    main()
