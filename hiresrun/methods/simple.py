"""method=simple: simple diffusion (Hoogeboom, Heek, Salimans, ICML 2023, arXiv 2301.11093).

Every weight trains at the target resolution (from the base: `init=pretrained`; or from scratch) under the cosine
log-SNR schedule shifted by 2 ln(noise_d / image_d) (paper §3.1), with v-prediction, the eps-MSE loss, an optional
multiscale loss (§3.2), dropout only on low-resolution feature maps (§3.3) and optional input downsampling by
patching or a LeGall 5/3 DWT (§3.4). Sampling discretises the schedule into diffusers `trained_betas`, which the
net records in its checkpoint, so any `sampler=` rebuilds the schedule it was trained with.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun.errors import UsageError
from hiresrun.methods.none import NoneMethod
from hiresrun.models import BaseModel
from hiresrun.support import ANY_UNET, Support

T = 1000  # discrete steps of the sampling schedule; net timestep i <-> continuous t = (i + 1) / T


# -- schedules: pure functions of continuous t in [0, 1] --------------------------------------------
def logsnr_cosine(t: Tensor, logsnr_min: float = -15.0, logsnr_max: float = 15.0, shift: float = 0.0,
                  clamp_range: bool = False) -> Tensor:
    """lambda(t) = -2 ln tan(t_min + t (t_max - t_min)) + shift, the cosine schedule in log-SNR, clamped to
    [logsnr_min, logsnr_max] through t_min, t_max. `clamp_range`: the clamp applies after the shift (endpoints stay
    at the range, k-diffusion ports); else before it (endpoints shift too: the pseudocode, lucidrains)."""
    lo, hi = (logsnr_min - shift, logsnr_max - shift) if clamp_range else (logsnr_min, logsnr_max)
    t_min, t_max = math.atan(math.exp(-0.5 * hi)), math.atan(math.exp(-0.5 * lo))
    return -2 * torch.log(torch.tan(t_min + t * (t_max - t_min))) + shift


def resolution_shift(noise_d: float, image_d: float) -> float:
    """2 ln(noise_d / image_d): SNR_d(t) = SNR_ref(t) (noise_d / d)^2 (paper eq. 5)."""
    return 2 * math.log(noise_d / image_d)


def logsnr_schedule(t: Tensor, schedule: str, noise_d: float, image_d: float, noise_d_high: float | None = None,
                    interp_direction: str = "pseudocode", shift_clamp_range: bool = False,
                    logsnr_range: tuple[float, float] = (-15.0, 15.0)) -> Tensor:
    """shifted: the cosine shifted from noise_d to image_d. interpolated: between the schedules shifted from
    noise_d (low) and noise_d_high. `pseudocode` (the default) is the paper's appendix code,
    t * low + (1 - t) * high: the high-noise end (t -> 1) follows the strongly shifted low-resolution schedule, the
    clean end the high-resolution one. `eq6` is the opposite assignment, (1 - t) low + t high, as the paper's eq. 6
    is transcribed in third-party notes and as k-diffusion's lerp(low, high, t) computes it."""
    cosine = lambda d: logsnr_cosine(t, *logsnr_range, resolution_shift(d, image_d), shift_clamp_range)
    if schedule == "shifted":
        return cosine(noise_d)
    low, high = cosine(noise_d), cosine(noise_d_high)
    return (1 - t) * low + t * high if interp_direction == "eq6" else t * low + (1 - t) * high


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """VP: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), so alpha^2 + sigma^2 = 1."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


# -- parametrisations (Salimans & Ho 2022): z = alpha x0 + sigma eps, v = alpha eps - sigma x0 -----------------
def v_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * eps - sigma * x0


def eps_from_v(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return sigma * z + alpha * v


def x0_from_v(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * z - sigma * v


# -- discretisation for diffusers schedulers --------------------------------------------------------
def trained_betas(logsnr_fn, num_steps: int = T) -> Tensor:
    """alpha_bar_i = sigmoid(lambda((i + 1) / T)), beta_i = 1 - alpha_bar_i / alpha_bar_{i-1} (alpha_bar_{-1} = 1),
    in float64; the same grid convention as diffusers' squaredcos_cap_v2."""
    alpha_bar = torch.sigmoid(logsnr_fn(torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps))
    return 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])


