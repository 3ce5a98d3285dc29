"""accelerator=deepcache: DeepCache (Ma, Fang and Wang, CVPR 2024, arXiv 2312.00858), training-free feature reuse.

Adjacent denoising steps produce nearly the same high-level UNet features, so at a *full* step the whole UNet runs
and the outputs of its deep blocks are cached; at the *partial* steps in between only the shallow branch runs
(conv_in, the first `branch` down blocks, the last `branch` up blocks, conv_out) and the deep blocks return their
cached outputs, skip connections of the shallow branch being recomputed (the paper's Fig. 3 and eq. 5). Schedules
(`schedule`): uniform, the paper's 1:N (N = `interval`), full at computed steps 0, N, 2N, ...; quadratic, the
paper's non-uniform 1:N (Sec. 4.3), the same number of full steps ceil(T / N) placed densest around step `center`
(`full_steps`). Steps are counted as the model computes them: under AdaptiveDiffusion (`+accelerator=[adaptive,
deepcache]`) a reused step never reaches the UNet, and the schedule runs over the computed steps.

Why not the `deepcache` package (0.1.1, 2023; read for this): its `DeepCacheSDHelper` replaces `unet.forward` and
each block's `forward` attribute on a diffusers *pipeline* and finds the step as `pipe.scheduler.timesteps.index(t)`.
hiresrun runs its own loop (no pipeline object), Heun repeats timesteps (the index is ambiguous), Self-Cascade's
truncated 2x loop and its tuned low-resolution pass need a cache per loop and per input size, the hooks must come off
after every sampling call, and partial calls must be costed; its non-uniform schedule lives only in its forked
pipelines. Its layer-level cut is here too: `branch_id` takes its `cache_branch_id` and caches the same modules
(`DeepCache.cached`; tests/test_deepcache.py compares images with its `DeepCacheSDHelper` on diffusers' pipeline).

The seam that skips compute is diffusers' own hook registry (`diffusers.hooks.HookRegistry`, `ModelHook.new_forward`),
not torch hooks (which cannot skip a forward) and not a fork of the blocks. Two cuts: `branch` counts whole down/up
blocks (on diffusers' 2-4 level UNets a block is the natural unit); `branch_id` is the official id, which can cut
inside a block (id 0, the paper's headline setting, recomputes only conv_in, the outermost up block's last layer
and conv_out). Cost accounting: the first full and the first partial call of a sampling call are counted with
torch's FLOP counter, and each image's record carries its full and partial calls and the partial call's FLOP share,
so `metrics.json` reports `cost_per_image` in full-evaluation units beside `nfe_per_image` (which counts calls).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from hiresrun.accelerators import Accelerator, counted
from hiresrun.errors import UsageError
from hiresrun.models import ModelFn
from hiresrun.support import ANY_UNET, Support

HOOK = "hiresrun_deepcache"


def full_steps(num_steps: int, interval: int, schedule: str = "uniform", center: int = 15,
               power: float = 1.4) -> list[int]:
    """The computed steps (0-based) that run the whole UNet. uniform: every `interval`-th. quadratic: ceil(T / N)
    of them, the first step and then u^power + center for u evenly spaced from -center^(1/power) to
    (T - center)^(1/power), truncated and deduplicated, so they crowd around `center`. As in the official code the
    negative root is taken in complex arithmetic and the real part kept, and `power` steps down by 0.02 until the
    count comes out right."""
    if schedule == "uniform" or interval == 1:
        return list(range(0, num_steps, interval))
    n = math.ceil(num_steps / interval)
    p = power
    while p > 1:
        u = np.linspace(complex(-center) ** (1 / p), complex(num_steps - center) ** (1 / p), n + 1)
        picked = [0] + [int(v) + center for v in np.unique(np.trunc((u ** p).real))[1:-1]]
        if len(picked) == n:
            return picked
        p -= 0.02
    raise UsageError(f"accelerator.schedule=quadratic: no power at or below {power} places {n} full steps around "
                     f"accelerator.center={center} in {num_steps} steps; lower the center or raise the interval")


class _Cached(ModelHook):
    """On a partial step return the block's output from the last full step without running it. Entries are kept per
    input shape: a method that runs the same blocks on another size inside the call (tuned Self-Cascade's
    low-resolution pass on the pivot) gets its own entries, never the other size's."""

    def __init__(self, state: dict, key: str):
        super().__init__()
        self.state, self.key = state, key

    def new_forward(self, module: nn.Module, *args, **kwargs):
        cache, h = self.state["cache"], kwargs.get("hidden_states", args[0] if args else None)
        key = (self.key, tuple(h.shape) if isinstance(h, torch.Tensor) else None)
        if self.state["partial"] and key in cache:
            return cache[key]
        out = self.fn_ref.original_forward(*args, **kwargs)
        cache[key] = out
        return out


