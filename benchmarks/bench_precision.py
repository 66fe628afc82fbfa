"""bf16 against fp32 on the machine at hand, in one process: speed, quality at equal steps and at equal wall
time, and what bf16 would do to the bound.

1. speed: images/s of the training step (ddpm_core's Trainer.train_step at train.batch_size, the default UNet)
   and of the sampler's network pass (no_grad forward at sample.batch_size), fp32 and bf16 autocast
   interleaved round by round; the ratio per round, its median and 95% interval over rounds.
2. quality at equal steps: the default model trained train.steps in each precision (same seed, data order, t
   and noise), scored as `evaluate` scores it: the bound in fp32 on the same test images and draws (paired
   bits/dim difference, 95% t-interval over images) and the FID-proxy of DDIM samples, each model sampled in
   the precision it trained in (paired bootstrap difference on a shared reference).
3. quality at equal wall time: bf16 trained for steps x (its median speed ratio), the steps it runs in fp32's
   time, the same paired differences against fp32.
4. the bound in bf16: one fp32-trained model's negative ELBO with the network in fp32 and in bf16, same images
   and draws: the shift against the estimate's standard error (evaluate keeps fp32 unless |shift| < 0.1 SE).

Where bf16 is not native (compute.py's rule), bf16 is emulated by oneDNN: the report says so, still measures
1 and 4, and runs 2 and 3 only with --quality (training is several times slower there).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_precision.py              # writes precision.md / .json
    PYTHONPATH=. .venv/bin/python benchmarks/bench_precision.py --quality    # quality arms also when emulated
    PYTHONPATH=. .venv/bin/python benchmarks/bench_precision.py --smoke --out /tmp/x   # seconds, digits
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
import shutil
import sys
import time

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402
from ddpm_core import compute  # noqa: E402
from ddpm_core.checkpoint import load_checkpoint  # noqa: E402
from ddpm_core.data import from_model_range, load_dataset, to_model_range  # noqa: E402
from ddpm_core.diffusion import output_channels  # noqa: E402
from ddpm_core.elbo_mc import estimate_bound  # noqa: E402
from ddpm_core.fid import (FeaturizerConfig, classifier_featurize, fid_bootstrap, fid_features,  # noqa: E402
                           load_or_train_featurizer, report_from_features)
from ddpm_core.sampling import sample as draw_samples  # noqa: E402
from ddpm_core.schedules import NoiseSchedule  # noqa: E402
from ddpm_core.stats import mean_estimate, paired_difference  # noqa: E402
from ddpm_core.train import Trainer, train  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402
from pipeline.params import Params, bound_design, sample_steps, validate  # noqa: E402
from pipeline.stages import train_config  # noqa: E402

SMOKE = {"data": {"dataset": "digits"}, "diffusion": {"T": 50},
         "model": {"channels": 16, "channel_mults": [1, 2], "attention_resolutions": [4]},
         "train": {"steps": 6, "batch_size": 16, "checkpoint_every": 3},
         "sample": {"n": 40, "steps": 5, "batch_size": 40}, "evaluate": {"n_fid": 40}}


def load_config() -> Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in (SMOKE if ARGS.smoke else {}).items():
        raw[section].update(values)
    if ARGS.steps:
        raw["train"]["steps"] = ARGS.steps
    return validate(copy.deepcopy(raw))


def arms() -> dict[str, compute.Compute]:
    """fp32 and bf16 on this machine's device (bf16 emulated where it is not native: said in the report)."""
    device = "auto"
    return {"fp32": compute.resolve(device, "fp32", world=compute.World()),
            "bf16": compute.resolve(device, "bf16", world=compute.World(), emulate=True)}


