"""Training with AdamW, warm-up, gradient clipping and an EMA of the weights; resumable.

The loss is L_simple, improved DDPM's hybrid or the bound itself, optionally Min-SNR weighted (objectives.py);
t is drawn uniformly or by importance sampling (resample.py), with each loss weighted by 1 / (T p_t).
Every random draw comes from saved generator states (the data order and the t / noise draws from two seeded
generators, dropout from the global RNG) and the importance sampler's loss history is saved too, so a run
killed at any moment and resumed from its last checkpoint ends, on CPU with the same thread count, with
weights bit-identical to an uninterrupted run.

Precision: cfg.precision is the resolved one (compute.resolve decides it; "bf16" runs the network under
autocast, the loss stays fp32). Several ranks (torchrun, distributed.py): every rank draws the whole global
batch from the same generators and trains on its slice; DDP averages the gradients, the importance sampler
learns from every rank's losses (gathered, in global batch order), the EMA is updated on every rank from the
same weights, and rank 0 alone writes. A checkpoint resumes only with the world size and precision it was
written with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .compute import Autocast, Precision, World
from .data import to_model_range
from .diffusion import Objective, Variance
from .objectives import Loss, LossWeighting, check_objective, training_losses
from .resample import TSampler, make_t_sampler
from .schedules import NoiseSchedule


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class ResumeError(CheckpointError, ValueError):
    """A checkpoint that would mix two experiments if this run continued it (other settings, precision or ranks)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay_n = min(ema_decay, (1 + n) / (10 + n)), so early EMA weights are not stale
    seed: int = 0
    objective: Objective = "eps"
    variance: Variance = "fixed_small"  # 'learned_range' trains a 2C-channel network (needs loss hybrid or vlb)
    loss: Loss = "simple"
    t_sampler: TSampler = "uniform"
    loss_weighting: LossWeighting = "none"
    min_snr_gamma: float = 5.0  # used by loss_weighting 'min_snr'
    precision: Precision = "fp32"  # resolved by compute.resolve: 'bf16' = the network under bf16 autocast
    compile: bool = False
    checkpoint_every: int = 500
    log_every: int = 10

    def __post_init__(self) -> None:
        check_objective(self.loss, self.variance, self.loss_weighting)


@dataclass
class TrainResult:
    model: nn.Module
    ema_model: nn.Module
    losses: np.ndarray  # the training loss (as weighted) of every step, [steps]
    step: int
    resumed_from: int  # 0 for a fresh run


def ema_avg_fn(decay: float, warmup: bool) -> Callable:
    """multi_avg_fn for torch.optim.swa_utils.AveragedModel: ema <- ema + (1 - d_n) (param - ema)."""

    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay
        torch._foreach_lerp_(ema_params, [p.to(e.dtype) for e, p in zip(ema_params, params)], 1.0 - d)

    return update


