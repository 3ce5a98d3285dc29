"""method=upsample: sample at the base resolution, then resize to the target (the no-new-detail baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun.methods.none import NoneMethod


def upscale(x: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """Resize a sample-space batch up to `size` (nearest | bilinear | bicubic); no clamping (latents)."""
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=None if mode == "nearest" else False)


class Upsample(NoneMethod):
    """Base-resolution sample, resized with `mode` (bicubic by default, antialias irrelevant upwards)."""

    def __init__(self, resolution: int, mode: str = "bicubic"):  # interpolation: nearest|bilinear|bicubic
        super().__init__(resolution)
        self.mode = mode

    def sample(self, net: nn.Module, gens: list[torch.Generator], loop) -> Tensor:
        low = NoneMethod(self.base.resolution)
        low.base = self.base
        return upscale(low.sample(net, gens, loop.at(self.base.resolution)), self.resolution, self.mode)
