"""accelerator=stepskip: a fixed schedule of computed and reused steps, the plainest training-free speed-up and the
baseline every adaptive or caching scheme is measured against (DeepCache's uniform interval on whole steps, the
'reuse every other step' and periodic arms of AdaptiveDiffusion's ablations).

At a skipped full step the model is not called: every call of that step returns the last raw output computed, as
AdaptiveDiffusion does when it reuses. The first step is always computed. Step level only (`wrap`); the schedule is
fixed before sampling, so it is the same for every image.
"""

from __future__ import annotations

import torch

from hiresrun.accelerators import Accelerator
from hiresrun.errors import UsageError
from hiresrun.models import ModelFn
from hiresrun.support import Support


class StepSkip(Accelerator):
    """Compute full step k where `mask[k]` (or k % every == 0), else reuse the last computed output."""

    supports = Support(level="steps", needs_steps=True, flow=True,
                       why="a step schedule: a one-step method has no steps to skip")

    def __init__(self, every: int = 1,                       # compute every k-th full step; 1 = every step (neutral)
                 mask: list[int] | str | None = None):       # explicit 1 (compute) / 0 (reuse) per full step, as a
                                                             # list or a "1011..." string; overrides `every`
        if int(every) < 1:
            raise UsageError(f"accelerator.every={every}: must be at least 1 (1 computes every step)")
        # a "1011" string, or the number the command line makes of it (accelerator.mask=1011 parses as an int)
        bits = [int(b) for b in (list(str(mask)) if isinstance(mask, (str, int)) else mask)] if mask is not None \
            else None
        if bits is not None and (not bits or any(b not in (0, 1) for b in bits)):
            raise UsageError(f"accelerator.mask={mask}: give one 1 (compute) or 0 (reuse) per sampler step, e.g. "
                             f"accelerator.mask=[1,1,0,1,0]")
        if bits is not None and bits[0] != 1:  # nothing to reuse before the first computed output
            raise UsageError(f"accelerator.mask={mask}: the first step is always computed; start the mask with 1")
        self.every, self.mask = int(every), bits

    def schedule(self, num_steps: int) -> list[bool]:
        """True where full step k is computed; the first step always is."""
        if self.mask is None:
            return [k % self.every == 0 for k in range(num_steps)]
        if len(self.mask) != num_steps:
            raise UsageError(f"accelerator.mask has {len(self.mask)} entries but the sampling loop makes {num_steps} "
                             f"steps; give one per step (sampler.num_steps, or the truncated loop of the method)")
        return [True] + [bool(b) for b in self.mask[1:]]

    def check(self, net, loops: list[int]) -> None:
        for num_steps in loops:
            self.schedule(num_steps)

    def wrap(self, model_fn: ModelFn, step=None) -> ModelFn:
        if step is None or (self.mask is None and self.every == 1):
            return model_fn  # neutral: the loop is untouched
        computed = self.schedule(-(-len(step.timesteps) // step.order))
        state = {"last": None}

        def fn(x: torch.Tensor, t, cond: dict) -> torch.Tensor:
            if computed[step.full_step] or state["last"] is None:
                state["last"] = model_fn(x, t, cond)
            return state["last"]

        return fn
