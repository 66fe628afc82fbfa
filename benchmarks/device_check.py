"""The device check: what this project gets from the device at hand, in one command (under 8 minutes on a GPU).

    PYTHONPATH=. .venv/bin/python benchmarks/device_check.py                  # writes reports/benchmarks/device.md
    PYTHONPATH=. .venv/bin/python benchmarks/device_check.py --tiny --out /tmp/x   # CPU, seconds (tests use it)

1. training images/s of ddpm_core's Trainer in fp32, bf16 autocast and bf16 + torch.compile, for the default
   UNet (params.yaml's model, 1x28x28, 1.1M parameters) and Ho et al.'s CIFAR-10 UNet (128 channels, mults
   1-2-2-2, 2 res blocks, attention at 16, dropout 0.1, 3x32x32: 35.7M parameters, counted and checked);
2. sampling: images/s of DDIM-30 sampling of the default UNet in the precision `auto` resolves to, and
   network passes/s of the negative ELBO (fp32, as `evaluate`);
3. CUDA against the CPU on one fixed batch: the eps output and L_simple of the same weights, in fp32
   (TF32 off, then on as PyTorch's default for convolutions) and in bf16, with the tolerance checked;
4. a 2,000-step training of the default model in the precision `auto` resolves to (bf16 on Ampere and later),
   with bits/dim and FID-proxy and their 95% intervals (`evaluate`'s estimators and budgets).
A section that would overrun --budget-s is skipped and the report says so. With --tiny every section runs on a
tiny model and digits, and section 3 compares the CPU with itself when no GPU is visible (said in the report).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
import sys
import time

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402
from ddpm_core import compute  # noqa: E402
from ddpm_core.data import from_model_range, load_dataset, to_model_range  # noqa: E402
from ddpm_core.diffusion import q_sample  # noqa: E402
from ddpm_core.elbo_mc import BoundDesign, estimate_bound  # noqa: E402
from ddpm_core.fid import FeaturizerConfig, classifier_featurize, fid_features, load_or_train_featurizer, \
    report_from_features  # noqa: E402
from ddpm_core.objectives import training_losses  # noqa: E402
from ddpm_core.sampling import sample as draw_samples  # noqa: E402
from ddpm_core.schedules import NoiseSchedule  # noqa: E402
from ddpm_core.train import TrainConfig, Trainer, train  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402
from pipeline.params import load_params  # noqa: E402

HO_CIFAR10 = {"channels": 128, "channel_mults": [1, 2, 2, 2], "num_res_blocks": 2, "attention_resolutions": [16],
              "dropout": 0.1}
HO_PARAMS = 35_746_307  # Ho et al. report 35.7M for their CIFAR-10 model
TINY = {"channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4], "dropout": 0.0}
# CUDA against CPU, fp32 with TF32 off: kernels differ in summation order only (measured on this project's CPUs:
# thread counts change the last bits). bf16: one bf16 rounding per layer input, both sides rounded differently.
TOLERANCE = {"fp32": {"eps_abs": 1e-3, "loss_rel": 1e-4}, "bf16": {"eps_abs": 0.1, "loss_rel": 0.05}}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setups(p) -> dict[str, dict]:
    """The measured networks: (model params, image shape, batch)."""
    if ARGS.tiny:
        return {"default": {"model": TINY, "shape": (1, 8, 8), "batch": 16},
                "ho_cifar10": {"model": {**TINY, "dropout": 0.1}, "shape": (3, 8, 8), "batch": 16}}
    return {"default": {"model": p.model.model_dump(), "shape": (1, 28, 28), "batch": p.train.batch_size},
            "ho_cifar10": {"model": HO_CIFAR10, "shape": (3, 32, 32), "batch": 128}}


def net_of(s: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_unet(s["model"], s["shape"][0], s["shape"][1])


# --- 1. training speed ------------------------------------------------------------------------------------
def train_speed(name: str, s: dict, arm: str, device_setting: str, budget: Budget) -> dict:
    precision = "fp32" if arm == "fp32" else "bf16"
    c = compute.resolve(device_setting, precision, world=compute.World(), emulate=True)
    images = torch.randint(0, 256, (2048, *s["shape"]), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cfg = TrainConfig(steps=10**9, batch_size=s["batch"], lr=1e-4, precision=c.precision, compile=arm.endswith("compile"))
    trainer = Trainer(net_of(s), NoiseSchedule.named("linear", 1000), images, cfg, c.device)
    start = time.perf_counter()
    for _ in range(ARGS.warmup):  # the first steps allocate (and compile)
        trainer.train_step()
    sync(c.device)
    warm = time.perf_counter() - start
    steps, start = 0, time.perf_counter()
    while steps < ARGS.steps and (steps < 2 or budget.left() > 0):
        trainer.train_step()
        steps += 1
    sync(c.device)
    seconds = time.perf_counter() - start
    return {"img_s": s["batch"] * steps / seconds, "steps": steps, "warmup_s": warm, "batch": s["batch"],
            "precision": c.precision, "emulated": c.emulated, "compile": cfg.compile}


# --- 2. sampling and the bound ----------------------------------------------------------------------------
def sampling_speed(s: dict, c: compute.Compute) -> dict:
    net = net_of(s).to(c.device).eval()
    n = ARGS.sample_n
    sync(c.device)
    start = time.perf_counter()
    draw_samples(c.network(net), NoiseSchedule.named("linear", 1000), n, s["shape"], seed=0, sampler="ddim",
                 steps=30, batch_size=min(n, 250), device=c.device, progress=False)
    sync(c.device)
    sample_s = time.perf_counter() - start
    x0 = to_model_range(torch.randint(0, 256, (ARGS.elbo_images, *s["shape"]), generator=torch.Generator().manual_seed(1),
                                      dtype=torch.uint8)).to(c.device)
    design = BoundDesign(4, 3)
    start = time.perf_counter()
    est = estimate_bound(net, NoiseSchedule.named("linear", 1000), x0, np.arange(len(x0)), design, chunk_size=250)
    sync(c.device)
    elbo_s = time.perf_counter() - start
    return {"sample_img_s": n / sample_s, "sample_n": n, "sample_precision": c.precision,
            "elbo_passes_s": est.network_passes / elbo_s, "elbo_passes": est.network_passes}


# --- 3. CUDA against the CPU ------------------------------------------------------------------------------
def one_batch(s: dict, device: torch.device, precision: str) -> tuple[torch.Tensor, float]:
    """eps output and L_simple of seeded weights on a seeded batch, computed on `device` (outputs on the CPU)."""
    net = net_of(s, seed=3).to(device).eval()
    g = torch.Generator().manual_seed(4)
    x0 = to_model_range(torch.randint(0, 256, (8, *s["shape"]), generator=g, dtype=torch.uint8))
    t = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    schedule = NoiseSchedule.named("linear", 1000)
    model = compute.Autocast(net, device.type) if precision == "bf16" else net
    x0, t, noise = x0.to(device), t.to(device), noise.to(device)
    with torch.no_grad():
        loss = training_losses(model, schedule, x0, t, noise).mean()
        eps = model(q_sample(schedule, x0, t, noise), t).float().cpu()
    return eps, float(loss)


def agreement(s: dict) -> dict:
    other = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out = {"against": str(other), "rows": []}
    cases = [("fp32", False), ("bf16", None)] + ([("fp32", True)] if other.type == "cuda" else [])
    for precision, tf32 in cases:
        with tf32_setting(tf32):
            eps_cpu, loss_cpu = one_batch(s, torch.device("cpu"), precision)
            eps_dev, loss_dev = one_batch(s, other, precision)
        tol = TOLERANCE[precision]
        row = {"precision": precision, "tf32": tf32, "eps_abs": float((eps_cpu - eps_dev).abs().max()),
               "eps_scale": float(eps_cpu.abs().max()), "loss_cpu": loss_cpu, "loss_device": loss_dev,
               "loss_rel": abs(loss_cpu - loss_dev) / abs(loss_cpu)}
        row["within"] = bool(row["eps_abs"] <= tol["eps_abs"] and row["loss_rel"] <= tol["loss_rel"]) \
            if tf32 is not True else None  # TF32 is reported, not held to the fp32 tolerance
        out["rows"].append(row)
    return out


@contextlib.contextmanager
def tf32_setting(on: bool | None):
    if on is None or not torch.cuda.is_available():
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# --- 4. a 2,000-step training -------------------------------------------------------------------------------
def long_training(p, c: compute.Compute) -> dict:
    data = load_dataset("digits" if ARGS.tiny else "fashion_mnist", ARGS.data_root, False)
    s = setups(p)["default"]
    schedule = NoiseSchedule.named(p.diffusion.schedule, p.diffusion.T)
    cfg = TrainConfig(steps=ARGS.train_steps, batch_size=s["batch"], lr=p.train.lr, warmup_steps=p.train.warmup_steps,
                      grad_clip=p.train.grad_clip, ema_decay=p.train.ema_decay, seed=p.train.seed,
                      precision=c.precision, checkpoint_every=ARGS.train_steps)
    path = ARGS.work / "device_check_train.pt"
    path.unlink(missing_ok=True)
    start = time.perf_counter()
    res = train(net_of({**s, "shape": data.image_shape}), schedule, torch.from_numpy(data.train_images), cfg, path,
                c.device, progress=False)
    train_s = time.perf_counter() - start
    model = res.ema_model.eval()
    design = BoundDesign(p.evaluate.bpd_exact_t, p.evaluate.bpd_draws)
    n = min(len(data.test_images), ARGS.bpd_passes // design.passes_per_image())
    pick = np.random.default_rng(0).permutation(len(data.test_images))[:n]
    bound = estimate_bound(model, schedule, to_model_range(data.test_images[pick]).to(c.device), pick, design,
                           chunk_size=250)  # fp32, as evaluate
    x = draw_samples(c.network(model), schedule, ARGS.n_fid, data.image_shape, seed=0, sampler="ddim", steps=30,
                     batch_size=250, device=c.device, progress=False)
    feat, info = load_or_train_featurizer(ARGS.work / "device_check_featurizer.pt", data, FeaturizerConfig(epochs=1),
                                          c.device, progress=False)
    fid = report_from_features(fid_features(classifier_featurize(feat), from_model_range(x), data, ARGS.n_fid), 0, 200)
    path.unlink(missing_ok=True)
    return {"steps": res.step, "train_s": train_s, "precision": c.precision, "final_loss": float(res.losses[-50:].mean()),
            **bound.total.as_dict("bpd"), "n_bpd": n, "fid_proxy": fid["fid_proxy"],
            "fid_proxy_ci_low": fid["fid_proxy_ci_low"], "fid_proxy_ci_high": fid["fid_proxy_ci_high"],
            "fid_proxy_floor": fid["fid_proxy_floor"], "n_fid": ARGS.n_fid, "classifier_accuracy": info["accuracy"],
            "dataset": data.name}


# --- the report ---------------------------------------------------------------------------------------------
def run_all() -> dict:
    p = load_params(ROOT / "params.yaml")
    budget = Budget(ARGS.budget_s)
    auto = compute.resolve(ARGS.device, "auto", world=compute.World())
    r: dict = {"command": "PYTHONPATH=. .venv/bin/python benchmarks/device_check.py " + " ".join(sys.argv[1:]),
               "machine": list(compute.describe_machine()), "auto": auto.summary(), "tiny": ARGS.tiny,
               "torch": torch.__version__, "cuda": torch.version.cuda if torch.cuda.is_available() else None,
               "skipped": []}
    s = setups(p)
    r["params"] = {name: sum(q.numel() for q in net_of(v).parameters()) for name, v in s.items()}
    r["speed"] = {}
    arms = ["fp32", "bf16"] + (["bf16+compile"] if auto.device.type == "cuda" or ARGS.compile else [])
    for name in s:
        for arm in arms:
            if budget.left() < ARGS.reserve_s:
                r["skipped"].append(f"training speed {name} {arm} (budget)")
                continue
            r["speed"][f"{name} {arm}"] = train_speed(name, s[name], arm, ARGS.device, budget)
            print(f"{name} {arm}: {r['speed'][f'{name} {arm}']}", flush=True)
    r["sampling"] = sampling_speed(s["default"], auto)
    print(f"sampling: {r['sampling']}", flush=True)
    r["agreement"] = agreement(s["default"])
    print(f"agreement: {r['agreement']}", flush=True)
    r["long"] = long_training(p, auto)
    print(f"long training: {r['long']}", flush=True)
    r["seconds"] = ARGS.budget_s - budget.left()
    return r


def markdown(r: dict) -> str:
    ho_ok = ("tiny stand-ins" if r["tiny"] else "as Ho et al.'s 35.7M" if r["params"]["ho_cifar10"] == HO_PARAMS
             else f"**expected {HO_PARAMS:,}**")
    lines = [f"# Device check{' (--tiny: a tiny model and digits; not a measurement)' if r['tiny'] else ''}", "",
             f"Command: `{r['command']}`; {r['seconds']:.0f} s in all.", "", *[f"- {m}" for m in r["machine"]],
             f"- torch {r['torch']}, CUDA {r['cuda'] or 'none'}; `auto` resolves to: {r['auto']}", "",
             "## Training images/s (ddpm_core's Trainer: batch draw, forward, loss, backward, clipping, AdamW, EMA)", "",
             f"Parameters: default UNet {r['params']['default']:,}; Ho et al.'s CIFAR-10 UNet "
             f"{r['params']['ho_cifar10']:,} ({ho_ok}).", "",
             "| network | precision | batch | images/s | timed steps | warm-up s (incl. compile) |", "|---|---|---|---|---|---|"]
    for key, v in r["speed"].items():
        name, arm = key.split(" ", 1)
        note = " (emulated)" if v["emulated"] else ""
        lines.append(f"| {name} | {arm}{note} | {v['batch']} | {v['img_s']:.0f} | {v['steps']} | {v['warmup_s']:.1f} |")
    sm = r["sampling"]
    lines += ["", "## Sampling and the bound", "",
              f"DDIM-30 sampling of the default UNet in {sm['sample_precision']}: {sm['sample_img_s']:.1f} images/s "
              f"({sm['sample_n']} images). Negative ELBO (fp32, importance design 4 + 3 + t = T per image): "
              f"{sm['elbo_passes_s']:.0f} network passes/s ({sm['elbo_passes']} passes).", "",
              f"## {r['agreement']['against'].split(':')[0].upper()} against the CPU on one batch (default UNet, 8 images)", ""]
    if r["agreement"]["against"] == "cpu":
        lines += ["No CUDA GPU is visible: the check below compares the CPU with itself (it only exercises the code).", ""]
    lines += ["| precision | TF32 | max abs eps difference (eps scale) | L_simple CPU | L_simple device | rel. difference | "
              "within tolerance |", "|---|---|---|---|---|---|---|"]
    for row in r["agreement"]["rows"]:
        ok = {True: "yes", False: "**no**", None: "reported only"}[row["within"]]
        lines.append(f"| {row['precision']} | {row['tf32']} | {row['eps_abs']:.2e} ({row['eps_scale']:.2f}) | "
                     f"{row['loss_cpu']:.6f} | {row['loss_device']:.6f} | {row['loss_rel']:.2e} | {ok} |")
    lines += ["", f"Tolerances: fp32 (TF32 off) eps within {TOLERANCE['fp32']['eps_abs']:g}, loss within "
              f"{TOLERANCE['fp32']['loss_rel']:g} relative; bf16 within {TOLERANCE['bf16']['eps_abs']:g} and "
              f"{TOLERANCE['bf16']['loss_rel']:g}.", ""]
    g = r["long"]
    lines += [f"## {g['steps']} training steps of the default model in {g['precision']} ({g['dataset']})", "",
              f"{g['train_s']:.0f} s of training; final loss {g['final_loss']:.4f}. Bits/dim {g['bpd']:.3f} (95% CI "
              f"{g['bpd_ci_low']:.3f} to {g['bpd_ci_high']:.3f}, {g['n_bpd']} test images, bound in fp32); FID-proxy "
              f"{g['fid_proxy']:.2f} (95% CI {g['fid_proxy_ci_low']:.2f} to {g['fid_proxy_ci_high']:.2f}, {g['n_fid']} "
              f"DDIM-30 samples; real-vs-real floor {g['fid_proxy_floor']:.2f}; featurizer accuracy "
              f"{g['classifier_accuracy']:.3f}). One training seed: the intervals cover the estimators' noise.", ""]
    if r["skipped"]:
        lines += ["Skipped to stay within the budget: " + "; ".join(r["skipped"]) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    if ARGS.tiny:
        for key, value in (("steps", 3), ("warmup", 1), ("sample_n", 16), ("elbo_images", 4), ("train_steps", 20),
                           ("bpd_passes", 160), ("n_fid", 40)):
            setattr(ARGS, key, value)
    ARGS.out.mkdir(parents=True, exist_ok=True)
    ARGS.work.mkdir(parents=True, exist_ok=True)
    r = run_all()
    stem = "device_tiny" if ARGS.tiny else "device"
    write_report(ARGS.out, stem, r, markdown(r))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, seconds: every section on a tiny model (device_tiny.*)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--compile", action="store_true", help="also the bf16 + torch.compile arm on a CPU")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per arm")
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps per arm (compiling happens here)")
    ap.add_argument("--sample-n", type=int, default=1000)
    ap.add_argument("--elbo-images", type=int, default=250)
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--bpd-passes", type=int, default=8000)
    ap.add_argument("--n-fid", type=int, default=500)
    ap.add_argument("--data-root", help="where fashion_mnist's IDX files are (default: the usual places)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="speed arms stop starting after this")
    ap.add_argument("--reserve-s", type=float, default=150.0, help="kept for sections 2-4")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "device_check")
    ARGS = ap.parse_args()
    main()