class Trainer:
    """Owns the optimisation state of one run (or of this rank of a torchrun job); the model, schedule and data
    are given to it."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, images: torch.Tensor, cfg: TrainConfig,
                 device: torch.device, meta: dict[str, Any] | None = None, world: World = World()):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError("images must be a uint8 tensor [N, C, H, W]")
        self.cfg, self.schedule, self.device, self.meta, self.world = cfg, schedule, device, dict(meta or {}), world
        self.rows = distributed.rank_slice(cfg.batch_size, world)  # this rank's rows of every global batch
        self.images = images  # stays uint8 on CPU; batches are scaled on the way to the device
        self.model = model.to(device)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_avg_fn(cfg.ema_decay, cfg.ema_warmup),
                                 use_buffers=True)
        # fused AdamW: one kernel for all parameters, on CPU too (1.04-1.08x a whole training step on the 2-core
        # CPUs here); deterministic, so resumed runs stay bit-identical
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        warmup = max(1, cfg.warmup_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda k: min(1.0, (k + 1) / warmup))
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.t_sampler = make_t_sampler(cfg.t_sampler, schedule.T)  # draws from noise_gen
        # dropout draws from the global RNG (saved in every checkpoint); each rank its own stream, rank 0 the
        # one-process stream
        torch.manual_seed(cfg.seed + 2 + DROPOUT_RANK_STRIDE * world.rank)
        net = distributed.wrap(self.model, device, world)
        net = torch.compile(net) if cfg.compile else net
        self.forward = Autocast(net, device.type) if cfg.precision == "bf16" else net
        self.step = 0
        self.losses: list[float] = []

    # --- one step ---------------------------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The global batch's x0 rows of this rank, and t, noise and the importance weights of t (None: all 1)
        of the whole global batch (every rank draws them all, from the same generators)."""
        n = self.cfg.batch_size
        idx = torch.randint(len(self.images), (n,), generator=self.data_gen)
        x0 = to_model_range(self.images[idx[self.rows]]).to(self.device, non_blocking=True)
        t, weights = self.t_sampler.sample(n, self.noise_gen, self.device)
        noise = torch.randn((n, *self.images.shape[1:]), generator=self.noise_gen, device=self.device)
        return x0, t, noise, weights

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             weights: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """This rank's mean loss (to differentiate) and the global batch's mean loss (to report). The sampler
        learns from the global batch's per-example losses, before importance weights."""
        c, rows = self.cfg, self.rows
        per_example = training_losses(self.forward, self.schedule, x0, t[rows], noise[rows], c.objective,
                                      c.variance, c.loss, c.loss_weighting, c.min_snr_gamma)
        everyone = distributed.gather(per_example.detach(), self.world)  # [global batch], in batch order
        self.t_sampler.update(t, everyone)
        if weights is None:
            return per_example.mean(), float(everyone.mean())
        w = weights.to(per_example.dtype)
        return (per_example * w[rows]).mean(), float((everyone * w).mean())

    def train_step(self) -> float:
        self.model.train()
        loss, value = self.loss(*self.batch())
        if not math.isfinite(value):  # the global value: every rank stops at the same step
            raise NonFiniteLossError(f"loss is {value} at step {self.step + 1}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over ranks here
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update_parameters(self.model)  # on every rank, from the same weights: every rank's EMA is equal
        self.step += 1
        self.losses.append(value)
        return value

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (a collective under torchrun: every rank gives its dropout RNG state; rank 0 writes)."""
        own = torch.get_rng_state()
        rng = {"data": self.data_gen.get_state(), "noise": self.noise_gen.get_state(), "torch": own}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world.world_size > 1:
            ranks = distributed.gather_objects({k: rng[k] for k in ("torch", "cuda") if k in rng}, self.world)
            rng["ranks"] = {"torch": [r["torch"] for r in ranks]}
            if "cuda" in rng:
                rng["ranks"]["cuda"] = [r["cuda"] for r in ranks]
        return {
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "lr_scheduler": self.sched.state_dict(), "step": self.step, "rng": rng,
            "losses": torch.tensor(self.losses, dtype=torch.float64), "train_config": asdict(self.cfg),
            "t_sampler": self.t_sampler.state_dict(), "world_size": self.world.world_size,
            "schedule_betas": torch.from_numpy(np.array(self.schedule.betas)), "meta": self.meta,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        check_compatible(ckpt["train_config"], asdict(self.cfg))
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world != self.world.world_size:
            raise ResumeError(f"the checkpoint was written by {saved_world} process(es) and this run has "
                              f"{self.world.world_size}: resume it with train.devices: {saved_world}, or start a "
                              f"new checkpoint (another number of ranks would not continue the same run)")
        if not np.array_equal(ckpt["schedule_betas"].numpy(), self.schedule.betas):
            raise ResumeError("the checkpoint was trained with a different noise schedule")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["lr_scheduler"])
        self.step = int(ckpt["step"])
        self.losses = ckpt["losses"].tolist()
        self.t_sampler.load_state_dict(ckpt.get("t_sampler", {}))
        rng, r = ckpt["rng"], self.world.rank
        self.data_gen.set_state(rng["data"])
        self.noise_gen.set_state(rng["noise"])
        torch.set_rng_state(rng["ranks"]["torch"][r] if "ranks" in rng else rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["ranks"]["cuda"][r] if "ranks" in rng else rng["cuda"], self.device)


DROPOUT_RANK_STRIDE = 7919  # rank r's dropout RNG is seeded seed + 2 + r * stride


RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every")


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A run may be resumed with more steps or other logging; anything else would mix two experiments.
    A key the checkpoint lacks (written before the key existed) counts as its default."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    saved = {**defaults, **saved}
    diff = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if diff:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in diff)
        why = ("; the precision is resolved per machine (auto: bf16 where native), so a run continues only where it "
               "resolves the same" if "precision" in diff else "")
        raise ResumeError(f"checkpoint was written with other training settings ({pairs}){why}; "
                          f"use a new checkpoint path or the old settings")


def train(model: nn.Module, schedule: NoiseSchedule, images: torch.Tensor, cfg: TrainConfig,
          checkpoint_path: str | Path, device: torch.device | str = "cpu", meta: dict[str, Any] | None = None,
          on_log: Callable[[int, float, float], None] | None = None, progress: bool = True,
          world: World = World(),
          on_checkpoint: Callable[[int, nn.Module], None] | None = None) -> TrainResult:
    """Train until cfg.steps, resuming from `checkpoint_path` when it exists; checkpoints every
    cfg.checkpoint_every steps and at the end. `on_log(step, loss, lr)` is called every cfg.log_every steps,
    `on_checkpoint(step, ema_model)` just before each checkpoint is written (what it records about steps up
    to `step` is then never behind the checkpoint a resumed run starts from).
    Under torchrun (`world` of several ranks, process group initialised) every rank calls this; rank 0 alone
    reads the checkpoint (and broadcasts it), logs, shows progress, calls the hooks and writes.
    """
    trainer = Trainer(model, schedule, images, cfg, torch.device(device), meta, world)
    path, main = Path(checkpoint_path), world.is_main
    if world.world_size == 1:
        ckpt = load_checkpoint(path, map_location=trainer.device) if path.exists() else None
    else:
        ckpt = distributed.broadcast(load_checkpoint(path) if main and path.exists() else None, world)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        del ckpt
    start = trainer.step
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (progress and main))
    while trainer.step < cfg.steps:
        try:
            loss = trainer.train_step()
        except NonFiniteLossError as e:
            bar.close()
            kept = f"last good checkpoint kept at {path}" if path.exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(f"{e}; training stopped, {kept}") from None
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            bar.set_postfix(loss=f"{loss:.4f}")
            if on_log is not None and main:
                on_log(trainer.step, loss, trainer.sched.get_last_lr()[0])
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
            state = trainer.state_dict()  # every rank: their RNG states are gathered
            if main:
                if on_checkpoint is not None:
                    on_checkpoint(trainer.step, trainer.ema.module)
                try:
                    save_checkpoint(state, path)
                except CheckpointError:  # e.g. a full disk: the error starts on a line of its own, after the bar
                    bar.close()
                    raise
    bar.close()
    return TrainResult(trainer.model, trainer.ema.module, np.asarray(trainer.losses), trainer.step, start)
