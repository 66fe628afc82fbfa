"""How much of a study model's bound is its last term (t = T), and cosine - linear without it, paired.

    python scripts/study_last_term.py [--study schedule-T-objective] [--out reports/studies/NAME/last_term.csv]

For every model of the study (the point with the most sampling steps, first seed), the t = T term
L_{T-1} = KL(q(x_{T-1} | x_T, x_0) || p(x_{T-1} | x_T)) is evaluated exactly on the same test images the
study's evaluate used (evaluate.seed picks them), one noise draw per image (seeded per image id), and
subtracted from that image's bound estimate (reports/bpd_per_image.csv of the experiment). Both are unbiased
per image, so "bound without t = T" is too, and cosine - linear of it is a paired difference over images.
The trained networks are read from the experiments' DVC outputs (build/model.pt), nothing is retrained.

For the first edition only (it wrote reports/studies/schedule-T-objective/last_term.csv, and needs that study's
experiments). Since issue 23, evaluate keeps each image's t = T term from the bound's own draw
(bpd_last_term in metrics.json, a last_term column in bpd_per_image.csv), and a study's contrasts include
bits/dim without it (metric bpd_without_last_term): the second edition needs no separate script.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm_core.data import to_model_range  # noqa: E402
from ddpm_core.diffusion import q_sample  # noqa: E402
from ddpm_core.elbo import vb_terms_bpd  # noqa: E402
from ddpm_core.stats import mean_estimate, paired_difference  # noqa: E402
from flows.points import read_exp_file  # noqa: E402
from pipeline.stages import load_ema_model  # noqa: E402


def load_net(blob: bytes):
    """A study model's EMA network, meta and schedule from its experiment's build/model.pt bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.pt").write_bytes(blob)
        return load_ema_model(torch.device("cpu"), Path(tmp) / "model.pt")


@torch.no_grad()
def last_terms(net, meta, schedule, images: np.ndarray, ids: np.ndarray, seed: int) -> np.ndarray:
    out = []
    for start in range(0, len(ids), 250):
        x0 = to_model_range(images[start:start + 250])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed * 7919 + int(i)))
                             for i in ids[start:start + 250]])
        t = torch.full((len(x0),), schedule.T - 1, dtype=torch.long)
        out.append(vb_terms_bpd(net, schedule, x0, q_sample(schedule, x0, t, noise), t,
                                meta["diffusion"]["variance"], meta["diffusion"]["objective"]).double().numpy())
    return np.concatenate(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="schedule-T-objective")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    folder = ROOT / "reports" / "studies" / args.study
    rows = [r for r in csv.DictReader((folder / "summary.csv").open()) if r["status"] == "ok"]
    models: dict[tuple, dict] = {}
    for r in rows:
        key = (r["schedule"], int(r["T"]), r["variance"], r.get("seed", "0"))
        if key[3] == "0" and int(r["steps"]) >= int(models.get(key, {}).get("steps", 0)):
            models[key] = r
    with np.load(ROOT / "build" / "data.npz") as z:
        test = z["test_images"]
    torch.set_num_threads(2)
    results = {}
    for key, r in models.items():
        rev = r["exp_name"]
        sha = subprocess.run(["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{rev}"],
                                           cwd=ROOT, capture_output=True, text=True).stdout.split()[0]
        per = list(csv.DictReader(io.StringIO(read_exp_file(ROOT, sha, "reports/bpd_per_image.csv"))))
        ids = np.array([int(p["image"]) for p in per])
        bound = np.array([float(p["bpd"]) for p in per])
        net, meta, schedule = load_net(read_exp_file(ROOT, sha, "build/model.pt", binary=True))
        last = last_terms(net, meta, schedule, test[ids], ids, seed=0)
        results[key] = (ids, bound, last)
        print(f"{key}: bound {bound.mean():.3f}, t = T term {mean_estimate(last).mean:.3f} "
              f"(95% CI {mean_estimate(last).ci_low:.3f} to {mean_estimate(last).ci_high:.3f})")
    lines = [("schedule", "T", "training", "bound", "last_term", "last_term_ci_low", "last_term_ci_high",
              "without_last", "cosine_minus_linear_without_last", "ci_low", "ci_high")]
    for (sched, T, var, seed), (ids, bound, last) in results.items():
        m = mean_estimate(last)
        row = [sched, T, "improved" if var == "learned_range" else "ho", f"{bound.mean():.4f}", f"{m.mean:.4f}",
               f"{m.ci_low:.4f}", f"{m.ci_high:.4f}", f"{(bound - last).mean():.4f}", "", "", ""]
        if sched == "cosine" and ("linear", T, var, seed) in results:
            lids, lbound, llast = results[("linear", T, var, seed)]
            assert (lids == ids).all(), "the study's points must share evaluate.seed"
            d = paired_difference(bound - last, lbound - llast)
            row[-3:] = [f"{d.mean:.4f}", f"{d.ci_low:.4f}", f"{d.ci_high:.4f}"]
            print(f"cosine - linear without t = T, T = {T}, {row[2]}: {d.mean:+.3f} (95% CI {d.ci_low:.3f} to "
                  f"{d.ci_high:.3f})")
        lines.append(row)
    out = args.out or folder / "last_term.csv"
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(lines)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
