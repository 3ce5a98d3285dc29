"""Adaptation methods: how a low-resolution base model is made to produce the target resolution.

`+method=<name>` picks conf/method/<name>.yaml, whose `_target_` is the class in methods/<name>.py.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from hiresrun.models import BaseModel


class Method(Protocol):
    """The method protocol.

    `trains`: whether `hiresrun train` has anything to optimise.
    `wrap(base)`: the module Lightning trains and checkpoints (freezes what the method freezes).
    `loss(net, batch)`: a dict whose "loss" is back-propagated; the other entries are logged.
    `sample(net, gens, loop)`: images in [-1, 1] at the target resolution, one per generator; `loop` is
    `sampling.sample` with scheduler, steps, generators and accelerator wrapping bound.
    """

    trains: bool
    resolution: int

    def wrap(self, base: BaseModel) -> nn.Module: ...

    def loss(self, net: nn.Module, batch: dict) -> dict[str, Tensor]: ...

    def sample(self, net: nn.Module, gens: list[torch.Generator], loop) -> Tensor: ...
