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


def counted(model_fn: ModelFn, x, t, cond: dict):
    """(the call's output, its FLOPs by torch's FLOP counter): how caches measure a partial call's cost share."""
    out, counter = _count(model_fn, x, t, cond)
    return out, counter.get_total_flops()


class FlopShare:
    """Each call's FLOPs as a share of a full call's, with torch's FLOP counter run on the first call only (counting
    every call costs several times the call). The first call of a loop computes everything: hooks around every module
    invocation read the counter before and after it, which gives each invocation its own FLOPs (those outside the
    invocations nested in it; a module called twice, as DiT calls its first block's label embedding, is two
    invocations). Later calls only note which invocations happen (pre-hooks on the modules with FLOPs): one counts its
    own FLOPs when it had no nested invocations in the first call, or has at least one in this call. A block or
    attention that a cache skips is still called but calls none of its children, so it adds nothing."""

    def __init__(self, net: nn.Module):
        self.net, self.full, self.top, self.handles = net, 0, 0, []
        self.own: dict[tuple, int] = {}                 # (module, k-th call of it) -> its own FLOPs
        self.parent: dict[tuple, tuple | None] = {}     # the invocation it is nested in (first call)
        self.calls: list[nn.Module] = []                # the module invocations of the call now running

    def first(self, model_fn: ModelFn, x, t, cond: dict):
        """The first (full) call, counted; installs the pre-hooks that note the invocations of later calls."""
        from torch.utils.flop_counter import FlopCounterMode

        counter, stack, seen, inclusive = FlopCounterMode(display=False), [], {}, {}

        def enter(module, args):
            key = (module, seen.get(module, 0))
            seen[module] = key[1] + 1
            self.parent[key] = stack[-1][0] if stack else None
            stack.append((key, counter.get_total_flops()))

        def leave(module, args, out):
            key, before = stack.pop()
            inclusive[key] = counter.get_total_flops() - before

        modules = list(self.net.modules())
        hooks = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
        try:
            with counter:
                out = model_fn(x, t, cond)
        finally:
            for h in hooks:
                h.remove()
        self.full = counter.get_total_flops()
        for key, flops in inclusive.items():
            self.own[key] = self.own.get(key, 0) + flops
            up = self.parent[key]
            if up is not None:
                self.own[up] = self.own.get(up, 0) - flops
        self.top = self.full - sum(f for k, f in inclusive.items() if self.parent[k] is None)
        self.nested = {self.parent[k] for k, f in inclusive.items() if f > 0 and self.parent[k] is not None}
        counted = {m for (m, _), f in inclusive.items() if f > 0}
        self.handles = [m.register_forward_pre_hook(lambda mod, args: self.calls.append(mod)) for m in counted]
        self.keep = {k: f for k, f in self.own.items() if k[0] in counted}
        return out

    def __call__(self, model_fn: ModelFn, x, t, cond: dict):
        """(the call's output, its FLOPs / a full call's)."""
        if not self.handles:
            return self.first(model_fn, x, t, cond), 1.0
        self.calls = []
        out = model_fn(x, t, cond)
        seen, keys = {}, []
        for m in self.calls:
            keys.append((m, seen.get(m, 0)))
            seen[m] = keys[-1][1] + 1
        ran = set(keys)
        had_child = {self.parent.get(k) for k in ran}
        flops = self.top + sum(self.keep.get(k, 0) for k in ran if k not in self.nested or k in had_child)
        return out, flops / self.full if self.full else 1.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _count(model_fn: ModelFn, x, t, cond: dict):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = model_fn(x, t, cond)
    return out, counter


class Accelerator:
    """The accelerator protocol and its neutral setting.

    `attach(net)` registers hooks and returns their handles; the caller removes them in `finally`.
    `wrap(model_fn, step)` returns the function the loop calls at every step, `(x_t, t, cond)` as every model
    function; `step` (sampling.Step) gives the loop's timesteps, the calls per full step and the current call's
    index. Per-call state lives in the closure it builds, so nothing needs resetting between sampling calls.
    """

    supports = Support(flow=True)  # what a subclass works with (hiresrun/support.py); the base: everything
    # One record per sampling call (which images or blocks ran), for `mark` / `per_image`; None: it keeps none.
    records: list[dict] | None = None

    @classmethod
    def declared(cls, config) -> Support:
        """The declaration for this configuration (its `accelerator.*` keys, the defaults where absent): `supports`,
        unless a setting changes it (AdaptiveDiffusion's per-image decisions call the model on sub-batches)."""
        return cls.supports

    def attach(self, net: nn.Module) -> list[RemovableHandle]:
        return []

    def wrap(self, model_fn: ModelFn, step=None) -> ModelFn:  # step: sampling.Step, the loop's schedule context
        return model_fn

    def check(self, net: nn.Module, loops: list[int]) -> None:
        """Refuse, before any image is made, a setting this net or these loops (the steps of each sampling loop the
        method runs, `Method.loop_steps`) cannot take; what `attach` / `wrap` would only find mid-run."""

    # What an accelerator records per image, for the batch records of a sample run (hiresrun/store.py):
    # `mark()` before a batch, `per_image(mark, seeds)` after it -> {str(seed): facts} or None;
    # `summary(per_image)` -> (a file's content, flat metrics) over every image of the run, or None.
    def mark(self):
        """Where this batch's records start (None for an accelerator that keeps no `records`)."""
        return len(self.records) if self.records is not None else None

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
        from hiresrun.support import chain_refusal

        self.members = members
        reason = chain_refusal(list(members), [a.supports for a in members.values()])  # each one's own setting
        if reason:
            raise Unsupported(reason)

    def attach(self, net: nn.Module) -> list[RemovableHandle]:
        return [h for a in self.members.values() for h in a.attach(net)]

    def wrap(self, model_fn: ModelFn, step=None) -> ModelFn:
        for a in reversed(list(self.members.values())):
            model_fn = a.wrap(model_fn, step)
        return model_fn

    def check(self, net: nn.Module, loops: list[int]) -> None:
        for a in self.members.values():
            a.check(net, loops)

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
