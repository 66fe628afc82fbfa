"""A trained network as one file that samples: the eps network's weights, its noise schedule, and what it
takes to rebuild and sample it, in a checkpoint that loads with weights_only=True (checkpoint.py).

    meta = {"model": the `model` section (build_unet), "image_shape": [C, H, W], "variance", "objective",
            "sampling": {"sampler", "steps", "eta", "order", "clip_x0", "batch_size"} (the defaults), ...}

The MLflow registry's generator (pipeline/generator.py) carries this file as its artifact; Python users get
the network back with `load_eps_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .diffusion import output_channels
from .schedules import NoiseSchedule
from .unet import build_unet

KIND = "eps_model"
NEEDS = ("model", "image_shape", "variance", "objective", "sampling")


def save_eps_model(path: str | Path, net: nn.Module, schedule: NoiseSchedule, meta: dict[str, Any]) -> None:
    missing = [k for k in NEEDS if k not in meta]
    if missing:
        raise ValueError(f"meta lacks {', '.join(missing)}")
    weights = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    save_checkpoint({"kind": KIND, "weights": weights, "schedule_betas": torch.from_numpy(np.array(schedule.betas)),
                     "meta": meta}, path)


def load_eps_model(path: str | Path,
                   device: torch.device | str = "cpu") -> tuple[nn.Module, NoiseSchedule, dict[str, Any]]:
    """(eps network in eval mode on `device`, its NoiseSchedule (float64), meta) from save_eps_model's file."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("kind") != KIND:
        raise CheckpointError(f"{path} is a ddpm_core checkpoint but not an eps model (kind {ckpt.get('kind')!r})")
    meta = ckpt["meta"]
    c, size = meta["image_shape"][0], meta["image_shape"][1]
    net = build_unet(meta["model"], c, size, output_channels(c, meta["variance"]))
    net.load_state_dict(ckpt["weights"])
    return net.to(device).eval(), NoiseSchedule.from_betas(ckpt["schedule_betas"].numpy()), meta
