"""Adaptation methods: how a low-resolution base model is made to produce the target resolution.

`+method=<name>` picks conf/method/<name>.yaml, whose `_target_` is the class in methods/<name>.py. Every method
derives from `Method`, the explicit no-op base that lists every member a method may have, so that `support.py`'s
declarations and the verbs read attributes that always exist (no `getattr` guesses).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from hiresrun.errors import UsageError
from hiresrun.models import BaseModel
from hiresrun.support import Support


class Method:
    """The method interface and its neutral members.

    `trains`: whether `hiresrun train` has anything to optimise (an instance may decide: Self-Cascade's `mode`).
    `supports`: what it works with (hiresrun/support.py); checked before anything loads.
    `resolution`: the target resolution in pixels.
    `wrap(base)`: the module Lightning trains and checkpoints (freezes what the method freezes); keeps `base`.
    `loss(net, batch)`: a dict whose "loss" is back-propagated; the other entries are logged.
    `sample(net, gens, loop)`: images in [-1, 1] at the target resolution, one per generator; `loop` is a
        `sampling.Loop`: `sampling.sample` with scheduler, steps, generators, accelerator wrapping and the per-image
        `cond` bound; `loop.at(resolution)` is the loop of a pass at another size (its conditioning rebuilt).
    `loop_steps(num_steps)`: the steps of each sampling loop `sample` runs (Self-Cascade's pivot and stage loops).
    `scheduler_config(base)`: the schedule the net samples on (simple diffusion trains its own).
    `precompute(base, data, run_dir)`: a stage that only computes and caches; True ends `hiresrun train` there.
    `optimizers(net, factory)`: the optimisers, built with the configured class (`factory(params, **kw)`); one over
        every trainable parameter unless a method has several (PaGoDA's generator and discriminator).
    `manual_optimization`: True when the method steps its optimisers itself in `training_step(lit, batch)`
        (Lightning's manual optimisation); otherwise Lightning back-propagates `loss(...)["loss"]`.
    """

    trains: bool = False
    supports: Support = Support()
    manual_optimization: bool = False

    @classmethod
    def declared(cls, config) -> Support:
        """The declaration for this configuration (its `method.*` keys): `supports`, unless a setting narrows it
        (Self-Cascade's tuned mode hooks UNet blocks)."""
        return cls.supports

    def __init__(self, resolution: int):  # target resolution in pixels
        self.resolution = resolution

    def wrap(self, base: BaseModel) -> nn.Module:
        self.base = base
        return base.unet.eval().requires_grad_(False)

    def loss(self, net: nn.Module, batch: dict) -> dict[str, Tensor]:
        raise UsageError(f"{type(self).__name__} trains nothing; `hiresrun train` needs a method that trains")

    def optimizers(self, net: nn.Module, factory):
        return factory([p for p in net.parameters() if p.requires_grad])

    def training_step(self, lit, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} sets manual_optimization and must define training_step")

    def sample(self, net: nn.Module, gens: list[torch.Generator], loop) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__}.sample")

    def loop_steps(self, num_steps: int) -> list[int]:
        """The steps of each sampling loop `sample` runs with an N-step sampler (accelerators check their settings
        against them before any image is made): one loop of N steps."""
        return [num_steps]

    def scheduler_config(self, base: BaseModel) -> dict:
        return base.scheduler_config

    def precompute(self, base: BaseModel, data, run_dir: Path) -> bool:
        return False
