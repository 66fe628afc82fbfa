"""A one-tensor face of eps_theta for model registries (MLflow's PyTorch flavour takes a single input)."""

from __future__ import annotations

import torch
from torch import nn


class FlatEpsModel(nn.Module):
    """forward(z): z is float [N, 1 + C*H*W] = [t index, x_t flattened]; returns eps_hat flattened [N, C*H*W]
    (the prediction of the network's objective). A learned-variance network's v channels are dropped: only the
    first C output channels are returned."""

    def __init__(self, net: nn.Module, image_shape: tuple[int, int, int]):
        super().__init__()
        self.net, self.image_shape = net, tuple(image_shape)
        self.input_size = 1 + self.image_shape[0] * self.image_shape[1] * self.image_shape[2]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        t = z[:, 0].round().long()
        x = z[:, 1:].reshape(-1, *self.image_shape)
        return self.net(x, t)[:, : self.image_shape[0]].flatten(1)
