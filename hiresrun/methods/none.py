"""method=none: sample the frozen base directly at the target resolution (the zero-shot baseline)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hiresrun import sampling
from hiresrun.methods import Method
from hiresrun.models import model_fn
from hiresrun.support import Support


class NoneMethod(Method):
    """Zero-shot: the convolutional base UNet run at a resolution it was never trained on."""

    supports = Support(flow=True)  # pixel and latent, any diffusers denoiser (flow transformers too), text or not

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        size = resolution // self.base.latent_factor
        return (self.base.latent_channels, size, size)

    def sample(self, net: nn.Module, gens: list[torch.Generator], loop) -> Tensor:
        x_T = sampling.noise(gens, self.latent_shape(self.resolution), net.device)
        return self.base.decode(loop(model_fn(net), x_T))
