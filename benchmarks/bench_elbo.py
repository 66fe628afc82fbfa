"""How tight is the negative ELBO at a fixed cost? The importance estimator against the all-T one.

On the model of the default `dvc repro` (build/model.pt; run it first), with the test images `evaluate` uses
(evaluate.seed's permutation):
  reference   all T terms on the first --ref-images images: the bound's value, its per-image sd, and from it
              the all-T estimator's standard error at the default budget (bpd_passes / T images);
  unbiased    the default importance design on the same images, --reps seeds: per image, the mean over seeds
              minus the all-T value, averaged over images with a 95% interval (0 if unbiased);
  budget      the default design at the default budget, 3 seeds on the same images: its reported standard
              error against the spread of its estimates (noise and t draws only);
  designs     other (exact_t, draws) splits of the same budget, once each, to show why the default is chosen;
  speed       seconds per network pass of both estimators, from the runs above (same process).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_elbo.py [--ref-images 96] [--reps 5]
writes reports/benchmarks/elbo.json and elbo.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import platform
import sys
import time

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402
from ddpm_core.data import to_model_range  # noqa: E402
from ddpm_core.elbo_mc import BoundDesign, estimate_bound  # noqa: E402
from ddpm_core.stats import mean_estimate  # noqa: E402
from pipeline.params import bound_design, load_params  # noqa: E402
from pipeline.stages import load_ema_model, load_prepared  # noqa: E402

OUT = ROOT / "reports" / "benchmarks"
DESIGNS = ((1, 1), (1, 3), (2, 6), (4, 4), (6, 10), (10, 6))  # (exact_t, draws); t = T is exact too


def run(net, schedule, data, design: BoundDesign, n: int, seed: int, p) -> dict:
    pick = np.random.default_rng(p.evaluate.seed).permutation(len(data.test_images))[:n]
    x0 = to_model_range(data.test_images[pick])
    start = time.perf_counter()
    est = estimate_bound(net, schedule, x0, pick, design, p.diffusion.variance, p.diffusion.objective,
                         p.evaluate.chunk_size, seed, progress=True)
    seconds = time.perf_counter() - start
    return {"exact_t": design.exact_t, "draws": design.draws, "images": n, "passes": est.network_passes,
            "seed": seed, "bpd": est.total.mean, "stderr": est.total.stderr, "ci_low": est.total.ci_low,
            "ci_high": est.total.ci_high, "decoder_bpd": est.decoder_bpd, "seconds": seconds,
            "ms_per_pass": 1000 * seconds / est.network_passes, "per_image": est.per_image.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-images", type=int, default=96)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    p = load_params(ROOT / "params.yaml")
    net, _, schedule = load_ema_model(torch.device("cpu"))
    data = load_prepared()
    T, budget = schedule.T, p.evaluate.bpd_passes
    default = bound_design(p.evaluate, T)
    n_default = budget // default.passes_per_image()
    ref = run(net, schedule, data, BoundDesign(T, 0), args.ref_images, p.evaluate.seed, p)
    per_image_sd = float(np.std(ref["per_image"], ddof=1))
    same = [run(net, schedule, data, default, args.ref_images, 10 + seed, p) for seed in range(args.reps)]
    per_image = np.mean([r["per_image"] for r in same], axis=0) - np.array(ref["per_image"])
    agreement = mean_estimate(per_image)
    reps = [run(net, schedule, data, default, n_default, seed, p) for seed in range(3)]
    designs = [run(net, schedule, data, d, min(len(data.test_images), budget // d.passes_per_image()), 100, p)
               for d in (BoundDesign(k, m) for k, m in DESIGNS)]
    means = np.array([r["bpd"] for r in reps])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "T": T, "budget_passes": budget, "default_design": [default.exact_t, default.draws],
        "reference": {k: v for k, v in ref.items() if k != "per_image"} | {"per_image_sd": per_image_sd},
        "all_t_stderr_at_budget": per_image_sd / np.sqrt(budget // T),
        "all_t_first_images_at_budget": float(np.mean(ref["per_image"][: budget // T])),
        "importance_reps": [{k: v for k, v in r.items() if k != "per_image"} for r in reps],
        "importance_spread_of_means": float(np.std(means, ddof=1)) if len(reps) > 1 else None,
        "importance_mean_reported_stderr": float(np.mean([r["stderr"] for r in reps])),
        "importance_minus_all_t_same_images": agreement.as_dict("diff") | {"images": args.ref_images,
                                                                             "seeds": args.reps},
        "designs": [{k: v for k, v in r.items() if k != "per_image"} for r in designs],
    }
    write_report(OUT, "elbo", result, markdown(result), indent=2)


def markdown(r: dict) -> str:
    ref, k, m = r["reference"], *r["default_design"]
    lines = [
        "# Negative ELBO: importance estimator against all T terms, at the same cost", "",
        f"Default model of `dvc repro` (T = {r['T']}), budget {r['budget_passes']} network passes, {r['machine']}. "
        "Command: `PYTHONPATH=. .venv/bin/python benchmarks/bench_elbo.py`.", "",
        f"- Reference, all T terms on {ref['images']} test images: **{ref['bpd']:.3f} bits/dim** "
        f"(95% CI {ref['ci_low']:.3f} to {ref['ci_high']:.3f}); per-image sd {ref['per_image_sd']:.3f}.",
        f"- All-T estimator at the budget ({r['budget_passes'] // r['T']} images, what `evaluate` reported before): "
        f"standard error **{r['all_t_stderr_at_budget']:.3f}** bits/dim (per-image sd / sqrt(images)); "
        f"on the first images of the permutation it gives {r['all_t_first_images_at_budget']:.3f}.",
        f"- Importance estimator at the budget (t <= {k} and t = T exact, {m} drawn, "
        f"{r['importance_reps'][0]['images']} "
        f"images, the same images for every seed), {len(r['importance_reps'])} seeds: mean reported standard error "
        f"**{r['importance_mean_reported_stderr']:.3f}**; spread (sd) of its estimates across seeds "
        f"{r['importance_spread_of_means'] or float('nan'):.3f}.",
    ]
    d = r["importance_minus_all_t_same_images"]
    lines.append(f"- Unbiasedness: on the reference's {d['images']} images, the importance estimate (mean of "
                 f"{d['seeds']} seeds) minus the all-T value, per image: {d['diff']:+.4f} bits/dim (95% CI "
                 f"{d['diff_ci_low']:+.4f} to {d['diff_ci_high']:+.4f}); an interval containing 0 is what an "
                 "unbiased estimator gives.")
    lines += ["", "Importance rows evaluate t <= `exact t` and t = T exactly (all-T: every t).", "",
              "| estimator | exact t | drawn t | images | passes | bits/dim | stderr | 95% CI | decoder | ms/pass |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [("all-T reference", ref)] + [(f"importance, seed {x['seed']}", x) for x in r["importance_reps"]]
    rows += [("importance, other split", x) for x in r["designs"]]
    for name, x in rows:
        lines.append(f"| {name} | {x['exact_t']} | {x['draws']} | {x['images']} | {x['passes']} | {x['bpd']:.3f} | "
                     f"{x['stderr']:.3f} | {x['ci_low']:.3f} to {x['ci_high']:.3f} | {x['decoder_bpd']:.3f} | "
                     f"{x['ms_per_pass']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
