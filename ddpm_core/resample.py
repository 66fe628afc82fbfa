"""How training draws t: uniformly, or by importance sampling on the loss's second moment (improved DDPM 3.3).

loss_second_moment keeps the last HISTORY losses of every t. Until every t has HISTORY of them it draws t
uniformly; then
    p_t = (1 - UNIFORM_MIX) sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + UNIFORM_MIX / T
and each drawn example's loss is weighted by 1 / (T p_t), so E_{t ~ p}[L_t / (T p_t)] = (1/T) sum_t L_t: the
objective stays the uniform one, only its variance changes. All draws come from the caller's generator, and the
history is plain tensors (`state_dict`), so a resumed run draws the same t as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

TSampler = Literal["uniform", "loss_second_moment"]
T_SAMPLERS = ("uniform", "loss_second_moment")
HISTORY = 10
UNIFORM_MIX = 0.001


class UniformSampler:
    """t ~ U{0, ..., T-1}; weights are None (all 1)."""

    def __init__(self, T: int):
        self.T = T

    def sample(self, n: int, generator: torch.Generator,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.randint(self.T, (n,), generator=generator, device=device), None

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LossSecondMomentSampler(UniformSampler):
    """Importance sampling of t with p_t proportional to the RMS of the last HISTORY losses of t."""

    def __init__(self, T: int, history: int = HISTORY, uniform_mix: float = UNIFORM_MIX):
        super().__init__(T)
        self.uniform_mix = uniform_mix
        self.history = torch.zeros(T, history, dtype=torch.float64)  # [T, HISTORY], oldest first
        self.counts = torch.zeros(T, dtype=torch.long)  # losses seen per t, capped at HISTORY

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history.shape[1]).all())

    def probs(self) -> torch.Tensor:
        """p_t, float64 [T]: uniform before warm-up."""
        if not self.warmed_up():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        rms = self.history.pow(2).mean(dim=1).sqrt()
        return (1.0 - self.uniform_mix) * rms / rms.sum() + self.uniform_mix / self.T

    def sample(self, n: int, generator: torch.Generator,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """n draws of t (long [n]) and their weights 1 / (T p_t) (float64 [n]; None before warm-up)."""
        if not self.warmed_up():
            return super().sample(n, generator, device)  # the uniform draw itself, not multinomial(uniform)
        p = self.probs().to(device)
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, 1.0 / (self.T * p[t])

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each example's loss to its t's history, in batch order (a full history drops its oldest)."""
        size = self.history.shape[1]
        for i, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[i] == size:
                self.history[i, :-1] = self.history[i, 1:].clone()
                self.history[i, -1] = loss
            else:
                self.history[i, self.counts[i]] = loss
                self.counts[i] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["history"].shape) != tuple(self.history.shape):
            raise ValueError(f"t-sampler history has shape {tuple(state['history'].shape)}; "
                             f"this run needs {tuple(self.history.shape)}")
        self.history = state["history"].to(torch.float64).cpu().clone()
        self.counts = state["counts"].to(torch.long).cpu().clone()


def make_t_sampler(name: TSampler, T: int) -> UniformSampler:
    if name == "uniform":
        return UniformSampler(T)
    if name == "loss_second_moment":
        return LossSecondMomentSampler(T)
    raise ValueError(f"unknown t sampler '{name}'; choose one of {', '.join(T_SAMPLERS)}")
