"""method=upsample: sample at the base resolution, then resize to the target (the no-new-detail baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun.methods.none import NoneMethod


class Upsample(NoneMethod):
    """Base-resolution sample, resized with `mode` (bicubic by default, antialias irrelevant upwards)."""

    def __init__(self, resolution: int, mode: str = "bicubic"):  # interpolation: nearest|bilinear|bicubic
        super().__init__(resolution)
        self.mode = mode

    def sample(self, net: nn.Module, gens: list[torch.Generator], loop) -> Tensor:
        low = NoneMethod(self.base.resolution)
        low.base = self.base
        x = low.sample(net, gens, loop)
        align = None if self.mode == "nearest" else False
        return F.interpolate(x, size=(self.resolution, self.resolution), mode=self.mode,
                             align_corners=align).clamp(-1, 1)
