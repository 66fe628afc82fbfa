"""Quality at equal training time: our default configuration against diffusers' own recipe.

Both train on Fashion-MNIST for the same wall-clock budget on this machine, then draw the same number of
samples, which are scored by our FID-proxy (the featurizer of the pipeline, same reference images).

diffusers' recipe (examples/unconditional_image_generation): UNet2DModel with block_out_channels (32, 64, 64),
one layer per block, attention in the lowest block; DDPMScheduler linear with T = 1000; AdamW lr 2e-4 with
500 warm-up steps and cosine decay (over the steps the budget is expected to allow); EMAModel with warm-up
(inv_gamma 1, power 3/4, max decay 0.9999); sampling with DDIM, 50 steps.

    python benchmarks/quality_vs_diffusers.py --minutes 10 --n 500
writes reports/benchmarks/quality.json, quality.md and one sample grid per recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm_core.data import from_model_range, load_dataset, to_model_range  # noqa: E402
from ddpm_core.fid import classifier_featurize, fid_proxy_report, load_or_train_featurizer  # noqa: E402
from ddpm_core.sampling import sample as draw_samples  # noqa: E402
from ddpm_core.schedules import NoiseSchedule  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402
from pipeline.params import load_params, sample_steps  # noqa: E402
from pipeline.reports import save_grid  # noqa: E402
from pipeline.stages import featurizer_config, sample_compute, train_compute, train_config  # noqa: E402
from ddpm_core.train import Trainer  # noqa: E402

OUT = ROOT / "reports" / "benchmarks"


def train_ours(images: torch.Tensor, seconds: float) -> tuple[torch.Tensor, int, dict]:
    p = load_params(ROOT / "params.yaml")
    torch.manual_seed(p.train.seed)
    net = build_unet(p.model.model_dump(), 1, 28)
    schedule = NoiseSchedule.named(p.diffusion.schedule, p.diffusion.T)
    c = train_compute(p)  # as the train stage would compute on this machine
    trainer = Trainer(net, schedule, images, train_config(p, c), c.device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.train_step()
    model = trainer.ema.module.eval()
    t0 = time.perf_counter()
    s = sample_compute(p)
    x = draw_samples(s.network(model), schedule, ARGS.n, (1, 28, 28), seed=0, sampler=p.sample.sampler,
                     steps=sample_steps(p.sample, schedule.T), eta=p.sample.eta, batch_size=250, clip_x0=p.sample.clip_x0,
                     device=s.device)
    return from_model_range(x), trainer.step, {"sample_seconds": time.perf_counter() - t0, "config": p.flat(),
                                               "train_compute": c.describe(), "sample_compute": s.describe()}


def train_diffusers(images: torch.Tensor, seconds: float) -> tuple[torch.Tensor, int, dict]:
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                      layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_cosine_schedule_with_warmup(opt, 500, ARGS.expected_diffusers_steps)
    ema = EMAModel(net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    gen = torch.Generator().manual_seed(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        idx = torch.randint(len(images), (64,), generator=gen)
        x0 = to_model_range(images[idx])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (64,), generator=gen)
        loss = F.mse_loss(net(noise_scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(net.parameters())
        steps += 1
    ema.copy_to(net.parameters())
    net.eval()
    ddim = DDIMScheduler.from_config(noise_scheduler.config)
    ddim.set_timesteps(50)
    t0 = time.perf_counter()
    out = []
    with torch.no_grad():
        for b in range(0, ARGS.n, 250):
            g = torch.Generator().manual_seed(b)
            x = torch.randn((min(250, ARGS.n - b), 1, 28, 28), generator=g)
            for t in ddim.timesteps:
                x = ddim.step(net(x, t).sample, t, x, eta=0.0).prev_sample
            out.append(x.clamp(-1, 1))
    return from_model_range(torch.cat(out)), steps, {"sample_seconds": time.perf_counter() - t0}


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    data = load_dataset("fashion_mnist")
    p = load_params(ROOT / "params.yaml")
    feat, info = load_or_train_featurizer(ROOT / "build" / "featurizer.pt", data, featurizer_config(p))
    featurize = classifier_featurize(feat)
    images = torch.from_numpy(data.train_images)
    results = {}
    for name, fn in (("ours", train_ours), ("diffusers", train_diffusers)):
        print(f"{name}: training for {ARGS.minutes} min", flush=True)
        samples, steps, extra = fn(images, ARGS.minutes * 60)
        save_grid(samples[:64].numpy(), OUT / f"quality_{name}.png")
        score = fid_proxy_report(featurize, samples, data, ARGS.n)
        results[name] = {"train_steps": steps, **score, **extra}
        print(name, {k: v for k, v in results[name].items() if k != "config"}, flush=True)
    summary = {"minutes": ARGS.minutes, "n": ARGS.n, "threads": ARGS.threads, "torch": torch.__version__,
               "classifier_accuracy": info["accuracy"], "command": " ".join(sys.argv), "results": results,
               "ours_better": results["ours"]["fid_proxy"] < results["diffusers"]["fid_proxy"]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v['train_steps']} | {v['fid_proxy']:.2f} | {v['fid_proxy_floor']:.2f} | "
                     f"{v['kid_proxy']:.4f} | {v['sample_seconds']:.0f} |" for k, v in results.items())
    (OUT / "quality.md").write_text(
        f"# Quality at equal training time ({ARGS.minutes} min, {ARGS.threads} threads, n = {ARGS.n})\n\n"
        f"`{summary['command']}`, torch {torch.__version__}\n\n"
        "| recipe | steps | fid_proxy | floor | kid_proxy | sample s |\n|---|---|---|---|---|---|\n"
        f"{rows}\n\n![ours](quality_ours.png) ![diffusers](quality_diffusers.png)\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--expected-diffusers-steps", type=int, default=700,
                    help="length of diffusers' cosine lr decay (about what its recipe reaches in 10 min here)")
    ARGS = ap.parse_args()
    main()
