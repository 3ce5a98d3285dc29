"""EDM bases (Karras et al., NeurIPS 2022): the preconditioning and the deterministic second-order sampler.

An EDM network outputs F, and its denoiser is D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with
c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4 (EDM Table 1). hiresrun follows diffusers' EDM
schedulers (`EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`): the scheduler applies c_in in
`scale_model_input`, hands the network c_noise as the timestep, and applies c_skip / c_out in `step`, so the
sampling loop, methods and accelerators see the network exactly as for any other diffusers scheduler.
`EDMHeunScheduler` adds EDM's Algorithm 1 with S_churn = 0 (Heun on the Karras grid, rho 7, from sigma_max times
the seed's noise, 2n - 1 evaluations for n steps), which diffusers does not ship.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor


def scheduler_config(sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                     rho: float = 7.0) -> dict:
    """What an EDM base's scheduler config says (model.parametrization=edm): EDM's values, diffusers' key names."""
    return {"sigma_data": sigma_data, "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho,
            "sigma_schedule": "karras", "prediction_type": "epsilon", "num_train_timesteps": 1000,
            "parametrization": "edm"}


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM eq. 5: n noise levels from sigma_max down to sigma_min, then 0 (n + 1 values)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    high, low = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(high + ramp * (low - high)) ** rho, torch.zeros(1, dtype=torch.float64)])


def coefficients(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 at noise level `sigma`."""
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data / total ** 0.5, 1 / total ** 0.5, sigma.log() / 4


@dataclass
class StepOutput:
    prev_sample: Tensor


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    """EDM's Algorithm 1 (S_churn = 0) in diffusers' scheduler interface, for `sampler=edm_heun`.

    Model calls: step i evaluates D at sigma_i, takes the Euler step to sigma_{i+1}, and, unless sigma_{i+1} = 0,
    evaluates D there again and averages the two slopes. Like diffusers' Heun, `timesteps` lists one entry per
    call ([c(s_0), c(s_1), c(s_1), ..., c(s_{n-1})]: 2n - 1), `order` is 2, and the network gets c_noise.
    """

    order = 2

    @register_to_config
    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 num_train_timesteps: int = 1000, sigma_schedule: str = "karras", prediction_type: str = "epsilon",
                 parametrization: str = "edm"):
        if prediction_type != "epsilon":  # "epsilon" is diffusers' name for EDM's F with c_out > 0
            raise ValueError(f"EDMHeunScheduler takes EDM's F (prediction_type=epsilon), not {prediction_type}")
        self.sigmas = karras_sigmas(1, sigma_min, sigma_max, rho)
        self.timesteps, self._index, self._begin = torch.zeros(1), 0, 0
        self._first = None  # (x, slope, dt) of the current step's first call

    @property
    def init_noise_sigma(self) -> float:
        return float(self.config.sigma_max)  # Algorithm 1: x_0 = sigma_max * n

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        c = self.config
        self.sigmas = karras_sigmas(num_inference_steps, c.sigma_min, c.sigma_max, c.rho)
        calls = torch.cat([self.sigmas[:1], self.sigmas[1:-1].repeat_interleave(2)])
        self.call_sigmas = calls
        self.timesteps = calls.log().div(4).to(device=device, dtype=torch.float32)
        self._index, self._begin, self._first = 0, 0, None

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._index = self._begin = begin_index
        self._first = None

    def _sigma(self, call: int) -> Tensor:
        return self.call_sigmas[call]

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        _, _, c_in, _ = coefficients(self._sigma(self._index), self.config.sigma_data)
        return sample * c_in.to(sample.dtype)

    def _denoised(self, sample: Tensor, model_output: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out, _, _ = coefficients(sigma, self.config.sigma_data)
        return (c_skip * sample.double() + c_out * model_output.double()).to(sample.dtype)

    def step(self, model_output: Tensor, timestep, sample: Tensor, **_) -> StepOutput:
        call, self._index = self._index, self._index + 1
        sigma = self._sigma(call)
        if self._first is None:  # predictor at sigma_i
            step = (call + 1) // 2
            sigma_next = self.sigmas[step + 1]
            slope = (sample - self._denoised(sample, model_output, sigma)) / sigma.to(sample.dtype)
            dt = (sigma_next - sigma).to(sample.dtype)
            euler = sample + dt * slope
            if sigma_next > 0:
                self._first = (sample, slope, dt)
            return StepOutput(euler)
        x, slope, dt = self._first  # corrector at sigma_{i+1}
        self._first = None
        slope_next = (sample - self._denoised(sample, model_output, sigma)) / sigma.to(sample.dtype)
        return StepOutput(x + dt * (slope + slope_next) / 2)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x + sigma eps at the noise level of the loop's first kept call (an SDEdit-style start)."""
        return original_samples + noise * self._sigma(self._begin).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
