"""method=hidiffusion: HiDiffusion (Zhang et al., ECCV 2024), a training-free baseline later high-resolution papers
report.

Two changes to the frozen UNet, sampled directly at the target size:

- RAU-Net (resolution-aware U-Net). During the first steps, when the layout of the image is decided, one level of the
  UNet runs at half its size so that the deep blocks see feature maps of the size they were trained on: either that
  level's downsampler becomes a dilation-2, stride-4 convolution (padding 2; the same 3 x 3 weights), or the level's
  down block average-pools (2 x 2) the output of its first resnet / attention pair. The mirrored up block restores the
  size: an upsampler resizes to the size of the skip it is joined with (nearest, as diffusers' upsamplers do), a
  pooled level is resized back (bicubic) before its last pair. `t1` and `t2` are the shares of the steps, from the
  first, during which each of the layout's two switches is on.
- MSW-MSA (modified shifted-window self-attention): in the highest-resolution blocks that have transformer blocks,
  self-attention runs within the 2 x 2 windows of half the feature map's side, the map rolled by a quarter, half or
  three quarters of a window (drawn per call), then rolled back.

The layouts are the authors' two (their module keys for SD 1.5 / 2.1 and SDXL):

- `sd` (SD 1.5 / 2.1, and any UNet whose first level has a downsampler): switch 1 = level 0's downsampler strided by 4,
  switch 2 = level 1 pooled; window attention in level 0 and its mirror.
- `sdxl` (three levels, the first without attention): switch 1 = level 1 pooled, switch 2 = level 1's downsampler
  strided by 4; window attention in level 1 and its mirror. Below 4x the base ("aggressive"), the authors run the
  strided downsampler for the first 8 of 50 steps and the pooling from there to t1.

Their switching shares: below 4x the base side t1 = 0.4, t2 = 0 (SD 1.5 at 1024 px, SDXL at 2048 px); from 4x on
t1 = 0.7, t2 = 0.3. A UNet2DModel has no transformer blocks: RAU-Net only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun import sampling
from hiresrun.errors import UsageError
from hiresrun.hooks import hooks_removed_after
from hiresrun.methods.none import NoneMethod
from hiresrun.models import model_fn
from hiresrun.support import ANY_UNET, Support

AGGRESSIVE_SHARE = 8 / 50  # sdxl below 4x: the strided downsampler's steps before the pooling takes over


def strided_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """RAU-Net's downsampler: the 3 x 3 weights at dilation 2, stride 4, padding 2 (a quarter of the input's side)."""
    return F.conv2d(x, conv.weight, conv.bias, 4, 2, 2, conv.groups)


def window_partition(x: Tensor, size: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """(B, H W, C) tokens of an H x W map -> (4 B, H W / 4, C): the 2 x 2 windows of the map rolled back by `shift`."""
    (h, w), (b, _, c) = size, x.shape
    x = x.view(b, h, w, c)
    if shift[0] or shift[1]:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(b, 2, h // 2, 2, w // 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(4 * b, (h // 2) * (w // 2), c)


def window_reverse(windows: Tensor, size: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """The inverse of `window_partition`."""
    (h, w), c = size, windows.shape[-1]
    b = windows.shape[0] // 4
    x = windows.view(b, 2, 2, h // 2, w // 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    if shift[0] or shift[1]:
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x.reshape(b, h * w, c)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, value: Tensor):
    return (value, *out[1:]) if isinstance(out, tuple) else value


def _pair_end(block: nn.Module, i: int) -> nn.Module:
    """The module whose output ends resnet / attention pair i of a diffusers down or up block."""
    attentions = getattr(block, "attentions", None)
    return attentions[i] if attentions is not None and len(attentions) > i else block.resnets[i]


class HiDiffusion(NoneMethod):
    """The frozen UNet at the target size with RAU-Net's early half-size level and windowed self-attention."""

    supports = Support(unets=ANY_UNET, why="it changes a UNet's downsampling levels and its transformer blocks")

    def __init__(self, resolution: int,
                 raunet: bool = True,              # RAU-Net's switches (off: window attention only)
                 window_attn: bool = True,         # MSW-MSA in the highest-resolution transformer blocks
                 layout: str | None = None,        # sd | sdxl: which levels switch; null = from the UNet's blocks
                 t1: float | None = None,          # share of the steps switch 1 is on; null = the authors' by scale
                 t2: float | None = None,          # share of the steps switch 2 is on; null = the authors' by scale
                 aggressive: bool | None = None,   # sdxl's strided first steps; null = the authors' (sdxl below 4x)
                 seed: int = 0):                   # the window shifts' seed (shared by every image)
        super().__init__(resolution)
        if layout not in (None, "sd", "sdxl"):
            raise UsageError(f"method.layout={layout}: choose sd (SD 1.5 / 2.1's levels), sdxl, or null (from the "
                             f"UNet's blocks)")
        for name, share in (("t1", t1), ("t2", t2)):
            if share is not None and not 0 <= share <= 1:
                raise UsageError(f"method.{name}={share}: a share of the steps, in [0, 1]")
        self.raunet, self.window_attn, self.layout = bool(raunet), bool(window_attn), layout
        self.t1, self.t2, self.aggressive, self.seed = t1, t2, aggressive, int(seed)

    # -- what is switched, from the UNet's blocks ------------------------------------------------------------------
    def layout_of(self, unet: nn.Module) -> str:
        if self.layout is not None:
            return self.layout
        first = unet.down_blocks[0]
        return "sdxl" if len(unet.down_blocks) == 3 and not hasattr(first, "attentions") and hasattr(
            unet.down_blocks[1], "attentions") else "sd"

    def level(self, unet: nn.Module) -> int:
        return 1 if self.layout_of(unet) == "sdxl" else 0

    def shares(self, unet: nn.Module) -> tuple[float, float, bool]:
        """(t1, t2, aggressive): the configured ones, else the authors' for this layout and scale."""
        large = self.resolution >= 4 * self.base.resolution
        t1 = self.t1 if self.t1 is not None else (0.7 if large else 0.4)
        t2 = self.t2 if self.t2 is not None else (0.3 if large else 0.0)
        aggressive = self.aggressive if self.aggressive is not None else (
            self.layout_of(unet) == "sdxl" and not large)
        return t1, t2, aggressive

    def wrap(self, base) -> nn.Module:
        net = super().wrap(base)
        layout, n = self.layout_of(net), len(net.down_blocks)
        needs = (1, 2) if layout == "sdxl" else (0, 2)  # the level with a downsampler; levels the layout needs
        if self.raunet and (n < needs[1] or getattr(net.down_blocks[needs[0]], "downsamplers", None) is None):
            raise UsageError(f"method=hidiffusion's {layout} layout halves level {needs[0]} and this "
                             f"{type(net).__name__} has {n} down blocks (level {needs[0]} without a downsampler); "
                             f"set method.layout={'sd' if layout == 'sdxl' else 'sdxl'} or method.raunet=false")
        return net

    def switches(self, unet: nn.Module, step: int, steps: int) -> tuple[bool, bool]:
        """(strided downsampler on, pooled level on) at full step `step` of `steps`."""
        t1, t2, aggressive = self.shares(unet)
        if not self.raunet:
            return False, False
        if self.layout_of(unet) == "sd":
            return step < int(steps * t1), step < int(steps * t2)
        if aggressive:  # sdxl below 4x: strided first, then pooled until t1
            first = int(AGGRESSIVE_SHARE * steps)
            return step < first, first <= step < int(steps * t1)
        return step < int(steps * t2), step < int(steps * t1)

    @contextmanager
    def rau(self, unet: nn.Module, strided: bool, pooled: bool) -> Iterator[None]:
        """RAU-Net's switches on for the calls inside the block; the UNet as it was after it."""
        if not (strided or pooled):
            yield
            return
        layout = self.layout_of(unet)
        down_level = 0 if layout == "sd" else 1  # the strided downsampler's level
        pool_level = 1
        n = len(unet.down_blocks)
        handles, patched = [], []
        if strided:
            conv = unet.down_blocks[down_level].downsamplers[0].conv
            conv.forward = lambda x, conv=conv: strided_conv(conv, x)
            patched.append(conv)
        if pooled:
            down, up = unet.down_blocks[pool_level], unet.up_blocks[n - 1 - pool_level]
            before: dict[str, tuple[int, int]] = {}

            def pool(m, args, out):
                h = _first(out)
                before["size"] = tuple(h.shape[-2:])
                return _replace_first(out, F.avg_pool2d(h, kernel_size=2, ceil_mode=True))

            def restore(m, args, out):
                return _replace_first(out, F.interpolate(_first(out), size=before["size"], mode="bicubic"))

            handles.append(_pair_end(down, 0).register_forward_hook(pool))
            handles.append(_pair_end(up, len(up.resnets) - 2).register_forward_hook(restore))
        # Up block j's upsampler resizes to the skip up block j + 1 joins first: the output of level n - 2 - j's last
        # pair (recorded after the pooling above), as diffusers does when it forwards upsample sizes.
        sizes: dict[int, tuple[int, int]] = {}
        for k, block in enumerate(unet.down_blocks):
            handles.append(_pair_end(block, len(block.resnets) - 1).register_forward_hook(
                lambda m, args, out, k=k: sizes.__setitem__(k, tuple(_first(out).shape[-2:]))))
        for j, block in enumerate(unet.up_blocks):
            ups = getattr(block, "upsamplers", None)
            if ups is not None and n - 2 - j >= 0:
                def resize(m, args, kwargs, k=n - 2 - j):
                    kwargs.pop("output_size", None)
                    return (args[0], sizes[k]), kwargs
                handles.append(ups[0].register_forward_pre_hook(resize, with_kwargs=True))
        try:
            with hooks_removed_after(handles):
                yield
        finally:
            for conv in patched:
                del conv.forward

    def window_hooks(self, unet: nn.Module, now: dict) -> list:
        """MSW-MSA on the self-attention of the transformer blocks in the highest-resolution level that has any, and
        in its mirror: pre-hook partitions the tokens, forward hook reverses."""
        from diffusers.models.attention import BasicTransformerBlock

        def blocks(block):
            return [m for m in block.modules() if isinstance(m, BasicTransformerBlock)]

        n = len(unet.down_blocks)
        level = next((k for k, b in enumerate(unet.down_blocks) if blocks(b)), None)
        if level is None:
            return []
        names = {m: name for name, m in unet.named_modules()}
        handles = []
        for outer in (unet.down_blocks[level], unet.up_blocks[n - 1 - level]):
            for transformer in [m for m in outer.modules() if hasattr(m, "transformer_blocks")]:
                size: dict[str, tuple] = {}
                handles.append(transformer.register_forward_pre_hook(
                    lambda m, args, size=size: size.__setitem__("map", tuple(args[0].shape[-2:]))))
                for tb in blocks(transformer):
                    draw = lambda name=names[tb]: random.Random(f"{self.seed}/{now['call']}/{name}").random()  # noqa: E731
                    handles += _windowed(tb.attn1, size, draw)
        return handles

    def sample(self, net: nn.Module, gens: list[torch.Generator], loop) -> Tensor:
        x_T = sampling.noise(gens, self.latent_shape(self.resolution), net.device)
        now = {"call": 0}  # the loop's call index: each block's window shift depends on it and the seed only
        windows = self.window_hooks(net, now) if self.window_attn else []

        def switching(f, step):
            steps = -(-len(step.timesteps) // step.order)

            def call(x, t, cond):
                now["call"] = step.index
                strided, pooled = self.switches(net, step.full_step, steps)
                with self.rau(net, strided, pooled) if (strided or pooled) else nullcontext():
                    return f(x, t, cond)
            return call

        outer = loop.wrap
        with hooks_removed_after(windows):
            return self.base.decode(replace(loop, wrap=lambda f, step: outer(switching(f, step), step))(
                model_fn(net), x_T))


def _windowed(attn: nn.Module, size: dict, draw) -> list:
    """Hooks that run `attn` within shifted 2 x 2 windows of the token map whose size `size["map"]` holds."""
    state: dict = {}

    def partition(m, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        h, w = size["map"]
        hh, ww = math.ceil(h / 2), math.ceil(w / 2)
        if h % 2 or w % 2:  # an odd map: resized to twice the window first, as the authors do
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
            x = F.interpolate(x, size=(2 * hh, 2 * ww), mode="bicubic").permute(0, 2, 3, 1).flatten(1, 2)
        k = min(int(draw() * 4), 3)  # 0, 1/4, 2/4, 3/4 of a window, equally likely
        state.update(shift=(hh // 4 * k, ww // 4 * k), window=(2 * hh, 2 * ww), map=(h, w))
        return (window_partition(x, state["window"], state["shift"]), *args[1:]), kwargs

    def reverse(m, args, kwargs, out):
        y = window_reverse(out, state["window"], state["shift"])
        (h, w), (hh2, ww2) = state["map"], state["window"]
        if (h, w) != (hh2, ww2):
            y = y.view(y.shape[0], hh2, ww2, -1).permute(0, 3, 1, 2)
            y = F.interpolate(y, size=(h, w), mode="bicubic").permute(0, 2, 3, 1).flatten(1, 2)
        return y

    return [attn.register_forward_pre_hook(partition, with_kwargs=True),
            attn.register_forward_hook(reverse, with_kwargs=True)]
