"""PaGoDA's encoder: the frozen base as a deterministic PF-ODE map data -> noise (Kim et al. 2024, §3 of the spec).

The base is a VP model; its VE view (Karras et al. 2022, EDM) is x_sigma = x + sigma eps with
sigma(t) = sqrt((1 - abar_t) / abar_t) and D(x; sigma) = x - sigma eps_hat(x / sqrt(1 + sigma^2), t(sigma)),
t(sigma) interpolated on the discrete training grid. Latents are stored in VE scale (std ~ sigma_max).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from hiresrun.errors import UsageError


class VEView:
    """sigma <-> t on the base's discrete schedule, and the denoiser D(x; sigma) of a VP UNet."""

    def __init__(self, scheduler_config: dict):
        from diffusers import DDPMScheduler

        self.kind = scheduler_config.get("prediction_type", "epsilon")
        abar = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()
        self.log_sigmas = (((1 - abar) / abar).sqrt()).log().numpy()  # increasing in t

    def t(self, sigma: float) -> float:
        """t(sigma): linear interpolation of log sigma on the grid, clamped to [0, T - 1]."""
        return float(np.interp(np.log(sigma), self.log_sigmas, np.arange(len(self.log_sigmas))))

    def sigma(self, t: float) -> float:
        return float(np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas)))

    def eps(self, out: Tensor, x_t: Tensor, sigma: float) -> Tensor:
        """The raw UNet output at x_t = x / sqrt(1 + sigma^2) as eps (epsilon, v or sample prediction)."""
        a, s = 1 / (1 + sigma ** 2) ** 0.5, sigma / (1 + sigma ** 2) ** 0.5  # sqrt(abar), sqrt(1 - abar)
        if self.kind == "v_prediction":
            return s * x_t + a * out
        if self.kind == "sample":
            return (x_t - a * out) / s
        return out

    def denoise(self, unet: nn.Module, x: Tensor, sigma: float, cond: dict | None = None) -> Tensor:
        """D(x; sigma) = x - sigma eps_hat (EDM eq. 7 for a VP eps-model)."""
        x_t = c_in(sigma) * x
        t = torch.full((x.shape[0],), self.t(sigma), device=x.device, dtype=torch.float32)
        return x - sigma * self.eps(unet(x_t, t, **(cond or {})).sample, x_t, sigma)


def c_in(sigma: float, sigma_data: float = 1.0) -> float:
    """EDM's input scaling 1 / sqrt(sigma^2 + sigma_data^2); sigma_data = 1 is the VP base's own x_t scaling."""
    return 1 / (sigma ** 2 + sigma_data ** 2) ** 0.5


def karras_sigmas(n: int = 40, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM eq. 5: n values from sigma_max down to sigma_min, then 0 (the official 40-point grid)."""
    i = torch.arange(n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun(denoise, x: Tensor, sigmas: Tensor) -> Tensor:
    """Heun's method on dx/dsigma = (x - D(x; sigma)) / sigma along `sigmas` (either direction, all > 0):
    2 evaluations per step (EDM Alg. 1 without churn). Inversion runs the Karras grid reversed."""
    for s0, s1 in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoise(x, s0)) / s0
        x1 = x + (s1 - s0) * d
        x = x + (s1 - s0) * (d + (x1 - denoise(x1, s1)) / s1) / 2
    return x


def heun_invert(view: VEView, unet: nn.Module, x0: Tensor, steps: int, sigma_max: float, cond=None) -> Tensor:
    """Official encoder: x0 taken as x at sigma_min = 0.002, Heun up the reversed Karras grid to sigma_max:
    2 (steps - 1) evaluations (78 for 40 points)."""
    sigmas = karras_sigmas(steps, sigma_max=sigma_max)[:-1].flip(0)
    return heun(lambda x, s: view.denoise(unet, x, s, cond), x0, sigmas)


def ddim_grid(view: VEView, scheduler_config: dict, steps: int, sigma_max: float) -> dict:
    """Scheduler config whose `leading` DDIM grid of `steps` ends at the integer t nearest t(sigma_max):
    steps_offset shifts it; clipping off (inversion must be invertible); alpha_0 = 1 (start at clean data)."""
    T = int(scheduler_config.get("num_train_timesteps", 1000))
    t_end = round(view.t(sigma_max))
    offset = t_end - (steps - 1) * (T // steps)
    if steps < 1 or offset < 0:
        raise UsageError(f"method.inv_steps={steps}: a leading DDIM grid of that many steps cannot end at "
                         f"t={t_end} (= t(sigma_max)); use fewer steps, e.g. method.inv_steps=40")
    return {**scheduler_config, "timestep_spacing": "leading", "steps_offset": offset, "clip_sample": False,
            "set_alpha_to_one": True}


@torch.no_grad()
def ddim_invert(view: VEView, unet: nn.Module, x0: Tensor, steps: int, sigma_max: float, scheduler_config: dict,
                cond=None) -> Tensor:
    """DDIM inversion (Song et al. 2021, eq. 13 run forward) with diffusers' DDIMInverseScheduler, `steps`
    evaluations; the VP latent x_t is returned in VE scale x_t sqrt(1 + sigma(t)^2) (sigma(t) ~ sigma_max)."""
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler.from_config(ddim_grid(view, scheduler_config, steps, sigma_max))
    scheduler.set_timesteps(steps, device=x0.device)
    x = x0
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, **(cond or {})).sample, t, x).prev_sample
    t_end = int(scheduler.timesteps[-1])
    return x / scheduler.alphas_cumprod[t_end].to(x.device) ** 0.5