def scheduler_config(base_config: dict, schedule: dict) -> dict:
    """The base's scheduler config with the recorded schedule as `trained_betas` and its prediction type."""
    settings = {k: v for k, v in schedule.items() if k != "prediction_type"}
    betas = trained_betas(lambda t: logsnr_schedule(t, **settings))
    return {**base_config, "num_train_timesteps": T, "trained_betas": betas.tolist(),
            "prediction_type": schedule["prediction_type"]}


# -- loss --------------------------------------------------------------------------------------------
def multiscale_mse(eps_hat: Tensor, eps: Tensor, scales: list[int], per_scale_norm: str = "inv_s") -> Tensor:
    """Per-sample sum_s w_s mean((D_s[eps] - D_s[eps_hat])^2) / sum_s w_s, D_s average pooling to s x s (linear,
    so D_s[eps] - D_s[eps_hat] = D_s[eps - eps_hat]). inv_s: w_s = 1/s, lower scales weigh more; uniform: w_s = 1
    (the notes' 1/s over a 1/s-normalised pixel sum). One scale at full size is the plain per-pixel MSE."""
    d, diff = eps.shape[-1], (eps_hat - eps).float()
    w = [1.0 / s if per_scale_norm == "inv_s" else 1.0 for s in scales]
    losses = [F.avg_pool2d(diff, d // s).square().mean(dim=(1, 2, 3)) for s in scales]
    return sum(wi * li for wi, li in zip(w, losses)) / sum(w)


def place_dropout(unet: nn.Module, p: float, max_res: int, grid: int) -> list[int]:
    """Dropout p in the ResNet blocks whose feature maps are at most max_res on a side, 0 elsewhere (diffusers'
    `dropout` argument is global). Returns the sides that got dropout."""
    n, on = len(unet.down_blocks), set()
    levels = [(b, grid >> j) for j, b in enumerate(unet.down_blocks)] + [(unet.mid_block, grid >> (n - 1))]
    levels += [(b, grid >> (n - 1 - k)) for k, b in enumerate(unet.up_blocks)]
    for block, side in levels:
        for resnet in getattr(block, "resnets", []):
            resnet.dropout.p = p if side <= max_res else 0.0
            on |= {side} if side <= max_res and p > 0 else set()
    return sorted(on)


# -- input/output downsampling ----------------------------------------------------------------------
class Patch(nn.Module):
    """k x k patching: pixel-unshuffle in (C -> C k^2 channels at 1/k size), pixel-shuffle out."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(x, self.k)

    def inverse(self, y: Tensor) -> Tensor:
        return F.pixel_shuffle(y, self.k)


class DWT(nn.Module):
    """LeGall 5/3 (PyWavelets' bior2.2, via ptwt) applied `levels` times to every band (C -> 4^levels C channels),
    periodic boundary cropped to exactly half size (= PyWavelets' `periodization`); inverse by re-wrapping."""

    def __init__(self, levels: int):
        super().__init__()
        import pywt

        self.levels, self.wavelet = levels, pywt.Wavelet("bior2.2")

    def forward(self, x: Tensor) -> Tensor:
        import ptwt

        for _ in range(self.levels):
            half = x.shape[-1] // 2
            ll, (lh, hl, hh) = ptwt.wavedec2(x, self.wavelet, level=1, mode="periodic")
            x = torch.cat([b[..., :half, :half] for b in (ll, lh, hl, hh)], dim=1)
        return x

    def inverse(self, y: Tensor) -> Tensor:
        import ptwt

        extra = len(self.wavelet.dec_lo) // 2 - 1  # the coefficients ptwt's periodic mode repeats
        for _ in range(self.levels):
            n = y.shape[-1]
            ll, lh, hl, hh = (F.pad(b, (0, extra, 0, extra), mode="circular") for b in y.chunk(4, dim=1))
            y = ptwt.waverec2((ll, (lh, hl, hh)), self.wavelet)[..., : 2 * n, : 2 * n]
        return y


def rewire_io(unet: nn.Module, transform: nn.Module, channels: int, pretrained: bool) -> None:
    """conv_in / conv_out for the transformed channels. From pretrained weights, e_c = transform(constant image
    in channel c) gives the new convs as conv_in(average) and a constant-band output, so the net starts as the
    base run at the reduced size, upsampled."""
    old_in, old_out = unet.conv_in, unet.conv_out
    e = torch.stack([transform(torch.eye(channels)[c][None, :, None, None].expand(1, channels, 8, 8))[0, :, 0, 0]
                     for c in range(channels)])  # (C, C m)
    conv = lambda c_in, c_out, ref: nn.Conv2d(c_in, c_out, ref.kernel_size, padding=ref.padding)
    unet.conv_in, unet.conv_out = conv(e.shape[1], old_in.out_channels, old_in), conv(old_out.in_channels, e.shape[1],
                                                                                     old_out)
    if pretrained:
        with torch.no_grad():
            unet.conv_in.weight.copy_(torch.einsum("oc...,cm->om...", old_in.weight, e / e.square().sum(1, True)))
            unet.conv_in.bias.copy_(old_in.bias)
            unet.conv_out.weight.copy_(torch.einsum("ci...,cm->mi...", old_out.weight, e))
            unet.conv_out.bias.copy_(old_out.bias @ e)


DOWNSAMPLERS = {"patch": lambda k: Patch(k), "dwt": lambda k: DWT(int(math.log2(k)))}


# -- the trained module ---------------------------------------------------------------------------------------
class SimpleNet(nn.Module):
    """The UNet behind an optional input/output transform, plus its schedule as checkpointed extra state, so
    `hiresrun sample ckpt_path=...` rebuilds the schedule the weights were trained with."""

    def __init__(self, unet: nn.Module, schedule: dict, transform: nn.Module | None = None):
        super().__init__()
        self.unet, self.schedule, self.transform = unet, dict(schedule), transform

    def get_extra_state(self) -> dict:
        return dict(self.schedule)

    def set_extra_state(self, state: dict) -> None:
        self.schedule = dict(state)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def logsnr(self, t: Tensor) -> Tensor:
        settings = {k: v for k, v in self.schedule.items() if k != "prediction_type"}
        return logsnr_schedule(t.double(), **settings).to(t.dtype)

    def forward(self, x: Tensor, timestep: Tensor, **cond) -> SimpleNamespace:
        if self.transform is None:
            return SimpleNamespace(sample=self.unet(x, timestep, **cond).sample)
        return SimpleNamespace(sample=self.transform.inverse(self.unet(self.transform(x), timestep, **cond).sample))


class Simple(NoneMethod):
    """Full fine-tune (init=pretrained) or retrain (init=scratch) at the target resolution, simple-diffusion recipe."""

    trains = True
    supports = Support(unets=ANY_UNET, why="dropout and the multiscale loss sit on UNet blocks", edm=False,
                       why_edm="it trains its own VP log-SNR schedule")

    def __init__(self, resolution: int,                     # target resolution (image_d) in pixels
                 init: str = "pretrained",                  # pretrained (full fine-tune) | scratch (retrain)
                 schedule: str = "shifted",                 # shifted | interpolated (paper eq. 6)
                 noise_d: int | None = None,                # reference resolution; null = the base resolution
                 noise_d_high: int | None = None,           # interpolated only; null = the target resolution
                 interp_direction: str = "pseudocode",      # paper's code: high at t=0, low at t=1 | eq6: reversed
                 shift_clamp_range: bool = False,           # true: endpoints stay at logsnr_range after the shift
                 logsnr_range: tuple = (-15.0, 15.0),       # (lambda_min, lambda_max)
                 prediction_type: str = "v_prediction",     # v_prediction (paper) | epsilon
                 weighting: str = "eps_mse",                # eps_mse (paper) | min_snr (lucidrains: min(1, gamma/SNR))
                 min_snr_gamma: float = 5.0,                # weighting=min_snr only
                 multiscale: bool = True,                   # multiscale loss (paper §3.2)
                 multiscale_min: int | None = None,         # smallest scale; null = noise_d
                 per_scale_norm: str = "inv_s",             # inv_s (w_s = 1/s) | uniform
                 dropout: float = 0.1,                      # p on low-resolution ResNet blocks
                 dropout_max_res: int | None = None,        # largest feature-map side with dropout; null = target/4
                 downsample: str = "none",                  # none | patch | dwt (LeGall 5/3, needs ptwt)
                 downsample_factor: int = 2):               # patch k / DWT 2^levels
        super().__init__(resolution)
        for key, value, ok in (("init", init, ("pretrained", "scratch")),
                               ("schedule", schedule, ("shifted", "interpolated")),
                               ("interp_direction", interp_direction, ("eq6", "pseudocode")),
                               ("prediction_type", prediction_type, ("v_prediction", "epsilon")),
                               ("weighting", weighting, ("eps_mse", "min_snr")),
                               ("per_scale_norm", per_scale_norm, ("inv_s", "uniform")),
                               ("downsample", downsample, ("none", *DOWNSAMPLERS))):
            if value not in ok:
                raise UsageError(f"method.{key}={value}: choose {' or '.join(ok)}")
        if downsample != "none" and (downsample_factor < 2 or downsample_factor & (downsample_factor - 1)):
            raise UsageError(f"method.downsample_factor={downsample_factor}: use a power of two >= 2 (2 or 4)")
        if len(logsnr_range) != 2 or logsnr_range[0] >= logsnr_range[1]:
            raise UsageError(f"method.logsnr_range={list(logsnr_range)}: write [lambda_min, lambda_max], min < max")
        self.init, self.noise_d, self.noise_d_high = init, noise_d, noise_d_high
        self.settings = {"schedule": schedule, "interp_direction": interp_direction,
                         "shift_clamp_range": bool(shift_clamp_range), "logsnr_range": [float(v) for v in logsnr_range],
                         "prediction_type": prediction_type}
        self.weighting, self.min_snr_gamma, self.multiscale = weighting, min_snr_gamma, multiscale
        self.multiscale_min, self.per_scale_norm = multiscale_min, per_scale_norm
        self.dropout, self.dropout_max_res = dropout, dropout_max_res
        self.downsample, self.downsample_factor = downsample, downsample_factor

    def schedule(self, base: BaseModel) -> dict:
        """The schedule record: settings with the resolutions filled in (sample-space pixels, as d in the paper)."""
        f, noise_d = base.latent_factor, self.noise_d or base.resolution
        return {**self.settings, "noise_d": noise_d / f, "image_d": self.resolution / f,
                "noise_d_high": (self.noise_d_high or self.resolution) / f}

    def wrap(self, base: BaseModel) -> nn.Module:
        self.base = base
        unet = base.unet
        if self.init == "scratch":
            with torch.random.fork_rng():
                torch.manual_seed(0)
                unet = type(unet).from_config(unet.config)
        transform = None if self.downsample == "none" else DOWNSAMPLERS[self.downsample](self.downsample_factor)
        grid = self.resolution // base.latent_factor // (1 if transform is None else self.downsample_factor)
        if transform is not None:
            if grid % base.downsample_factor:
                raise UsageError(f"method.downsample_factor={self.downsample_factor} leaves a {grid}px grid, not "
                                 f"divisible by the UNet's {base.downsample_factor}; use a smaller factor")
            rewire_io(unet, transform, unet.config.in_channels, self.init == "pretrained")
        place_dropout(unet, self.dropout, self.dropout_max_res or self.resolution // base.latent_factor // 4, grid)
        self.net = SimpleNet(unet.train().requires_grad_(True), self.schedule(base), transform)
        return self.net

    def scheduler_config(self, base: BaseModel) -> dict:
        """For the sampler: the schedule recorded in the net (the checkpoint's, once its weights are loaded)."""
        return scheduler_config(base.scheduler_config, self.net.schedule)

    def scales(self, d: int, noise_d: float) -> list[int]:
        """Loss scales d, d/2, ... down to multiscale_min (default noise_d), in sample-space pixels."""
        if not self.multiscale:
            return [d]
        low = self.multiscale_min // self.base.latent_factor if self.multiscale_min else noise_d
        return [d >> k for k in range(int(math.log2(d)) + 1) if (d >> k) >= low and d % (d >> k) == 0]

    def loss(self, net: SimpleNet, batch: dict) -> dict[str, Tensor]:
        """eps-MSE with eps_hat = sigma z + alpha v_hat at t ~ U(0, 1]; the net sees timestep T t - 1,
        the discrete step whose alpha_bar the sampler uses (`trained_betas`)."""
        x0 = self.base.encode(batch["image"])
        t = 1 - torch.rand(x0.shape[0], device=x0.device)
        logsnr = net.logsnr(t)
        alpha, sigma = (a[:, None, None, None] for a in alpha_sigma(logsnr))
        eps = torch.randn_like(x0)
        z = alpha * x0 + sigma * eps
        out = net(z, T * t - 1, **self.base.batch_condition(batch)).sample
        eps_hat = eps_from_v(z, out, alpha, sigma) if net.schedule["prediction_type"] == "v_prediction" else out
        per_sample = multiscale_mse(eps_hat, eps, self.scales(x0.shape[-1], net.schedule["noise_d"]),
                                    self.per_scale_norm)
        if self.weighting == "min_snr":  # v-MSE min(SNR, gamma) / (SNR + 1) = eps-MSE min(1, gamma / SNR)
            per_sample = per_sample * torch.clamp(self.min_snr_gamma / logsnr.exp(), max=1.0)
        return {"loss": per_sample.mean(), "logsnr": logsnr.mean().detach()}
