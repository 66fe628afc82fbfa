"""Small shared fixtures for tests: a tiny digits UNet and its schedule."""

import torch

from ddpm_core.data import load_digits
from ddpm_core.schedules import NoiseSchedule
from ddpm_core.unet import build_unet

TINY_MODEL = dict(channels=16, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[4], dropout=0.1)


def tiny_unet(seed: int = 0, out_channels: int | None = None) -> torch.nn.Module:
    """out_channels=2: the width of a learned-variance network on these 1-channel images."""
    torch.manual_seed(seed)
    return build_unet(TINY_MODEL, image_channels=1, image_size=8, out_channels=out_channels)


def digits_images() -> torch.Tensor:
    return torch.from_numpy(load_digits().train_images)


def tiny_schedule() -> NoiseSchedule:
    return NoiseSchedule.named("linear", 100)
