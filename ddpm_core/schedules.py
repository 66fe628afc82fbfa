"""Beta schedules and the arrays every DDPM formula reads.

Glossary (code name = paper symbol, Ho et al. 2020 / improved DDPM):
    betas                           beta_t
    alphas                          alpha_t = 1 - beta_t
    alphas_cumprod                  abar_t = prod_{s<=t} alpha_s
    alphas_cumprod_prev             abar_{t-1}   (abar_0 = 1)
    posterior_variance              beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    posterior_log_variance_clipped  log beta_tilde_t, index 0 replaced by index 1 (beta_tilde_1 = 0)
    posterior_mean_coef1/2          coefficients of x_0 and x_t in mu_tilde_t(x_t, x_0)

Indexing: every array has length T and index i holds t = i + 1 ("index 0 is t = 1").
Everything is float64; callers cast when they apply a coefficient to a tensor.

Endpoint policy for `linear`, `quadratic` and `sigmoid`: the T = 1000 endpoints (1e-4, 0.02) are scaled by
1000 / T, as improved DDPM does, so that the sum of the betas (about 10.05 for linear) is the same for every T.
abar_T is then about 4e-5 (linear) or 7e-4 (quadratic) for T of a few hundred and above, and smaller still for
small T (linear: 8e-6 at T = 50, 8e-9 at T = 21), so sampling starts close to N(0, I). beta_T = 20 / T must stay
below 1: these schedules need T >= 21.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math

import numpy as np

SCHEDULES = ("linear", "quadratic", "cosine", "sigmoid")
MAX_T = 100_000
COSINE_S = 0.008
MAX_BETA = 0.999


class ScheduleError(ValueError):
    """A schedule name or T that cannot give a valid diffusion."""


def _scaled_endpoints(name: str, T: int) -> tuple[float, float]:
    scale = 1000.0 / T
    beta_start, beta_end = scale * 1e-4, scale * 0.02
    if beta_end >= 1.0:
        raise ScheduleError(
            f"schedule '{name}' needs T >= 21: its last beta is 20/T (endpoints 1e-4, 0.02 scaled by 1000/T) "
            f"and must stay below 1; got T={T}"
        )
    return beta_start, beta_end


def cosine_alphas_cumprod(T: int, s: float = COSINE_S) -> np.ndarray:
    """abar_t = f(t) / f(0) with f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2, for t = 0..T (length T + 1)."""
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return f / f[0]


def make_betas(name: str, T: int) -> np.ndarray:
    """Betas of a named schedule, float64, shape [T]; index 0 is t = 1.

    - linear:    linspace(1e-4, 0.02, T) * 1000/T
    - quadratic: linspace(sqrt(1e-4 * 1000/T), sqrt(0.02 * 1000/T), T) ** 2   (Ho's "quad")
    - cosine:    beta_t = min(1 - abar_t / abar_{t-1}, 0.999) with the improved-DDPM abar, s = 0.008
    - sigmoid:   beta_start + (beta_end - beta_start) * sigmoid(linspace(-6, 6, T)), endpoints as linear
                 (the GeoDiff form that diffusers calls "sigmoid"; Ho's and lucidrains' differ)
    """
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool):
        raise ScheduleError(f"T must be an integer; got {T!r}")
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule '{name}'; choose one of {', '.join(SCHEDULES)}")
    if not 2 <= T <= MAX_T:
        raise ScheduleError(f"T must be between 2 and {MAX_T}; got T={T}")
    if name == "cosine":
        abar = cosine_alphas_cumprod(int(T))
        return np.minimum(1.0 - abar[1:] / abar[:-1], MAX_BETA)
    beta_start, beta_end = _scaled_endpoints(name, int(T))
    if name == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if name == "quadratic":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    x = np.linspace(-6.0, 6.0, T, dtype=np.float64)
    return beta_start + (beta_end - beta_start) / (1.0 + np.exp(-x))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class NoiseSchedule:
    """All per-step arrays of one diffusion, float64, computed once in the paper's order.

    `timestep_map[i]` is the t index the network sees at index i: arange(T) for a full schedule, the kept
    original indices for a respaced one (see `respace`).
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    alphas: np.ndarray = field(init=False)
    alphas_cumprod: np.ndarray = field(init=False)
    alphas_cumprod_prev: np.ndarray = field(init=False)
    sqrt_alphas_cumprod: np.ndarray = field(init=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = field(init=False)
    log_one_minus_alphas_cumprod: np.ndarray = field(init=False)
    posterior_variance: np.ndarray = field(init=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False)
    posterior_mean_coef1: np.ndarray = field(init=False)
    posterior_mean_coef2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        b = np.asarray(self.betas, dtype=np.float64)
        if b.ndim != 1 or len(b) < 2:
            raise ScheduleError(f"betas must be a 1-D array of length >= 2; got shape {b.shape}")
        if not (np.all(b > 0) and np.all(b < 1)):
            raise ScheduleError(f"betas must lie in (0, 1); got min {b.min():.3g}, max {b.max():.3g}")
        alphas = 1.0 - b
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)  # beta_tilde_t, = 0 at t = 1
        values = {
            "betas": b,
            "timestep_map": np.asarray(self.timestep_map, dtype=np.int64),
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
            "posterior_variance": post_var,
            # log(0) at t = 1 is replaced by log(beta_tilde_2), as Ho et al. and improved-diffusion do.
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": b * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        }
        if values["timestep_map"].shape != b.shape:
            raise ScheduleError("timestep_map must have one entry per beta")
        for name, value in values.items():
            object.__setattr__(self, name, _frozen(value))

    @classmethod
    def from_betas(cls, betas: np.ndarray, timestep_map: np.ndarray | None = None) -> "NoiseSchedule":
        betas = np.asarray(betas, dtype=np.float64)
        return cls(betas=betas, timestep_map=np.arange(len(betas)) if timestep_map is None else timestep_map)

    @classmethod
    def named(cls, name: str, T: int) -> "NoiseSchedule":
        return cls.from_betas(make_betas(name, T))

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def fixed_large_variance(self) -> np.ndarray:
        """beta_t with index 0 set to beta_tilde at index 1 (so that log-variance is finite at t = 1)."""
        return np.append(self.posterior_variance[1], self.betas[1:])


def respaced_indices(T: int, K: int) -> np.ndarray:
    """K evenly spaced indices of 0..T-1 that keep both ends, as improved DDPM's `space_timesteps(T, [K])`.

    That convention: a fractional stride (T - 1) / (K - 1) is added up in floating point and each running sum
    is rounded half to even (Python's round), so a tie such as 166.5 (T = 1000, K = 25) gives 166, not 167.
    The stride is >= 1, so the indices are distinct; K = T keeps every index.
    """
    if not 2 <= K <= T:
        raise ScheduleError(f"respaced step count must be between 2 and T={T}; got {K}")
    stride = (T - 1) / (K - 1)
    kept, position = [], 0.0
    for _ in range(K):
        kept.append(round(position))
        position += stride
    return np.array(kept, dtype=np.int64)


def respace(schedule: NoiseSchedule, K: int) -> NoiseSchedule:
    """A K-step schedule on the kept indices S_1 < ... < S_K with beta_k = 1 - abar_{S_k} / abar_{S_{k-1}}.

    abar at the kept steps is unchanged, so q(x_t | x_0) agrees there; the network still sees the original
    t index through `timestep_map`. K = T gives back the original betas.
    """
    kept = respaced_indices(schedule.T, K)
    abar = schedule.alphas_cumprod[kept]
    betas = 1.0 - abar / np.append(1.0, abar[:-1])
    return NoiseSchedule.from_betas(betas, timestep_map=schedule.timestep_map[kept])