class _Handle:
    """A removable handle (what `Accelerator.attach` returns) for one diffusers registry hook."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        registry = getattr(self.module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK) is not None:
            registry.remove_hook(HOOK, recurse=False)


class DeepCache(Accelerator):
    """Cache the deep UNet blocks every `interval` steps; recompute only the shallow `branch` in between."""

    supports = Support(unets=ANY_UNET, needs_steps=True, level="blocks", whole_batches=True,  # a cache per batch
                       why="caches the deep blocks of a UNet2DModel / UNet2DConditionModel between sampler steps")

    def __init__(self, interval: int = 3,      # N: a full step every N steps (paper: 3-5 for SD); 1 = no caching
                 branch: int = 1,              # shallow down/up blocks recomputed at partial steps (>= 1)
                 schedule: str = "uniform",    # uniform | quadratic (the paper's non-uniform 1:N)
                 center: int = 15,             # quadratic: the step the full steps crowd around
                 power: float = 1.4,           # quadratic: the exponent (lowered by 0.02 until the count fits)
                 branch_id: int | None = None):  # the official cache_branch_id (block id // 3, layer id % 3): a cut
                                                 # inside a block; replaces `branch` (the paper's tables use 0)
        if schedule not in ("uniform", "quadratic"):
            raise UsageError(f"accelerator.schedule={schedule}: choose uniform or quadratic")
        if int(interval) < 1:
            raise UsageError(f"accelerator.interval={interval}: must be at least 1 (1 computes every step fully)")
        if int(branch) < 1:
            raise UsageError(f"accelerator.branch={branch}: at least the outermost down/up block pair is recomputed "
                             f"(branch >= 1)")
        if branch_id is not None and int(branch_id) < 0:
            raise UsageError(f"accelerator.branch_id={branch_id}: the official ids count from 0 (block id // 3, "
                             f"layer id % 3)")
        self.interval, self.branch, self.schedule = int(interval), int(branch), schedule
        self.branch_id = None if branch_id is None else int(branch_id)
        self.center, self.power = int(center), float(power)
        self.state: dict | None = None
        self.records: list[dict] = []

    def unet(self, net: nn.Module) -> nn.Module:
        unet = getattr(net, "unet", net)
        if not hasattr(unet, "up_blocks") or not hasattr(unet, "down_blocks"):
            raise UsageError(f"accelerator=deepcache needs a UNet (down_blocks / up_blocks); got "
                             f"{type(unet).__name__}")
        if self.branch_id is not None and self.branch_id // 3 >= len(unet.down_blocks):
            raise UsageError(f"accelerator.branch_id={self.branch_id}: this UNet has {len(unet.down_blocks)} down "
                             f"blocks, so ids 0..{3 * len(unet.down_blocks) - 1} (block id // 3, layer id % 3)")
        if self.branch_id is None and self.branch >= len(unet.down_blocks):
            raise UsageError(f"accelerator.branch={self.branch}: this UNet has {len(unet.down_blocks)} down blocks; "
                             f"choose 1..{len(unet.down_blocks) - 1} so that something deep is cached")
        return unet

    def cached(self, unet: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules that return their last full step's output at a partial step. `branch`: whole down blocks
        from `branch` on, the mid block, and the up blocks but the last `branch`. `branch_id` (b = id // 3, l = id % 3):
        the official helper's rule, module by module: in down block i its layer-j resnet and attention, its
        downsampler (layer = its resnet count) and the block itself (layer 0) when i > b, or i = b and layer >= l; the
        mid block; in the up block r-th from the output, its resnet and attention j-th from the block's end (layer
        j), its upsampler and the block itself (layer 0) when r > b, or r = b and layer > l."""
        n, mid = len(unet.up_blocks), [("mid", unet.mid_block)] if unet.mid_block is not None else []
        if self.branch_id is None:
            return [(f"down{i}", b) for i, b in enumerate(unet.down_blocks) if i >= self.branch] + mid + \
                [(f"up{i}", b) for i, b in enumerate(unet.up_blocks) if i < n - self.branch]
        b, layer_id = divmod(self.branch_id, 3)
        listed = lambda blk, name: list(getattr(blk, name, None) or [])  # noqa: E731
        out = []
        for i, blk in enumerate(unet.down_blocks):
            layers = [(f"down{i}.{name}.{j}", m, j) for name in ("attentions", "resnets")
                      for j, m in enumerate(listed(blk, name))]
            layers += [(f"down{i}.downsamplers.{j}", m, len(blk.resnets))
                       for j, m in enumerate(listed(blk, "downsamplers"))]
            layers += [(f"down{i}", blk, 0)]
            out += [(key, m) for key, m, layer in layers if i > b or (i == b and layer >= layer_id)]
        out += mid
        for k, blk in enumerate(unet.up_blocks):
            r, count = n - k - 1, len(blk.resnets)
            layers = [(f"up{k}.{name}.{j}", m, count - j - 1) for name in ("attentions", "resnets")
                      for j, m in enumerate(listed(blk, name))]
            layers += [(f"up{k}.upsamplers.{j}", m, 0) for j, m in enumerate(listed(blk, "upsamplers"))]
            layers += [(f"up{k}", blk, 0)]
            out += [(key, m) for key, m, layer in layers if r > b or (r == b and layer > layer_id)]
        return out

    def check(self, net: nn.Module, loops: list[int]) -> None:
        if self.interval > 1:
            self.unet(net)  # a UNet, with deep blocks beyond `branch`

    def attach(self, net: nn.Module) -> list:
        self.state = {"cache": {}, "partial": False}
        if self.interval == 1:
            return []  # neutral: nothing cached, nothing hooked
        handles = []
        for key, module in self.cached(self.unet(net)):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_Cached(self.state, key), HOOK)
            handles.append(_Handle(module))
        return handles

    def wrap(self, model_fn: ModelFn, step=None) -> ModelFn:
        if self.interval == 1 or step is None or self.state is None:
            return model_fn
        record = {"full": 0, "partial": 0, "flops": {}}
        self.records.append(record)
        state = self.state
        state["cache"].clear()  # a new loop (Self-Cascade's pivot loop, then its 2x loop) starts with a full step
        num_steps = -(-len(step.timesteps) // step.order)
        full = set(full_steps(num_steps, self.interval, self.schedule, self.center, self.power))
        seen = {"step": None, "computed": -1}  # the loop's full step at the last call, computed steps so far

        def fn(x: torch.Tensor, t, cond: dict) -> torch.Tensor:
            if step.full_step != seen["step"]:  # the first call of a step (Heun's second call shares its kind)
                seen["step"], seen["computed"] = step.full_step, seen["computed"] + 1
            kind = "full" if seen["computed"] in full or not state["cache"] else "partial"
            if kind == "full":
                state["cache"].clear()
            state["partial"] = kind == "partial"
            record[kind] += 1
            if kind in record["flops"]:
                return model_fn(x, t, cond)
            out, record["flops"][kind] = counted(model_fn, x, t, cond)  # once per kind and sampling call
            return out

        return fn

    # -- per-image records and the run's summary (hiresrun/store.py) -----------------------------------------
    def per_image(self, mark: int, seeds: list[int]) -> dict | None:
        """Each image's full and partial UNet calls in its batch, and the partial call's FLOPs / a full call's."""
        recs = self.records[mark:]
        if not recs:
            return None
        full, partial = sum(r["full"] for r in recs), sum(r["partial"] for r in recs)
        shares = [r["flops"]["partial"] / r["flops"]["full"] for r in recs
                  if r["flops"].get("full") and "partial" in r["flops"]]
        share = sum(shares) / len(shares) if shares else 1.0
        return {str(s): {"full": full, "partial": partial, "partial_flops_share": share} for s in seeds}

    def summary(self, per_image: dict) -> tuple[dict, dict] | None:
        """cost_per_image = full + partial x share (full-evaluation units); the per-image calls for the record file."""
        if not per_image:
            return None
        p = list(per_image.values())
        cost = sum(x["full"] + x["partial"] * x["partial_flops_share"] for x in p) / len(p)
        return per_image, {"cost_per_image": cost, "partial_per_image": sum(x["partial"] for x in p) / len(p),
                           "partial_flops_share": sum(x["partial_flops_share"] for x in p) / len(p)}
