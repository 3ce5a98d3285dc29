"""Sampling-time accelerators. The no-op base class *is* `accelerator=none`.

An accelerator touches the model only through removable torch hooks (`attach`, module level, e.g.
Skip-Tuning) or by wrapping `model_fn` (`wrap`, step level, e.g. AdaptiveDiffusion). Not to be confused
with Lightning's `trainer.accelerator`, which is the device (cpu/gpu).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.hooks import RemovableHandle

from hiresrun.models import ModelFn
from hiresrun.support import Support


@contextmanager
def hooks_removed_after(handles: list[RemovableHandle]) -> Iterator[list[RemovableHandle]]:
    """`with hooks_removed_after(acc.attach(net)):` -- whatever happens inside, the model leaves without the hooks
    (every attach site: sampling, Self-Cascade's upsamplers in sampling and training)."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


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

    # What an accelerator records per image, for the batch records of a sample run (hiresrun/store.py):
    # `mark()` before a batch, `per_image(mark, seeds)` after it -> {str(seed): facts} or None;
    # `summary(per_image)` -> (a file's content, flat metrics) over every image of the run, or None.
    def mark(self):
        return None

    def per_image(self, mark, seeds: list[int]) -> dict | None:
        return None

    def summary(self, per_image: dict) -> tuple[dict, dict] | None:
        return None
