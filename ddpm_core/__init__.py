"""ddpm_core: DDPM (Ho et al. 2020) as its derivation goes. See docs/derivation.md.

Modules: schedules (betas, NoiseSchedule, respace), diffusion (q, posterior, p_theta, parameterizations),
losses (Gaussian KL, discretized decoder, L_simple), elbo (negative ELBO in bits/dim), sampling (ancestral,
respaced, DDIM), unet (eps_theta), train (resumable training with EMA), checkpoint, data, fid (FID-proxy),
serving (a trained network, its schedule and sampling defaults as one file).
Importing the package has no side effects.
"""

__version__ = "0.1.0"
