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


def counted(model_fn: ModelFn, x, t, cond: dict):
    """(the call's output, its FLOPs by torch's FLOP counter): how caches measure a partial call's cost share."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = model_fn(x, t, cond)
    return out, counter.get_total_flops()


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
        """Where this batch's records start: accelerators that keep one record per sampling call in `records`."""
        return len(self.records) if hasattr(self, "records") else None

    def per_image(self, mark, seeds: list[int]) -> dict | None:
        return None

    def summary(self, per_image: dict) -> tuple[dict, dict] | None:
        return None


class Chain(Accelerator):
    """Several accelerators applied together (`+accelerator=[adaptive,deepcache]`), in the declared level order
    (support.LEVELS): the first decides which steps call the model, the next which blocks run inside a call.
    `wrap` nests them so the first is outermost: a step it reuses never reaches the others. Each member keeps its
    own records; a batch's per-image facts and the run's summary are theirs side by side, under their names."""

    def __init__(self, members: dict[str, Accelerator]):
        from hiresrun.errors import Unsupported

        self.members = members
        splits = [n for n, a in members.items() if getattr(a, "sub_batches", False)]
        whole = [n for n, a in members.items() if getattr(a, "whole_batches", False)]
        if splits and whole:
            raise Unsupported(f"accelerator=[{','.join(members)}]: {splits[0]} calls the model on sub-batches of "
                              f"images (per-image decisions) and {whole[0]} caches whole batches; set "
                              f"accelerator.decision_scope=batch")

    def attach(self, net: nn.Module) -> list[RemovableHandle]:
        return [h for a in self.members.values() for h in a.attach(net)]

    def wrap(self, model_fn: ModelFn, step=None) -> ModelFn:
        for a in reversed(list(self.members.values())):
            model_fn = a.wrap(model_fn, step)
        return model_fn

    def mark(self):
        return {name: a.mark() for name, a in self.members.items()}

    def per_image(self, mark, seeds: list[int]) -> dict | None:
        facts = {name: a.per_image(mark[name], seeds) for name, a in self.members.items()}
        facts = {name: f for name, f in facts.items() if f}
        return {str(s): {name: f[str(s)] for name, f in facts.items()} for s in seeds} if facts else None

    def summary(self, per_image: dict) -> tuple[dict, dict] | None:
        """Each member's summary over its own facts; the flat metrics of all of them (no member shares a name)."""
        files, flat = {}, {}
        for name, a in self.members.items():
            own = {s: p[name] for s, p in per_image.items() if name in p}
            result = a.summary(own) if len(own) == len(per_image) else None
            if result:
                files[name], flat = result[0], {**flat, **result[1]}
        return (files, flat) if files else None
