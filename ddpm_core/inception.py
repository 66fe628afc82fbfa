"""The standard FID's features: pytorch-fid's FID Inception-v3, pool3 (2048-d), from a weights file on disk.

This is the network of TensorFlow's original FID, ported by pytorch-fid (its weights file
`pt_inception-2015-12-05-6726825d.pth`); torch-fidelity and torchmetrics use the same network with their own
copies of the weights. Features are computed as pytorch-fid computes them, so FIDs compare with published ones
(which use 50,000 samples against the training set; say which n and reference you used):
    uint8 [N, C, H, W] -> [0, 1] (x / 255); grayscale repeated to 3 channels (PIL's convert('RGB'));
    bilinear resize to 299 x 299 (align_corners=False); scaled to [-1, 1]; the blocks up to the final average
    pool -> [N, 2048].
The architecture is torchvision's Inception-v3 with pytorch-fid's patched blocks (FIDInceptionA/C/E_1/E_2), so the
state dict of pytorch-fid's file loads into it strictly. Nothing is downloaded unless the caller allows it:
`find_weights` looks at the named file, or at torch hub's cache where pytorch-fid itself keeps the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from .checkpoint import CheckpointError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch hub's convention: the file name carries its hash's first digits
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
FEATURE_DIM = 2048
INPUT_SIZE = 299


class MissingWeightsError(CheckpointError):
    """The FID Inception weights are not on disk (and were not allowed to be downloaded)."""


def hub_weights_path() -> Path:
    """Where pytorch-fid (through torch hub) keeps the weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def find_weights(path: str | Path | None, download: bool = False) -> Path:
    """The weights file: `path` if given (it must exist), else torch hub's cache; with download=True a missing
    cache file is fetched from pytorch-fid's release (internet). Otherwise MissingWeightsError, one line."""
    if path is not None:
        if Path(path).is_file():
            return Path(path)
        raise MissingWeightsError(f"FID Inception weights not found at {path} (evaluate.inception_weights); put "
                                  f"pytorch-fid's {WEIGHTS_FILE} there")
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    if not download:
        raise MissingWeightsError(f"FID Inception weights {WEIGHTS_FILE} not found: evaluate.inception_weights is "
                                  f"null and torch hub's cache has no {cached}; copy the file there or name it in "
                                  f"evaluate.inception_weights, or set data.download: true to fetch it (internet)")
    torch.hub.load_state_dict_from_url(WEIGHTS_URL, progress=True, check_hash=True)  # writes `cached`
    return cached


def _check_hash(path: Path) -> None:
    if path.name != WEIGHTS_FILE:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise CheckpointError(f"{path} is damaged: its sha256 starts {digest[:8]}, not {WEIGHTS_SHA256_PREFIX}")


def fid_inception_v3() -> nn.Module:
    """torchvision's Inception-v3 (1008 classes, no aux head) with pytorch-fid's patched blocks, untrained."""
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (FIDInceptionA(192, 32), FIDInceptionA(256, 64),
                                                FIDInceptionA(288, 64))
    net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, channels_7x7=128), FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, channels_7x7=160), FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    return net


class InceptionPool3(nn.Module):
    """Images in [0, 1], [N, 3, H, W] -> pool3 features [N, 2048], as pytorch-fid's InceptionV3([3])."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.blocks(2 * x - 1).flatten(1)


def load_inception(path: str | Path, device: torch.device | str = "cpu") -> InceptionPool3:
    """The pool3 network with the weights at `path` (loaded with weights_only=True, strictly), in eval mode."""
    path = Path(path)
    _check_hash(path)
    net = fid_inception_v3()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, OSError, EOFError, AttributeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path} is not pytorch-fid's FID Inception state dict ({reason})") from None
    return InceptionPool3(net).eval().to(device)


def inception_featurize(path: str | Path, device: torch.device | str = "cpu", batch_size: int = 50):
    """A Featurize (uint8 [N, C, H, W] -> float64 [N, 2048]) with the FID Inception network at `path`."""
    net = load_inception(path, device)

    @torch.no_grad()
    def featurize(images: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(images[i:i + batch_size]).to(device).float() / 255.0
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            out.append(net(x).double().cpu())
        return torch.cat(out).numpy() if out else np.empty((0, FEATURE_DIM))

    return featurize
