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


def random_inception_weights(path) -> None:
    """A state dict of pytorch-fid's FID Inception shapes, random: He-initialized convolutions and batch norms
    near the identity, so that the 2048 features still depend on the image (default init loses it)."""
    from ddpm_core.inception import fid_inception_v3

    torch.manual_seed(0)
    net = fid_inception_v3()
    for name, t in net.state_dict().items():
        if name.endswith("conv.weight"):
            torch.nn.init.kaiming_normal_(t, nonlinearity="relu")
        elif name.endswith(("running_var", "bn.weight")):
            t.uniform_(0.8, 1.2)
        elif name.endswith(("running_mean", "bn.bias")):
            t.uniform_(-0.05, 0.05)
    torch.save(net.state_dict(), path)


def as_served(net: torch.nn.Module) -> torch.nn.Module:
    """`net` as the served generator runs it on this machine (pipeline/generator.py): sample.precision `auto`
    is bf16 autocast where this CPU computes bf16 natively, fp32 elsewhere, so a test's library reference draws
    the same images as the server on either kind of machine."""
    from ddpm_core.compute import World, resolve

    return resolve("auto", "auto", world=World(), section="sample").network(net)
