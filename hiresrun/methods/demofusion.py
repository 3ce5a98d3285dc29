"""method=demofusion: DemoFusion (Du et al., CVPR 2024), the training-free baseline that later high-resolution papers
report.

The base first samples at its own size. Each phase s = 2, ..., S (S = target / base) then resizes the last phase's
latent z by s / (s - 1) (bicubic) and samples at s times the base size with three changes to the loop:

- skip residual: before step i the latent becomes x (1 - c1) + q(z, t_i) c1, q being the scheduler's own noising of
  z to step i's level (one noise draw per phase) and c1 = c^cosine_scale_1 with the cosine factor
  c = (1 + cos(pi (T - t) / T)) / 2 (T: the schedule's training steps), so early, noisy steps follow the resized
  sample and late ones are free;
- local patches (MultiDiffusion): the base runs on base-size windows `stride` apart (with a random jitter of up to
  (window - stride) / 4 inside a zero border of that width) and each position takes the mean of its windows;
- dilated sampling: the base runs on the s^2 interleaved sub-grids x[h::s, w::s] of a Gaussian-blurred copy of the
  latent (kernel 2 s - 1, standard deviation sigma (0.99 c^cosine_scale_3 + 0.01), then brought back to the latent's
  own mean and std), each a base-size view of the whole image;

and the two are mixed as (1 - c2) local + c2 global with c2 = c^cosine_scale_2. A phase ends by bringing its latent
to the first phase's mean and std.

The authors step the scheduler on every view and average the stepped views. For the first-order deterministic steps
they use (DDIM, Euler) a step is affine in (x, model output) with one pair of coefficients for every position, so
that average is the step of the averaged model output: hiresrun averages the outputs and steps once, which runs
unchanged under multistep solvers too (tests/test_demofusion.py checks the two agree with DDIM). A schedule that
clamps its x0 estimate (`clip_sample`, in DDPM pixel configs) clamps the averaged estimate once instead of each
view's. SDXL's local views carry their window's corner as the crop coordinates, as the authors condition them.

Every view is one base-size network call: counted NFE is per view. Accelerators that keep state from one call to the
next (step and block caches) cannot follow the views and are refused; feature-level ones run on every view.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun import sampling
from hiresrun.errors import UsageError
from hiresrun.methods.none import NoneMethod
from hiresrun.models import model_fn, rows
from hiresrun.support import Support


def cosine_factor(t: Tensor | float, train_steps: int) -> float:
    """c = (1 + cos(pi (T - t) / T)) / 2: 1 at t = T, 0 at t = 0."""
    return 0.5 * (1 + math.cos(math.pi * (train_steps - float(t)) / train_steps))


def gaussian_filter(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Depthwise Gaussian blur, zero padding, the output the input's size (odd `kernel_size`)."""
    coords = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - (kernel_size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, kernel_size, kernel_size)
    return F.conv2d(x, kernel, padding=kernel_size // 2, groups=x.shape[1])


def windows(height: int, width: int, window: int, stride: int, jitter: random.Random | None = None
            ) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of the windows covering a height x width latent `stride` apart, the last one in
    each direction moved back inside. With `jitter`, each window moves by up to j = (window - stride) // 4 (a window
    on a side only outwards, into the border) and the coordinates are in the latent padded by j on every side."""
    def starts(side: int) -> list[int]:
        n = int((side - window) / stride - 1e-6) + 2 if side > window else 1
        return [min(k * stride, max(side - window, 0)) for k in range(n)]

    j = (window - stride) // 4
    views = []
    for row in starts(height):
        for col in starts(width):
            top, bottom, left, right = row, row + window, col, col + window
            if jitter is not None:  # a window touching a side may move outwards into the border, not inwards
                def shift(start: int, end: int, side: int) -> int:
                    return jitter.randint(-j if end != side else 0, j if start != 0 else 0)
                dw = shift(left, right, width)
                dh = shift(top, bottom, height)
                top, bottom, left, right = top + dh + j, bottom + dh + j, left + dw + j, right + dw + j
            views.append((top, bottom, left, right))
    return views


def _per_image(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(dim=(1, 2, 3), keepdim=True), x.std(dim=(1, 2, 3), keepdim=True)


class DemoFusion(NoneMethod):
    """The base at its own size, then one progressively larger phase per integer scale with skip residuals, local
    patches and dilated sampling."""

    supports = Support(views=True, edm=False, why_edm="its cosine factors read the discrete timestep t / T",
                       why="it runs the base on base-size views of the image",
                       why_flow="its skip residual noises the low-resolution sample on the VP schedule and its cosine "
                                "factors read the VP timestep")

    def __init__(self, resolution: int,
                 stride: int | None = None,        # local windows' spacing in latent pixels; null = half a window
                 cosine_scale_1: float = 3.0,      # skip residual weight c^cosine_scale_1
                 cosine_scale_2: float = 1.0,      # dilated (global) share c^cosine_scale_2 of the mix
                 cosine_scale_3: float = 1.0,      # blur decay: sigma (0.99 c^cosine_scale_3 + 0.01)
                 sigma: float = 1.0,               # the Gaussian's standard deviation at t = T
                 jitter: bool = True,              # move the local windows randomly (the authors' default)
                 view_batch: int = 16,             # views per network call
                 seed: int = 0):                   # the window jitter's seed (shared by every image)
        super().__init__(resolution)
        for name, value in (("cosine_scale_1", cosine_scale_1), ("cosine_scale_2", cosine_scale_2),
                            ("cosine_scale_3", cosine_scale_3)):
            if value < 0:
                raise UsageError(f"method.{name}={value}: an exponent of the cosine factor, at least 0")
        if sigma <= 0:
            raise UsageError(f"method.sigma={sigma}: the Gaussian's standard deviation, above 0")
        if view_batch < 1:
            raise UsageError(f"method.view_batch={view_batch}: views per network call, at least 1")
        if stride is not None and stride < 1:
            raise UsageError(f"method.stride={stride}: the local windows' spacing in latent pixels, at least 1")
        self.stride, self.sigma, self.jitter = stride, float(sigma), bool(jitter)
        self.scales = (float(cosine_scale_1), float(cosine_scale_2), float(cosine_scale_3))
        self.view_batch, self.seed = int(view_batch), int(seed)

    def wrap(self, base) -> nn.Module:
        net = super().wrap(base)
        if self.resolution % base.resolution:
            raise UsageError(f"method=demofusion grows the image by whole multiples of the base's {base.resolution} "
                             f"px and data.resolution={self.resolution} is not one; use a multiple of "
                             f"{base.resolution}")
        window = base.resolution // base.latent_factor
        if self.stride is not None and self.stride > window:
            raise UsageError(f"method.stride={self.stride}: local windows are {window} latent pixels wide; a stride "
                             f"of 1 to {window} leaves no gaps")
        return net

    def loop_steps(self, num_steps: int) -> list[int]:
        return [num_steps] * max(self.resolution // self.base.resolution, 1)

    def sample(self, net: nn.Module, gens: list[torch.Generator], loop) -> Tensor:
        scale = self.resolution // self.base.resolution
        if scale == 1:
            return super().sample(net, gens, loop)
        fn = model_fn(net)
        z = loop.at(self.base.resolution)(fn, sampling.noise(gens, self.latent_shape(self.base.resolution),
                                                              net.device))
        anchor_mean, anchor_std = _per_image(z)
        for s in range(2, scale + 1):
            shape = self.latent_shape(self.base.resolution * s)
            z = F.interpolate(z, size=shape[1:], mode="bicubic")
            eps = sampling.noise(gens, shape, net.device)
            phase = loop if s == scale else loop.at(self.base.resolution * s)
            train_steps = int(phase.scheduler.config.num_train_timesteps)

            def prepare(i: int, t: Tensor, x: Tensor, z=z, eps=eps, sched=phase.scheduler, T=train_steps) -> Tensor:
                noised = sched.add_noise(z, eps, t.reshape(1))
                if i == 0:
                    return noised
                c1 = cosine_factor(t, T) ** self.scales[0]
                return x * (1 - c1) + noised * c1

            views = lambda f, step, s=s, T=train_steps, outer=phase.wrap: self.fused(outer(f, step), step, s, T)
            z = replace(phase, wrap=views)(fn, z, prepare=prepare)
            mean, std = _per_image(z)
            z = (z - mean) / std * anchor_std + anchor_mean
        return self.base.decode(z)

    def fused(self, f, step, s: int, train_steps: int):
        """The model function of phase s: local windows and dilated sub-grids, mixed by the cosine factor."""
        def call(x: Tensor, t: Tensor, cond: dict) -> Tensor:
            c = cosine_factor(t, train_steps)
            c2 = c ** self.scales[1]
            out = torch.zeros_like(x)
            if c2 < 1:
                out = out + (1 - c2) * self.local(f, x, t, cond, random.Random(f"{self.seed}/{s}/{step.index}"))
            if c2 > 0:
                sigma = self.sigma * (0.99 * c ** self.scales[2] + 1e-2)
                out = out + c2 * self.dilated(f, x, t, cond, s, sigma)
            return out
        return call

    def _calls(self, f, parts: list[Tensor], t: Tensor, cond: dict, crops: list[tuple[int, int]] | None = None
               ) -> list[Tensor]:
        """f on each view (each a batch of the images), `view_batch` views per call."""
        n, outs = parts[0].shape[0], []
        for k in range(0, len(parts), self.view_batch):
            chunk = parts[k:k + self.view_batch]
            idx = torch.arange(n).repeat(len(chunk))
            c = rows(cond, idx)
            if crops is not None:
                c = _with_crops(c, [crops[k + v] for v in range(len(chunk)) for _ in range(n)])
            outs.extend(f(torch.cat(chunk), t, c).chunk(len(chunk)))
        return outs

    def local(self, f, x: Tensor, t: Tensor, cond: dict, rng: random.Random) -> Tensor:
        window = self.base.resolution // self.base.latent_factor
        stride = self.stride if self.stride is not None else max(window // 2, 1)
        height, width = x.shape[-2:]
        j = (window - stride) // 4 if self.jitter else 0
        views = windows(height, width, window, stride, rng if self.jitter else None)
        padded = F.pad(x, (j, j, j, j))
        value, count = torch.zeros_like(padded), torch.zeros_like(padded)
        crops = [(top * self.base.latent_factor, left * self.base.latent_factor) for top, _, left, _ in views]
        outs = self._calls(f, [padded[:, :, a:b, c:d] for a, b, c, d in views], t, cond, crops)
        for (a, b, c, d), out in zip(views, outs):
            value[:, :, a:b, c:d] += out
            count[:, :, a:b, c:d] += 1
        return (value / count)[:, :, j:j + height, j:j + width]

    def dilated(self, f, x: Tensor, t: Tensor, cond: dict, s: int, sigma: float) -> Tensor:
        h_pad, w_pad = (s - x.shape[2] % s) % s, (s - x.shape[3] % s) % s
        padded = F.pad(x, (w_pad, 0, h_pad, 0))
        mean, std = _per_image(padded)
        blurred = gaussian_filter(padded, 2 * s - 1, sigma)
        b_mean, b_std = _per_image(blurred)
        blurred = (blurred - b_mean) / b_std * std + mean
        grid = [(h, w) for h in range(s) for w in range(s)]
        outs = self._calls(f, [blurred[:, :, h::s, w::s] for h, w in grid], t, cond)
        value = torch.zeros_like(padded)
        for (h, w), out in zip(grid, outs):
            value[:, :, h::s, w::s] = out
        return value[:, :, h_pad:, w_pad:]


def _with_crops(cond: dict, crops: list[tuple[int, int]]) -> dict:
    """SDXL conditioning whose rows carry these crop coordinates (top, left); other conditioning unchanged."""
    def fix(c: dict) -> dict:
        if "added_cond_kwargs" not in c:
            return c
        ids = c["added_cond_kwargs"]["time_ids"].clone()
        ids[:, 2:4] = torch.tensor(crops, dtype=ids.dtype, device=ids.device)
        return {**c, "added_cond_kwargs": {**c["added_cond_kwargs"], "time_ids": ids}}

    out = fix(cond)
    if isinstance(cond.get("negative"), dict):
        out["negative"] = fix(cond["negative"])
    return out
