"""method=scalecrafter: ScaleCrafter's re-dilation (He et al., ICLR 2024), one of Self-Cascade's tuning-free
comparison rows.

A UNet's convolutions see a fixed receptive field; at a larger image the objects they were trained on span more
pixels, and the base repeats them. ScaleCrafter re-dilates the convolutions of chosen blocks by the scale factor during
the first, high-noise share of the sampling steps: a k x k kernel reads its inputs d pixels apart (padding d (k - 1) / 2
keeps the size). A fractional factor f runs at d = ceil(f): the input is resized by d / f (bilinear), convolved with
dilation d, and the output resized back to the size the plain convolution gives.

The layers and factors: a named preset of the authors' published per-layer settings (`method.preset`: sd15-1024,
sd21-1024, sd21-2048, sdxl-2048), or every
convolution of the lowest-resolution blocks (the deepest down block, the mid block, the first up block; what the
authors' SD 1.5 1024 px setting dilates) by `method.dilation` (default target / base). `method.progressive` lowers the
factor step by step as the authors' SD 2.1 2048 px setting does: max(ceil(d (n - i) / n), 2) at step i of the n
re-dilated steps. Noise-damped guidance (`method.ndcfg`, the authors' SD 2.1 2048 px setting) replaces, during its
share of the steps, the unconditional prediction guidance starts from by one computed with a second re-dilation
setting: eps = eps_u' + w (eps_c - eps_u), eps_u' from the same latent re-dilated by the preset's `ndcfg` layers.
It costs a third network pass in those steps, counted (the conditional, unconditional and damped passes are three
calls). Not built: dispersed convolution, which every released config of the authors switches off (inflate_tau 0)
and whose solved transform they do not publish (docs/scalecrafter.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun import sampling
from hiresrun.errors import UsageError
from hiresrun.methods.none import NoneMethod
from hiresrun.models import guide, guided, model_fn, unet_kwargs
from hiresrun.support import ANY_UNET, Support


def _layers(blocks: dict[str, float], names: list[str]) -> dict[str, float]:
    return {f"{b}.{n}": d for b, d in blocks.items() for n in names}


_RES2 = ["resnets.0.conv1", "resnets.0.conv2", "resnets.1.conv1", "resnets.1.conv2"]
_RES3 = _RES2 + ["resnets.2.conv1", "resnets.2.conv2"]
# The authors' published settings (their assets/dilate_settings/*.txt and configs/*.yaml): layer -> factor, the share
# of a 50-step loop re-dilated (dilate_tau / 50) and whether the factor decays. SD 1.5 and SD 2.1 share the UNet's
# layout; at 1024 px both re-dilate every level below the first by 2 (39 layers), for 30 and 20 of 50 steps.
_BELOW_FIRST = {**_layers({"down_blocks.1": 2, "down_blocks.2": 2, "down_blocks.3": 2, "mid_block": 2}, _RES2),
                "down_blocks.1.downsamplers.0.conv": 2, "down_blocks.2.downsamplers.0.conv": 2,
                **_layers({"up_blocks.0": 2, "up_blocks.1": 2, "up_blocks.2": 2}, _RES3),
                "up_blocks.0.upsamplers.0.conv": 2, "up_blocks.1.upsamplers.0.conv": 2,
                "up_blocks.2.upsamplers.0.conv": 2}
PRESETS = {
    "sd15-1024": {"share": 30 / 50, "progressive": False, "layers": dict(_BELOW_FIRST)},
    "sd21-1024": {"share": 20 / 50, "progressive": False, "layers": dict(_BELOW_FIRST)},
    "sd21-2048": {"share": 37 / 50, "progressive": True, "layers": {
        **_layers({"down_blocks.2": 3}, _RES2), "down_blocks.2.downsamplers.0.conv": 4,
        **_layers({"down_blocks.3": 4, "mid_block": 4}, _RES2),
        **_layers({"up_blocks.0": 4, "up_blocks.1": 4}, _RES3), "up_blocks.0.upsamplers.0.conv": 4,
        "up_blocks.1.upsamplers.0.conv": 4, **_layers({"up_blocks.2": 3}, _RES3), "up_blocks.2.upsamplers.0.conv": 3,
        **_layers({"up_blocks.3": 2}, _RES3)},
        # noise-damped guidance: the unconditional pass that guidance starts from, re-dilated without the last level
        "ndcfg": {"share": 37 / 50, "without": ("up_blocks.3.",)}},
    # SDXL's UNet has three levels: the authors' file also lists down_blocks.3, which SDXL lacks and their code skips
    # (it re-dilates the named modules that exist), so what runs is the mid block and the first up block
    "sdxl-2048": {"share": 30 / 50, "progressive": False, "layers": {
        **_layers({"mid_block": 2}, _RES2), **_layers({"up_blocks.0": 2}, _RES3), "up_blocks.0.upsamplers.0.conv": 2}},
}


def redilated_conv(conv: nn.Conv2d, factor: float, x: Tensor, mode: str = "bilinear") -> Tensor:
    """`conv` applied to `x` re-dilated by `factor` (>= 1): dilation d = ceil(factor) with padding d (k - 1) / 2; a
    fractional factor resizes the input by d / factor first and the output back to the plain convolution's size."""
    d = math.ceil(factor)
    size = x.shape[-2:]
    out = (size[0] // conv.stride[0], size[1] // conv.stride[1]) if conv.stride != (1, 1) else tuple(size)
    if d != factor:
        x = F.interpolate(x, size=(round(size[0] * d / factor), round(size[1] * d / factor)), mode=mode)
    pad = (d * (conv.kernel_size[0] - 1) // 2, d * (conv.kernel_size[1] - 1) // 2)
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, pad, d, conv.groups)
    return y if tuple(y.shape[-2:]) == out else F.interpolate(y, size=out, mode=mode)


@contextmanager
def redilate(unet: nn.Module, layers: dict[str, float], mode: str = "bilinear") -> Iterator[None]:
    """Within the block, each named convolution of `unet` computes `redilated_conv` with its factor (an instance
    `forward` set and deleted again, so the class's own forward and any hooks are untouched)."""
    modules = dict(unet.named_modules())
    done = []
    try:
        for name, factor in layers.items():
            if factor != 1:
                conv = modules[name]
                conv.forward = lambda x, conv=conv, factor=factor: redilated_conv(conv, factor, x, mode)
                done.append(conv)
        yield
    finally:
        for conv in done:
            del conv.forward


class ScaleCrafter(NoneMethod):
    """The frozen base sampled directly at the target size with chosen convolutions re-dilated during the first
    `share` of the steps."""

    supports = Support(unets=ANY_UNET, why="it re-dilates a UNet's convolutions; a transformer has none to dilate")

    @classmethod
    def declared(cls, config) -> Support:
        """With noise-damped guidance each guided step makes three calls: accelerators that keep state from one call
        to the next cannot follow them."""
        preset = PRESETS.get(config.get("preset"), {})
        ndcfg = config.get("ndcfg")
        if (ndcfg if ndcfg is not None else "ndcfg" in preset):
            return replace(cls.supports, views=True)
        return cls.supports

    def __init__(self, resolution: int,
                 preset: str | None = None,        # the authors' per-layer setting (PRESETS); null = the rule below
                 dilation: float | None = None,    # the rule's factor for the lowest-resolution blocks; null = scale
                 share: float | None = None,       # share of the steps, from the first, re-dilated; null = preset's
                                                   # or 0.6 (the authors' 1024 px SD 1.5 setting: 30 of 50)
                 progressive: bool | None = None,  # lower the factor step by step; null = the preset's (or off)
                 mode: str = "bilinear",           # resize for fractional factors
                 ndcfg: bool | None = None):       # noise-damped guidance; null = the preset's (sd21-2048: on)
        super().__init__(resolution)
        if preset is not None and preset not in PRESETS:
            raise UsageError(f"method.preset={preset}: choose one of {', '.join(PRESETS)}, or null for the "
                             f"lowest-resolution blocks at method.dilation")
        if dilation is not None and dilation < 1:
            raise UsageError(f"method.dilation={dilation}: a factor of at least 1 (1 = no re-dilation; null = the "
                             f"target / base scale)")
        if share is not None and not 0 <= share <= 1:
            raise UsageError(f"method.share={share}: the share of the steps re-dilated, in [0, 1]")
        if mode not in ("bilinear", "nearest", "bicubic"):
            raise UsageError(f"method.mode={mode}: choose bilinear, nearest or bicubic")
        chosen = PRESETS.get(preset, {})
        self.preset, self.dilation, self.mode = preset, dilation, mode
        self.share = float(share if share is not None else chosen.get("share", 0.6))
        self.progressive = bool(progressive if progressive is not None else chosen.get("progressive", False))
        self.ndcfg = bool(ndcfg if ndcfg is not None else "ndcfg" in chosen)
        if self.ndcfg and "ndcfg" not in chosen:
            raise UsageError(f"method.ndcfg=true needs a preset with the authors' damped-guidance setting "
                             f"(sd21-2048); method.preset={preset} has none")

    def layers(self, unet: nn.Module) -> dict[str, float]:
        """layer name -> factor for this UNet: the preset's, or every k > 1 convolution of the lowest-resolution
        blocks at `dilation` (default: target / base)."""
        convs = {n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1}
        if self.preset is not None:
            layers = PRESETS[self.preset]["layers"]
            missing = sorted(set(layers) - convs)
            if missing:
                raise UsageError(f"method.preset={self.preset} names convolutions this {type(unet).__name__} lacks "
                                 f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): it is the "
                                 f"authors' setting for another UNet; use method.preset=null")
            return dict(layers)
        factor = float(self.dilation if self.dilation is not None else self.resolution / self.base.resolution)
        deepest = (f"down_blocks.{len(unet.down_blocks) - 1}.", "mid_block.", "up_blocks.0.")
        return {n: factor for n in sorted(convs) if n.startswith(deepest)}

    def ndcfg_layers(self, unet: nn.Module) -> dict[str, float]:
        """The damped unconditional pass's layers: the preset's, without the levels its `ndcfg` entry leaves out."""
        skip = PRESETS[self.preset]["ndcfg"]["without"]
        return {k: v for k, v in self.layers(unet).items() if not k.startswith(skip)}

    def wrap(self, base) -> nn.Module:
        net = super().wrap(base)
        self.layers(net)  # a preset for another UNet is refused before any image
        return net

    def factor_at(self, factor: float, i: int, n: int) -> float:
        """The factor at re-dilated step i of n: constant, or the authors' progressive decay."""
        return max(math.ceil(factor * (n - i) / n), 2) if self.progressive and factor > 1 else factor

    def sample(self, net: nn.Module, gens: list[torch.Generator], loop) -> Tensor:
        x_T = sampling.noise(gens, self.latent_shape(self.resolution), net.device)
        layers = self.layers(net)
        if self.share == 0 or all(f == 1 for f in layers.values()):
            return self.base.decode(loop(model_fn(net), x_T))
        damped = {"on": False}  # set while the damped unconditional pass runs
        nd_layers = self.ndcfg_layers(net) if self.ndcfg else {}
        nd_share = PRESETS[self.preset]["ndcfg"]["share"] if nd_layers else 0.0
        steps_of = lambda share, step: round(share * len(step.timesteps) / step.order)  # noqa: E731

        def dilating(f, step):
            n, n_nd = steps_of(self.share, step), steps_of(nd_share, step)

            def call(x, t, cond):
                i = step.full_step
                chosen, last = (nd_layers, n_nd) if damped["on"] else (layers, n)
                if i >= last:
                    return f(x, t, cond)
                with redilate(net, {k: self.factor_at(v, i, last) for k, v in chosen.items()}, self.mode):
                    return f(x, t, cond)
            return call

        def damping(f, step):  # outside the accelerator and counter: each of the three passes is a counted call
            n_nd = steps_of(nd_share, step)

            def call(x, t, cond):
                if step.full_step >= n_nd or not guided(cond):
                    return f(x, t, cond)
                text = f(x, t, unet_kwargs(cond))
                uncond = f(x, t, cond["negative"])
                damped["on"] = True
                try:
                    uncond_damped = f(x, t, cond["negative"])
                finally:
                    damped["on"] = False
                return guide(uncond, text, cond, start=uncond_damped)
            return call

        outer = loop.wrap
        if nd_layers:
            wrap = lambda f, step: damping(outer(dilating(f, step), step), step)  # noqa: E731
        else:
            wrap = lambda f, step: outer(dilating(f, step), step)  # noqa: E731
        return self.base.decode(replace(loop, wrap=wrap)(model_fn(net), x_T))
