"""accelerator=skiptuning: scale the UNet's encoder-to-decoder long skips by rho_i <= 1 at sampling time.

Ma et al., "The Surprising Effectiveness of Skip-Tuning in Diffusion Sampling", ICML 2024 (arXiv 2402.15170):
concat(u_i, d_i) -> concat(u_i, rho_i * d_i) for every long skip d_i, nothing else. Applied through
out-of-place forward pre-hooks on the up blocks (positional tuple in UNet2DModel, keyword tuple in
UNet2DConditionModel); the time schedule reads t from the model_fn wrapper (the loop owns time).
ControlNet residuals are added to the skips before the up blocks (diffusers), so they are scaled with them
unless `scale_controlnet_residuals=false`, which scales only the UNet's own part: rho (s - c) + c.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hiresrun.accelerators import Accelerator
from hiresrun.errors import UsageError
from hiresrun.models import ModelFn
from hiresrun.support import ANY_UNET, Support


def find_unet(net: nn.Module) -> nn.Module:
    """The UNet inside what a method trains (the net itself, or e.g. Self-Cascade's CascadeNet.unet)."""
    unet = next((m for m in net.modules() if hasattr(m, "up_blocks") and hasattr(m, "down_blocks")), None)
    if unet is None:
        raise UsageError(f"this accelerator needs a UNet with down_blocks and up_blocks; {type(net).__name__} has none")
    return unet


def num_skips(unet: nn.Module) -> int:
    """K = 1 (conv_in) + per down block: its resnets + 1 if it downsamples (= len(down_block_res_samples))."""
    return 1 + sum(len(b.resnets) + (1 if getattr(b, "downsamplers", None) else 0) for b in unet.down_blocks)


class SkipTuning(Accelerator):
    """Depth-ramped (or constant) skip scaling, optionally weighted over time (paper sec. 5.2)."""

    # Both UNet call conventions; one-step generators too (the paper's Table 3 tunes distilled one-step EDMs).
    supports = Support(level="features",
                       unets=ANY_UNET, why="it scales the skips the UNet's up blocks receive; a transformer has none")

    def __init__(self, mode: str = "constant",       # constant | linear (depth ramp, endpoint-inclusive)
                 rho: float = 0.8,                     # constant mode: every skip
                 rho_bottom: float = 0.5,              # linear mode: the deepest skip (paper example 0.5)
                 rho_top: float = 1.0,                 # linear mode: the conv_in skip
                 time_schedule: str = "none",          # none | increasing | decreasing | window
                 window: tuple[float, float] | None = None,  # window schedule: [t_lo, t_hi] on the train grid
                 num_train_timesteps: int = 1000,      # T, to normalise t for the ramps
                 allow_amplify: bool = False,          # rho > 1 injects noise (paper); refused unless set
                 scale_controlnet_residuals: bool = True):  # false: rho (s - c) + c, ControlNet's c untouched
        if mode not in ("constant", "linear"):
            raise UsageError(f"accelerator.mode={mode}: choose constant or linear")
        if time_schedule not in ("none", "increasing", "decreasing", "window"):
            raise UsageError(f"accelerator.time_schedule={time_schedule}: "
                             f"choose none, increasing, decreasing or window")
        if time_schedule == "window" and (window is None or len(window) != 2):
            raise UsageError("accelerator.time_schedule=window needs accelerator.window=[t_lo,t_hi]")
        values = [rho] if mode == "constant" else [rho_bottom, rho_top]
        keys = f"accelerator.rho={rho}" if mode == "constant" else (f"accelerator.rho_bottom={rho_bottom}, "
                                                                      f"rho_top={rho_top}")
        if min(values) <= 0 or (max(values) > 1 and not allow_amplify):
            raise UsageError(f"{keys}: skip scales must lie in (0, 1]; rho > 1 amplifies skips and injects noise "
                             f"(set accelerator.allow_amplify=true to try anyway)")
        self.mode, self.rho, self.rho_bottom, self.rho_top = mode, rho, rho_bottom, rho_top
        self.time_schedule, self.window, self.T = time_schedule, window, num_train_timesteps
        self.num_train_timesteps = num_train_timesteps
        self.scale_controlnet_residuals = scale_controlnet_residuals
        self._state: dict = {"t": None, "residuals": None}

    def rhos(self, K: int) -> list[float]:
        """rho_i for depth i = 0 (deepest) .. K-1 (conv_in): rho_bottom + i (rho_top - rho_bottom) / (K - 1)."""
        if self.mode == "constant":
            return [self.rho] * K
        step = (self.rho_top - self.rho_bottom) / max(K - 1, 1)
        return [self.rho_bottom + i * step for i in range(K)]

    def weight(self, t: float | None) -> float:
        """w(t) in [0, 1]: how much of (1 - rho_i) applies at t. increasing: rho rises to 1 at t = T."""
        if self.time_schedule == "none" or t is None:
            return 1.0
        s = min(max(t / self.T, 0.0), 1.0)
        if self.time_schedule == "increasing":
            return 1.0 - s
        if self.time_schedule == "decreasing":
            return s
        return 1.0 if self.window[0] <= t <= self.window[1] else 0.0

    def attach(self, net: nn.Module) -> list[RemovableHandle]:
        unet = find_unet(net)
        K, consumed, handles = num_skips(unet), 0, []
        rhos = self.rhos(K)
        self._state.update(t=None, residuals=None)  # fresh per sampling call, in place: wrap() may come first
        if not self.scale_controlnet_residuals:
            handles.append(unet.register_forward_pre_hook(self._record_residuals, with_kwargs=True))
        for block in unet.up_blocks:
            L = len(block.resnets)
            # this block's tuple is down_block_res_samples[K - consumed - L : K - consumed]; position p is popped
            # at depth i = consumed + (L - 1 - p) (deepest = 0)
            factors = [rhos[consumed + L - 1 - p] for p in range(L)]
            handles.append(block.register_forward_pre_hook(self._hook(factors, K - consumed - L), with_kwargs=True))
            consumed += L
        if consumed != K:
            raise UsageError(f"skiptuning: up blocks consume {consumed} skips but the encoder makes {K}")
        return handles

    def _record_residuals(self, module, args, kwargs):
        """ControlNet's per-skip residuals c_q (diffusers adds them only when the mid residual is given too)."""
        control = kwargs.get("mid_block_additional_residual") is not None
        self._state["residuals"] = kwargs.get("down_block_additional_residuals") if control else None

    def _hook(self, factors: list[float], first: int):
        state = self._state

        def scale(module, args, kwargs):
            w, c = self.weight(state["t"]), state["residuals"]
            r = [1 - (1 - rho) * w for rho in factors]
            if c is None:  # out of place: rho_i d_i
                scaled = lambda skips: tuple(d * r_p for d, r_p in zip(skips, r))
            else:  # rho_i (s_i - c_i) + c_i: the UNet's own skip scaled, ControlNet's residual kept
                scaled = lambda skips: tuple((s - c[first + p]) * r_p + c[first + p]
                                             for p, (s, r_p) in enumerate(zip(skips, r)))
            if "res_hidden_states_tuple" in kwargs:
                return args, {**kwargs, "res_hidden_states_tuple": scaled(kwargs["res_hidden_states_tuple"])}
            return (args[0], scaled(args[1]), *args[2:]), kwargs

        return scale

    def wrap(self, model_fn: ModelFn, step=None) -> ModelFn:
        """Records the call's time for the schedule: t (0..num_train_timesteps), or under an EDM sampler sigma,
        with sigma_max playing T (so `window` is in sigma there)."""
        state = self._state
        edm = step is not None and step.sigma_max is not None
        self.T = float(step.sigma_max) if edm else float(self.num_train_timesteps)

        def timed(x: Tensor, t: Tensor, cond: dict) -> Tensor:
            state["t"] = step.time(t) if edm else float(torch.as_tensor(t).flatten()[0])
            return model_fn(x, t, cond)

        return timed
