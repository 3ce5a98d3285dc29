"""Sampling-time accelerators. The no-op base class *is* `accelerator=none`.

An accelerator touches the model only through removable torch hooks (`attach`, module level, e.g.
Skip-Tuning) or by wrapping `model_fn` (`wrap`, step level, e.g. AdaptiveDiffusion). Not to be confused
with Lightning's `trainer.accelerator`, which is the device (cpu/gpu).
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from hiresrun.models import ModelFn
from hiresrun.support import Support


class Accelerator:
    """The accelerator protocol and its neutral setting.

    `attach(net)` registers hooks and returns their handles; the caller removes them in `finally`.
    `wrap(model_fn, step)` returns the function the loop calls at every step, `(x_t, t, cond)` as every model
    function; `step` (sampling.Step) gives the loop's timesteps, the calls per full step and the current call's
    index. Per-call state lives in the closure it builds, so nothing needs resetting between sampling calls.
    """

    supports = Support()  # what a subclass works with (hiresrun/support.py); the base works with everything

    def attach(self, net: nn.Module) -> list[RemovableHandle]:
        return []

    def wrap(self, model_fn: ModelFn, step=None) -> ModelFn:  # step: sampling.Step, the loop's schedule context
        return model_fn