def new_net(p: Params, shape: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(p.train.seed)
    return build_unet(p.model.model_dump(), shape[0], shape[1], output_channels(shape[0], p.diffusion.variance))


# --- 1. speed ---------------------------------------------------------------------------------------------
def speed(p: Params, images: torch.Tensor, c: dict[str, compute.Compute]) -> dict:
    """Interleaved rounds: each round times `steps` training steps and `passes` sampling passes per arm."""
    shape = tuple(images.shape[1:])
    schedule = NoiseSchedule.named(p.diffusion.schedule, p.diffusion.T)
    trainers = {k: Trainer(new_net(p, shape), schedule, images, train_config(p, a), a.device) for k, a in c.items()}
    nets = {k: a.network(new_net(p, shape).to(a.device).eval()) for k, a in c.items()}
    n_s = p.sample.batch_size
    x = torch.randn(n_s, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, p.diffusion.T, (n_s,), generator=torch.Generator().manual_seed(1))
    rows: dict[str, dict[str, list[float]]] = {k: {"train": [], "sample": []} for k in c}
    for k, tr in trainers.items():  # warm-up: first calls allocate
        tr.train_step()
        with torch.no_grad():
            nets[k](x.to(c[k].device), t.to(c[k].device))
    for r in range(ARGS.rounds):
        for k in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            rows[k]["train"].append(p.train.batch_size * ARGS.steps_per_round / timed(
                lambda: [trainers[k].train_step() for _ in range(ARGS.steps_per_round)], c[k]))
            rows[k]["sample"].append(n_s * ARGS.passes_per_round / timed(
                lambda: [nets[k](x.to(c[k].device), t.to(c[k].device)) for _ in range(ARGS.passes_per_round)],
                c[k], grad=False))
        print(f"round {r + 1}: " + ", ".join(f"{k} train {v['train'][-1]:.0f} sample {v['sample'][-1]:.0f} img/s"
                                             for k, v in rows.items()), flush=True)
    return {"rounds": rows, **{f"{kind}_ratio": ratio(rows["bf16"][kind], rows["fp32"][kind])
                               for kind in ("train", "sample")},
            "batch": p.train.batch_size, "sample_batch": n_s}


def timed(fn, c: compute.Compute, grad: bool = True) -> float:
    if c.device.type == "cuda":
        torch.cuda.synchronize(c.device)
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        fn()
    if c.device.type == "cuda":
        torch.cuda.synchronize(c.device)
    return time.perf_counter() - start


def ratio(a: list[float], b: list[float]) -> dict:
    """bf16 / fp32 per round: median, and the mean with its 95% t-interval over rounds."""
    r = np.asarray(a) / np.asarray(b)
    est = mean_estimate(r) if len(r) >= 2 else None
    return {"median": float(np.median(r)), "mean": float(r.mean()),
            "ci_low": est.ci_low if est else float("nan"), "ci_high": est.ci_high if est else float("nan"),
            "per_round": r.tolist()}


# --- 2, 3. quality -----------------------------------------------------------------------------------------
def train_arm(p: Params, images: torch.Tensor, c: compute.Compute, steps: int, name: str,
              start_from: Path | None = None) -> tuple[torch.nn.Module, NoiseSchedule, dict]:
    """The EMA model of `steps` training steps in c's precision (continuing start_from's checkpoint if given)."""
    schedule = NoiseSchedule.named(p.diffusion.schedule, p.diffusion.T)
    path = ARGS.work / f"{name}.pt"
    if start_from is not None and not path.exists():
        shutil.copyfile(start_from, path)
    cfg = train_config(p.model_copy(update={"train": p.train.model_copy(update={"steps": steps})}), c)
    meta = {"model": p.model.model_dump(), "diffusion": p.diffusion.model_dump(), "image_shape": list(images.shape[1:]),
            "compute": c.describe()}  # what pipeline.stages.load_ema_model reads, for section 4
    begin = time.perf_counter()
    res = train(new_net(p, tuple(images.shape[1:])), schedule, images, cfg, path, c.device, meta, progress=False)
    info = {"steps": res.step, "seconds": time.perf_counter() - begin, "resumed_from": res.resumed_from,
            "final_train_loss": float(res.losses[-max(1, len(res.losses) // 20):].mean())}
    print(f"{name}: {info}", flush=True)
    return res.ema_model.eval(), schedule, info


def score(model, schedule, p: Params, data, c: compute.Compute, featurize) -> dict:
    """The bound in fp32 (as evaluate) and DDIM samples in the arm's precision, with their FID-proxy features."""
    device = c.device
    design = bound_design(p.evaluate, schedule.T)
    n = min(len(data.test_images), ARGS.bpd_passes // design.passes_per_image())
    pick = np.random.default_rng(p.evaluate.seed).permutation(len(data.test_images))[:n]
    est = estimate_bound(model, schedule, to_model_range(data.test_images[pick]).to(device), pick, design,
                         p.diffusion.variance, p.diffusion.objective, p.evaluate.chunk_size, p.evaluate.seed)
    x = draw_samples(c.network(model), schedule, ARGS.n_fid, tuple(data.image_shape), seed=0,
                     sampler=p.sample.sampler, steps=sample_steps(p.sample, schedule.T), eta=p.sample.eta,
                     batch_size=p.sample.batch_size, variance=p.diffusion.variance, objective=p.diffusion.objective,
                     clip_x0=p.sample.clip_x0, device=device, progress=False)
    features = fid_features(featurize, from_model_range(x), data, ARGS.n_fid, seed=0)
    fid = report_from_features(features, 0, 200)
    return {**est.total.as_dict("bpd"), "n_bpd": n, "per_image_bpd": est.per_image.tolist(),
            "fid_proxy": fid["fid_proxy"], "fid_proxy_ci_low": fid["fid_proxy_ci_low"],
            "fid_proxy_ci_high": fid["fid_proxy_ci_high"], "fid_proxy_floor": fid["fid_proxy_floor"],
            "features": features}


def versus(ref: dict, other: dict) -> dict:
    """other - ref: paired bits/dim over images, paired FID-proxy bootstrap on ref's reference."""
    d = paired_difference(np.asarray(other["per_image_bpd"]), np.asarray(ref["per_image_bpd"]))
    f = fid_bootstrap(other["features"].gen, ref["features"].test, 200, 0, minus=ref["features"].gen)
    return {"bpd_diff": d.mean, "bpd_diff_ci_low": d.ci_low, "bpd_diff_ci_high": d.ci_high,
            "fid_diff": f.mean, "fid_diff_ci_low": f.ci_low, "fid_diff_ci_high": f.ci_high}


def quality(p: Params, data, c: dict[str, compute.Compute], speed_ratio: float) -> dict:
    images = torch.from_numpy(data.train_images)
    feat, info = load_or_train_featurizer(ARGS.work / "featurizer.pt", data, FeaturizerConfig(epochs=1, seed=0),
                                          progress=False)
    featurize = classifier_featurize(feat)
    steps = p.train.steps
    equal_time = max(1, int(round(steps * speed_ratio)))
    runs = {"fp32": (c["fp32"], steps, None), "bf16": (c["bf16"], steps, None),
            "bf16_equal_time": (c["bf16"], equal_time, ARGS.work / "bf16.pt" if equal_time >= steps else None)}
    out = {}
    for name, (arm, n_steps, start_from) in runs.items():
        model, schedule, info_ = train_arm(p, images, arm, n_steps, name, start_from)
        out[name] = {**info_, **score(model, schedule, p, data, arm, featurize)}
    for name in ("bf16", "bf16_equal_time"):
        out[name]["vs_fp32"] = versus(out["fp32"], out[name])
    for r in out.values():
        r.pop("features")
    return {"runs": out, "equal_time_steps": equal_time, "classifier_accuracy": info["accuracy"]}


# --- 4. the bound in bf16 ------------------------------------------------------------------------------------
def bound_shift(p: Params, data, c: dict[str, compute.Compute], model_path: Path | None) -> dict:
    """The same fp32-trained model's bound with the network in fp32 and in bf16, same images and draws."""
    if model_path is None or not model_path.exists():
        return {}
    ckpt = load_checkpoint(model_path)
    meta = ckpt["meta"]
    shape = meta["image_shape"]
    net = build_unet(meta["model"], shape[0], shape[1], output_channels(shape[0], meta["diffusion"]["variance"]))
    net.load_state_dict({k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")})
    schedule = NoiseSchedule.from_betas(ckpt["schedule_betas"].numpy())
    design = bound_design(p.evaluate, schedule.T)
    n = min(len(data.test_images), ARGS.bound_passes // design.passes_per_image())
    pick = np.random.default_rng(p.evaluate.seed).permutation(len(data.test_images))[:n]
    out = {"model": str(model_path), "n_images": n, "passes": n * design.passes_per_image()}
    for k, arm in c.items():
        net_k = arm.network(net.to(arm.device).eval())
        begin = time.perf_counter()
        est = estimate_bound(net_k, schedule, to_model_range(data.test_images[pick]).to(arm.device), pick, design,
                             meta["diffusion"]["variance"], meta["diffusion"]["objective"], p.evaluate.chunk_size,
                             p.evaluate.seed)
        out[k] = {**est.total.as_dict("bpd"), "decoder_bpd": est.decoder_bpd, "seconds": time.perf_counter() - begin,
                  "per_image": est.per_image.tolist()}
    d = paired_difference(np.asarray(out["bf16"]["per_image"]), np.asarray(out["fp32"]["per_image"]))
    out["shift"] = {"mean": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high,
                    "in_stderrs": d.mean / out["fp32"]["bpd_stderr"],
                    "decoder_shift": out["bf16"]["decoder_bpd"] - out["fp32"]["decoder_bpd"]}
    for k in c:
        out[k].pop("per_image")
    return out


# --- report ---------------------------------------------------------------------------------------------
def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.2f}x (mean {r['mean']:.2f}, 95% CI {r['ci_low']:.2f} to {r['ci_high']:.2f})"


def speed_md(s: dict) -> list[str]:
    med = {k: {kind: float(np.median(v[kind])) for kind in v} for k, v in s["rounds"].items()}
    span = {k: {kind: (min(v[kind]), max(v[kind])) for kind in v} for k, v in s["rounds"].items()}
    lines = ["| | fp32 img/s (median, range) | bf16 img/s (median, range) | bf16 / fp32 per round |", "|---|---|---|---|"]
    for kind, what in (("train", f"training step, batch {s['batch']}"),
                       ("sample", f"network pass for sampling, batch {s['sample_batch']}")):
        cells = [f"{med[k][kind]:.0f} ({span[k][kind][0]:.0f}-{span[k][kind][1]:.0f})" for k in ("fp32", "bf16")]
        lines.append(f"| {what} | {cells[0]} | {cells[1]} | {fmt_ratio(s[f'{kind}_ratio'])} |")
    return lines


def quality_md(q: dict) -> list[str]:
    lines = ["| model | steps | train s | bits/dim (95% CI) | minus fp32 (95% CI) | FID-proxy (95% CI) | "
             "minus fp32 (95% CI) |", "|---|---|---|---|---|---|---|"]
    for name, r in q["runs"].items():
        v = r.get("vs_fp32")
        bd = f"{v['bpd_diff']:+.3f} ({v['bpd_diff_ci_low']:+.3f} to {v['bpd_diff_ci_high']:+.3f})" if v else ""
        fd = f"{v['fid_diff']:+.2f} ({v['fid_diff_ci_low']:+.2f} to {v['fid_diff_ci_high']:+.2f})" if v else ""
        lines.append(f"| {name} | {r['steps']} | {r['seconds']:.0f} | {r['bpd']:.3f} ({r['bpd_ci_low']:.3f} to "
                     f"{r['bpd_ci_high']:.3f}) | {bd} | {r['fid_proxy']:.2f} ({r['fid_proxy_ci_low']:.2f} to "
                     f"{r['fid_proxy_ci_high']:.2f}) | {fd} |")
    return lines


def bound_md(b: dict) -> list[str]:
    if not b:
        return ["Not measured: no model (give --bound-model PATH, e.g. build/model.pt after `dvc repro`)."]
    s = b["shift"]
    keep = abs(s["mean"]) >= 0.1 * b["fp32"]["bpd_stderr"]
    return [f"Model {b['model']}, {b['n_images']} test images, {b['passes']} network passes per precision, the same "
            f"images, noise and t draws:", "",
            "| network in | bits/dim (95% CI) | standard error | decoder L_0 | seconds |", "|---|---|---|---|---|",
            *[f"| {k} | {b[k]['bpd']:.4f} ({b[k]['bpd_ci_low']:.4f} to {b[k]['bpd_ci_high']:.4f}) | "
              f"{b[k]['bpd_stderr']:.4f} | {b[k]['decoder_bpd']:.4f} | {b[k]['seconds']:.1f} |" for k in ("fp32", "bf16")],
            "", f"bf16 minus fp32: {s['mean']:+.4f} bits/dim (95% CI {s['ci_low']:+.4f} to {s['ci_high']:+.4f}, paired "
            f"over images), {s['in_stderrs']:+.2f} standard errors of the estimate; decoder term {s['decoder_shift']:+.4f}. "
            + ("The shift is not below 0.1 standard error: `evaluate` keeps the bound in fp32." if keep else
               "The shift is below 0.1 standard error here.")]


def markdown(r: dict) -> str:
    c = r["arms"]["bf16"]
    native = not r["emulated"]
    head = [f"# bf16 against fp32 ({'native bf16' if native else 'bf16 emulated: no native bf16 on this machine'})",
            "", f"Command: `{r['command']}`", "", *[f"- {m}" for m in r["machine"]],
            f"- `auto` resolves here to: {r['auto']}", f"- threads: {r['threads']}; load average at the end "
            f"{r['load']:.1f} (a shared machine moves speed by up to 25% from minute to minute; only the interleaved "
            f"ratio compares)", ""]
    if not native:
        lacks = c["bf16_native"].removeprefix("no (").removesuffix(")")
        head += [f"This machine has no native bf16 ({lacks}): bf16 here is oneDNN's emulation, so the "
                 "speed rows show what `auto` avoids by choosing fp32, not what bf16 gives where it is native. Run "
                 "this on a CPU with avx512_bf16 / amx_bf16 or a CUDA GPU with compute capability >= 8.0 for that.", ""]
    body = ["## Speed (interleaved rounds, one process)", "",
            *(speed_md(r["speed"]) if "speed" in r else ["Not run (--sections)."]), ""]
    if r.get("quality"):
        q = r["quality"]
        body += ["## Quality at equal steps and at equal wall time", "",
                 f"bf16_equal_time trains {q['equal_time_steps']} steps: {r['config']['train.steps']} x the median "
                 f"training speed ratio. Bits/dim: the bound in fp32 as `evaluate` computes it (importance estimator, "
                 f"same images and draws for every model), paired over images; FID-proxy: {r['n_fid']} DDIM samples "
                 f"per model in its own precision, paired bootstrap difference on the shared reference (featurizer "
                 f"accuracy {q['classifier_accuracy']:.3f}). One training seed per model: the intervals cover the "
                 "estimator's noise, not training's.", "", *quality_md(q), ""]
    else:
        body += ["## Quality", "", "Not run: bf16 is emulated here (pass --quality to train both arms anyway).", ""]
    body += ["## The bound in bf16", "", *bound_md(r["bound"]), ""]
    return "\n".join(head + body)


def main() -> None:
    if ARGS.smoke:  # seconds: the code path, not a measurement
        for key, value in (("rounds", 2), ("steps_per_round", 2), ("passes_per_round", 1), ("bpd_passes", 160),
                           ("n_fid", 40), ("bound_passes", 160)):
            setattr(ARGS, key, value)
    torch.set_num_threads(ARGS.threads)
    ARGS.out.mkdir(parents=True, exist_ok=True)
    ARGS.work.mkdir(parents=True, exist_ok=True)
    p = load_config()
    data = load_dataset(p.data.dataset, p.data.root, False)
    c = arms()
    auto = compute.resolve("auto", "auto", world=compute.World())
    report = {"command": "PYTHONPATH=. .venv/bin/python benchmarks/bench_precision.py " + " ".join(sys.argv[1:]),
              "machine": list(compute.describe_machine()), "auto": auto.summary(), "threads": torch.get_num_threads(),
              "emulated": c["bf16"].emulated, "arms": {k: a.describe() for k, a in c.items()},
              "config": {k: v for k, v in p.flat().items() if k.split(".")[0] in ("model", "train", "diffusion")},
              "n_fid": ARGS.n_fid}
    if "speed" in ARGS.sections:
        report["speed"] = speed(p, torch.from_numpy(data.train_images), c)
    if "quality" in ARGS.sections and (not c["bf16"].emulated or ARGS.quality):
        report["quality"] = quality(p, data, c, report["speed"]["train_ratio"]["median"])
    model = ARGS.bound_model or (ARGS.work / "fp32.pt" if report.get("quality") else None)
    report["bound"] = bound_shift(p, data, c, model) if "bound" in ARGS.sections else {}
    report["load"] = os.getloadavg()[0]
    stem = ARGS.stem or ("precision_smoke" if ARGS.smoke else "precision")
    write_report(ARGS.out, stem, report, markdown(report))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quality", action="store_true", help="train the quality arms also where bf16 is emulated")
    ap.add_argument("--smoke", action="store_true", help="digits, a tiny model, a few steps: precision_smoke.*")
    ap.add_argument("--steps", type=int, default=0, help="training steps of the quality arms (0: train.steps)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps-per-round", type=int, default=5)
    ap.add_argument("--passes-per-round", type=int, default=3)
    ap.add_argument("--bpd-passes", type=int, default=8000)
    ap.add_argument("--n-fid", type=int, default=500)
    ap.add_argument("--bound-model", type=Path, help="checkpoint for section 4 (default: the fp32 arm's model)")
    ap.add_argument("--bound-passes", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sections", default="speed,quality,bound", help="which of speed,quality,bound to run "
                    "(quality needs speed: its equal-time arm uses the measured ratio)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks")
    ap.add_argument("--stem", help="report file name without extension (default precision, or precision_smoke)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench_precision")
    ARGS = ap.parse_args()
    main()
