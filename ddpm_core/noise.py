"""The noise every sampler draws: from one generator for the batch, or one generator per row.

With a list of generators, row i draws only from generator i, so an image depends on its own seed alone,
not on the rows it is batched with (`sampling.sample_seeds`).
"""

from __future__ import annotations

from typing import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator]  # one for the batch, or one per row


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """N(0, I) of `shape`; with a list of generators, row i is drawn from generator i alone."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device)
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
