"""PaGoDA's encoder: the frozen base as a deterministic PF-ODE map data -> noise (Kim et al. 2024, §3 of the spec).

Everything here works in the VE view of Karras et al. 2022 (EDM): x_sigma = x + sigma eps and a denoiser
D(x; sigma). A view is how one base's network gives D: its input scaling c_in(sigma), its time input t(sigma), and
x0(out, x, sigma), the denoised image from the raw network output.
- A VP base (`VEView`): sigma(t) = sqrt((1 - abar_t) / abar_t), c_in = 1 / sqrt(1 + sigma^2) (x_t itself),
  t(sigma) interpolated on the discrete training grid, D = x - sigma eps_hat (eps, v or x0 prediction).
- An EDM-preconditioned base (`EDMView`, model.parametrization=edm): c_in = 1 / sqrt(sigma^2 + sigma_data^2),
  t = c_noise = ln(sigma) / 4, D = c_skip x + c_out F (EDM Table 1, hiresrun/edm.py).
Latents are stored in VE scale (std ~ sigma_max).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from hiresrun.errors import UsageError


class View:
    """D(x; sigma) = x0(net(c_in(sigma) x, t(sigma)), x, sigma); subclasses say what each part is."""

    kind: str

    def t(self, sigma: float) -> float:
        raise NotImplementedError

    def c_in(self, sigma: float) -> float:
        raise NotImplementedError

    def x0(self, out: Tensor, x: Tensor, sigma: float) -> Tensor:
        raise NotImplementedError

    def denoise(self, unet: nn.Module, x: Tensor, sigma: float, cond: dict | None = None) -> Tensor:
        t = torch.full((x.shape[0],), self.t(sigma), device=x.device, dtype=torch.float32)
        return self.x0(unet(self.c_in(sigma) * x, t, **(cond or {})).sample, x, sigma)


def view_of(scheduler_config: dict) -> View:
    """The view of a base from its scheduler config (EDM bases carry parametrization=edm there)."""
    return EDMView(scheduler_config) if scheduler_config.get("parametrization") == "edm" else VEView(scheduler_config)


class EDMView(View):
    """An EDM-preconditioned network F: D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4)."""

    kind = "edm"

    def __init__(self, scheduler_config: dict):
        self.sigma_data = float(scheduler_config.get("sigma_data", 0.5))

    def t(self, sigma: float) -> float:
        return float(np.log(sigma) / 4)

    def c_in(self, sigma: float) -> float:
        return c_in(sigma, self.sigma_data)

    def x0(self, out: Tensor, x: Tensor, sigma: float) -> Tensor:
        total = sigma ** 2 + self.sigma_data ** 2
        return self.sigma_data ** 2 / total * x + sigma * self.sigma_data / total ** 0.5 * out


class VEView(View):
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

    def c_in(self, sigma: float) -> float:
        return c_in(sigma)

    def x0(self, out: Tensor, x: Tensor, sigma: float) -> Tensor:
        """D(x; sigma) = x - sigma eps_hat (EDM eq. 7 for a VP eps-model)."""
        return x - sigma * self.eps(out, self.c_in(sigma) * x, sigma)


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


def heun_invert(view: View, unet: nn.Module, x0: Tensor, steps: int, sigma_max: float, cond=None) -> Tensor:
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
