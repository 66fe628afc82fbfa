"""Benchmark: ddpm_core's UNet against diffusers' UNet2DModel on CPU, 28x28x1 images.

Measures, side by side in one process (the machine is shared and noisy, so the models are interleaved round by
round, the order alternating, and medians over rounds are reported):
1. training throughput, images/s, of ddpm_core's own training step (`Trainer.train_step`: batch draw, forward,
   L_simple, backward, gradient clipping, fused AdamW, EMA update), batch 64, for a base and a larger config;
   ours against diffusers' UNet2DModel built with the same channels (same parameter count), trained by the very
   same step, so the two differ only in the network;
2. achieved FLOP/s of a training step (FLOPs from torch.utils.flop_counter.FlopCounterMode, i.e. the FLOPs each
   network actually executes) as a fraction of a 2048x2048 fp32 matmul's FLOP/s measured in the same rounds
   (best of 3 back-to-back products per round); the median over rounds of each round's fraction;
3. ELBO evaluation throughput (ddpm_core.elbo.nll_bpd, image-steps/s = N*T/s) against the raw no_grad forward
   throughput of the same network at the same batch (= chunk) size.

Writes reports/benchmarks/unet.json and unet.md. Usage:
    PYTHONPATH=. .venv/bin/python benchmarks/bench_unet.py [--repeats 7] [--quick] [--threads N] [--out-dir D]
On an AVX-512 CPU, the AVX2 figures (the other CPU these benchmarks run on) come from the same run with
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ... --out-dir reports/benchmarks/avx2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.report import write_report
from ddpm_core.elbo import nll_bpd
from ddpm_core.schedules import NoiseSchedule
from ddpm_core.train import TrainConfig, Trainer
from ddpm_core.unet import build_unet

CONFIGS = {
    "base": dict(channels=32, channel_mults=[1, 2, 2], num_res_blocks=1, attention_resolutions=[7], dropout=0.0),
    "large": dict(channels=64, channel_mults=[1, 2, 2], num_res_blocks=2, attention_resolutions=[7], dropout=0.0),
}
IMAGE_SIZE, IMAGE_CHANNELS, T_TRAIN = 28, 1, 1000
# Caps on the instruction set (ATen's kernels, oneDNN's convolutions, MKL's GEMM): with all three set to AVX2,
# an AVX-512 machine shows what an AVX2-only CPU of the same clock would do.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
Step = Callable[[], None]


def build_diffusers(cfg: dict) -> torch.nn.Module:
    """UNet2DModel with the same widths, blocks per level and attention at the lowest (7x7) level."""
    from diffusers import UNet2DModel

    widths = tuple(cfg["channels"] * m for m in cfg["channel_mults"])
    return UNet2DModel(sample_size=IMAGE_SIZE, in_channels=IMAGE_CHANNELS, out_channels=IMAGE_CHANNELS,
                       block_out_channels=widths, layers_per_block=cfg["num_res_blocks"],
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


class DiffusersEps(torch.nn.Module):
    """diffusers' UNet as eps(x_t, t) -> tensor, like ours."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def train_step(net: torch.nn.Module, batch: int) -> Step:
    """ddpm_core's training step for `net` (Trainer.train_step, the one `train` runs), on random 8-bit images;
    the trainer's settings are the library defaults (clipping at 1, EMA with warm-up, fused AdamW)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4096, IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=gen, dtype=torch.uint8)
    cfg = TrainConfig(steps=10**9, batch_size=batch, lr=1e-4)
    trainer = Trainer(net, NoiseSchedule.named("linear", T_TRAIN), images, cfg, torch.device("cpu"))

    def step() -> None:  # returns nothing: `timed` takes a float result for the call's own duration
        trainer.train_step()

    return step


def timed(fn: Callable[[], object], n: int) -> float:
    """Seconds per call of fn, over n calls; a call returning a float reports its own duration instead."""
    total = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        own = fn()
        total += own if isinstance(own, float) else time.perf_counter() - t0
    return total / n


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process) so far; machine figure from /proc/stat."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    own = usage.ru_utime + usage.ru_stime
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return own, own  # not Linux: cannot see other processes
    busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq
    return busy, own


def round_order(names: list[str], calls: int, r: int) -> list[str]:
    """Call order within round r: mirrored passes (A B C C B A ...) so that a drift of the machine's speed during
    the round costs every fn the same; the starting order alternates between rounds."""
    first = names if r % 2 == 0 else names[::-1]
    return [name for i in range(calls) for name in (first if i % 2 == 0 else first[::-1])]


def interleave(fns: dict[str, Callable[[], object]], calls: int, repeats: int,
               max_foreign: float = 0.15, max_retries: int = 5) -> tuple[dict[str, list[float]], int]:
    """Seconds per call of each fn over `repeats` rounds (each fn `calls` times per round), and the number of
    discarded rounds. A round during which other processes used more than `max_foreign` CPUs on average is
    discarded and rerun (up to `max_retries` times in all): 2 busy threads beside ours slow small ops by 10x,
    which a median over a few rounds does not hide. (Slowdowns from outside this machine stay invisible.)
    """
    for fn in fns.values():  # warm-up: allocator, oneDNN primitive caches
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    done, discarded = 0, 0
    while done < repeats:
        (busy0, own0), wall0 = cpu_seconds(), time.perf_counter()
        row = {name: 0.0 for name in fns}
        for name in round_order(list(fns), calls, done):
            row[name] += timed(fns[name], 1) / calls
        (busy1, own1), wall = cpu_seconds(), time.perf_counter() - wall0
        if ((busy1 - busy0) - (own1 - own0)) / wall > max_foreign and discarded < max_retries:
            discarded += 1
            time.sleep(2.0)
            continue
        for name, sec in row.items():
            out[name].append(sec)
        done += 1
    return out, discarded


def step_flops(step: Step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


class Matmul:
    """fp32 [n, n] @ [n, n]; a call runs it `tries` times back to back and returns the best time, since the
    first run after the network's steps pays for thread-pool and clock warm-up."""

    def __init__(self, n: int = 2048, tries: int = 3):
        self.a, self.b, self.out, self.tries = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n), tries
        self.flops = 2 * n ** 3

    def __call__(self) -> float:
        return min(timed(lambda: torch.mm(self.a, self.b, out=self.out), 1) for _ in range(self.tries))


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den (each round's pair measured back to back)."""
    return statistics.median(a / b for a, b in zip(num, den))


def bench_training(cfg_name: str, batch: int, repeats: int, calls: int) -> dict:
    """Training throughput and FLOP-rate fractions of ours vs diffusers for one config."""
    cfg = CONFIGS[cfg_name]
    torch.manual_seed(0)
    ours, theirs = build_unet(cfg, IMAGE_CHANNELS, IMAGE_SIZE), DiffusersEps(build_diffusers(cfg))
    steps = {"ours": train_step(ours, batch), "diffusers": train_step(theirs, batch)}
    flops = {k: step_flops(s) for k, s in steps.items()}
    mm = Matmul()
    secs, discarded = interleave({**steps, "matmul": mm}, calls, repeats)
    mm_rate = [mm.flops / s for s in secs.pop("matmul")]
    res: dict = {"config": cfg, "batch": batch, "params": {"ours": n_params(ours), "diffusers": n_params(theirs)},
                 "matmul_2048_gflops": statistics.median(mm_rate) / 1e9, "discarded_rounds": discarded,
                 "models": {}}
    for name, s in secs.items():
        ips = [batch / x for x in s]
        frac = [flops[name] / x / m for x, m in zip(s, mm_rate)]
        res["models"][name] = {"images_per_s": statistics.median(ips), "images_per_s_rounds": ips,
                               "gflop_per_step": flops[name] / 1e9,
                               "gflops": flops[name] / statistics.median(s) / 1e9,
                               "fraction_of_matmul": statistics.median(frac)}
    # The same function's work at diffusers' (plain) FLOP count: ours skips FLOPs (transposed-conv upsampling).
    eff = [flops["diffusers"] / x / m for x, m in zip(secs["ours"], mm_rate)]
    res["models"]["ours"]["effective_fraction_of_matmul"] = statistics.median(eff)
    res["speedup_vs_diffusers"] = median_ratio(secs["diffusers"], secs["ours"])
    return res


def bench_elbo(cfg_name: str, n_images: int, T: int, chunk: int, repeats: int) -> dict:
    """nll_bpd throughput against the raw no_grad forward at batch `chunk`, interleaved."""
    torch.manual_seed(0)
    net = build_unet(CONFIGS[cfg_name], IMAGE_CHANNELS, IMAGE_SIZE).eval()
    schedule = NoiseSchedule.named("linear", T)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (n_images, IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=gen) * (2 / 255) - 1
    xb = torch.randn(chunk, IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    tb = torch.randint(0, T, (chunk,), generator=gen)
    passes = n_images * T

    def forward_all() -> None:  # the same number of network passes as the ELBO, at the same batch size
        with torch.no_grad():
            for start in range(0, passes, chunk):
                net(xb[: min(chunk, passes - start)], tb[: min(chunk, passes - start)])

    secs, discarded = interleave({"elbo": lambda: nll_bpd(net, schedule, x0, chunk_size=chunk),
                                  "forward": forward_all}, 1, repeats)
    rates = {k: [passes / s for s in v] for k, v in secs.items()}
    return {"config": cfg_name, "n_images": n_images, "T": T, "chunk_size": chunk,
            "elbo_image_steps_per_s": statistics.median(rates["elbo"]),
            "forward_image_steps_per_s": statistics.median(rates["forward"]),
            "elbo_over_forward": median_ratio(secs["forward"], secs["elbo"]), "rounds": rates,
            "discarded_rounds": discarded}


def environment(argv: list[str]) -> dict:
    import diffusers

    isa_env = " ".join(f"{k}={os.environ[k]}" for k in ISA_ENV if k in os.environ)  # an ISA cap, if one is set
    return {"command": " ".join(filter(None, [isa_env, "PYTHONPATH=. .venv/bin/python", "benchmarks/bench_unet.py",
                                              *argv])),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "cpu_isa": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# UNet benchmark: ddpm_core vs diffusers UNet2DModel (CPU)", "",
             f"Command: `{env['command']}`  ", f"torch {env['torch']}, diffusers {env['diffusers']}, "
             f"{env['threads']} threads, {env['cpu']} ({env.get('cpu_isa', '?')}), {env['date']}; "
             f"medians over {report['repeats']} interleaved rounds.", "",
             "## Training step (ddpm_core's Trainer.train_step: batch, forward, L_simple, backward, clipping, "
             "fused AdamW, EMA), 28x28x1", "",
             "| config | model | params | images/s | GFLOP/step | GFLOP/s | fraction of matmul |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, res in report["training"].items():
        for model, m in res["models"].items():
            params = res["params"].get(model, res["params"]["ours"])
            lines.append(f"| {name} (batch {res['batch']}) | {model} | {params:,} | {m['images_per_s']:.1f} | "
                         f"{m['gflop_per_step']:.1f} | {m['gflops']:.1f} | {m['fraction_of_matmul']:.0%} |")
    lines.append("")
    for name, res in report["training"].items():
        lines.append(f"- {name}: ours / diffusers = **{res['speedup_vs_diffusers']:.2f}x** (median of per-round "
                     f"ratios); fp32 2048x2048 matmul {res['matmul_2048_gflops']:.1f} GFLOP/s; ours at diffusers' "
                     f"FLOP count: {res['models']['ours']['effective_fraction_of_matmul']:.0%} of matmul; "
                     f"{res['discarded_rounds']} rounds rerun for foreign CPU load")
    e = report["elbo"]
    lines += ["", "## ELBO evaluation (ddpm_core.elbo.nll_bpd) vs raw no_grad forward", "",
              f"{e['config']} config, N={e['n_images']}, T={e['T']}, chunk_size={e['chunk_size']}: "
              f"ELBO {e['elbo_image_steps_per_s']:.1f} image-steps/s, forward {e['forward_image_steps_per_s']:.1f}"
              f" image-steps/s, ratio **{e['elbo_over_forward']:.0%}**.", "",
              "FLOPs are those each network executes (FlopCounterMode): ours computes the nearest-upsample + 3x3 "
              "conv as a 4x4 stride-2 transposed conv, so its step has fewer FLOPs than diffusers' for the same "
              "function (see ddpm_core/unet.py). Fraction of matmul: a step's FLOP/s over the fp32 2048x2048 "
              "matmul's (best of 3) in the same round, median over rounds. Ratios are medians of per-round "
              "ratios; within a round the models run in mirrored order (A B B A) against drift."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds per measurement (median)")
    p.add_argument("--quick", action="store_true", help="base config only, fewer calls: a smoke run (~1 min)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--elbo-images", type=int, default=8)
    p.add_argument("--elbo-T", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out-dir", type=Path, default=Path("reports/benchmarks"))
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = max(1, args.repeats if not args.quick else min(args.repeats, 3))
    report: dict = {"environment": environment(argv), "repeats": repeats, "training": {}}
    configs = ["base"] if args.quick else ["base", "large"]
    for name in configs:
        calls = 1 if args.quick or name == "large" else 2
        report["training"][name] = bench_training(name, args.batch, repeats, calls)
        print(json.dumps({name: {k: v["images_per_s"] for k, v in report["training"][name]["models"].items()}}))
    n_img, T = (4, 50) if args.quick else (args.elbo_images, args.elbo_T)
    report["elbo"] = bench_elbo("base", n_img, T, args.chunk_size, repeats)
    write_report(args.out_dir, "unet", report, markdown(report), indent=2)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
