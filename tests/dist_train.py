"""A tiny digits training run for tests/test_distributed.py: `python tests/dist_train.py CKPT STEPS SETTING`,
alone (one process) or under torchrun (each rank). Rank 0 alone may write; every save is logged to CKPT.saves
as 'rank step' so the test can check who wrote."""

import os
from pathlib import Path
import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_core import compute, distributed  # noqa: E402
from ddpm_core import train as train_module  # noqa: E402
from ddpm_core.data import load_digits  # noqa: E402
from ddpm_core.schedules import NoiseSchedule  # noqa: E402
from ddpm_core.train import TrainConfig, train  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402

MODEL = dict(channels=16, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[4], dropout=0.0)
SETTINGS = {"default": ({}, 100, None),
            "learned_hybrid_is": (dict(variance="learned_range", loss="hybrid", t_sampler="loss_second_moment"), 30, 2)}


def main(path: str, steps: int, setting: str) -> None:
    torch.set_num_threads(int(os.environ.get("DIST_TRAIN_THREADS", "1")))
    extra, T, width = SETTINGS[setting]
    c = compute.resolve("cpu", "fp32")
    saves = Path(path + ".saves")
    original = train_module.save_checkpoint

    def logged(state, where):
        with open(saves, "a") as f:
            f.write(f"{c.world.rank} {state['step']}\n")
        original(state, where)

    train_module.save_checkpoint = logged
    cfg = TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=5, checkpoint_every=2, log_every=1, seed=3,
                      **extra)
    torch.manual_seed(0)
    net = build_unet(MODEL, image_channels=1, image_size=8, out_channels=width)
    with distributed.session(c):
        train(net, NoiseSchedule.named("linear", T), torch.from_numpy(load_digits().train_images), cfg, path,
              c.device, progress=False, world=c.world)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
