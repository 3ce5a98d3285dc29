"""accelerator=deepcache: DeepCache (Ma, Fang and Wang, CVPR 2024, arXiv 2312.00858), training-free feature reuse.

Adjacent denoising steps produce nearly the same high-level UNet features, so at a *full* step the whole UNet runs
and the outputs of its deep blocks are cached; at the *partial* steps in between only the shallow branch runs
(conv_in, the first `branch` down blocks, the last `branch` up blocks, conv_out) and the deep blocks return their
cached outputs, skip connections of the shallow branch being recomputed (the paper's Fig. 3 and eq. 5). Uniform
schedule (the paper's N = `interval`): full at steps 0, N, 2N, ...

The seam that skips compute is diffusers' own hook registry (`diffusers.hooks.HookRegistry`, `ModelHook.new_forward`),
not torch hooks (which cannot skip a forward) and not a fork of the blocks. Block granularity: `branch` counts whole
down/up blocks (the official code picks a layer inside a block; on diffusers' 2-4 level UNets a block is the
natural unit). Cost accounting: the first full and the first partial call of a sampling call are counted with
torch's FLOP counter, and each image's record carries its full and partial calls and the partial call's FLOP share,
so `metrics.json` reports `cost_per_image` in full-evaluation units beside `nfe_per_image` (which counts calls).
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from hiresrun.accelerators import Accelerator
from hiresrun.errors import UsageError
from hiresrun.models import ModelFn
from hiresrun.support import ANY_UNET, Support

HOOK = "hiresrun_deepcache"


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

    supports = Support(unets=ANY_UNET, needs_steps=True,
                       why="caches the deep blocks of a UNet2DModel / UNet2DConditionModel between sampler steps")

    def __init__(self, interval: int = 3,      # N: a full step every N steps (paper: 3-5 for SD); 1 = no caching
                 branch: int = 1):             # shallow down/up blocks recomputed at partial steps (>= 1)
        if int(interval) < 1:
            raise UsageError(f"accelerator.interval={interval}: must be at least 1 (1 computes every step fully)")
        if int(branch) < 1:
            raise UsageError(f"accelerator.branch={branch}: at least the outermost down/up block pair is recomputed "
                             f"(branch >= 1)")
        self.interval, self.branch = int(interval), int(branch)
        self.state: dict | None = None
        self.records: list[dict] = []

    def unet(self, net: nn.Module) -> nn.Module:
        unet = getattr(net, "unet", net)
        if not hasattr(unet, "up_blocks") or not hasattr(unet, "down_blocks"):
            raise UsageError(f"accelerator=deepcache needs a UNet (down_blocks / up_blocks); got "
                             f"{type(unet).__name__}")
        if self.branch >= len(unet.down_blocks):
            raise UsageError(f"accelerator.branch={self.branch}: this UNet has {len(unet.down_blocks)} down blocks; "
                             f"choose 1..{len(unet.down_blocks) - 1} so that something deep is cached")
        return unet

    def attach(self, net: nn.Module) -> list:
        self.state = {"cache": {}, "partial": False}
        if self.interval == 1:
            return []  # neutral: nothing cached, nothing hooked
        unet = self.unet(net)
        n = len(unet.up_blocks)
        deep = [("down", i, b) for i, b in enumerate(unet.down_blocks) if i >= self.branch]
        deep += [("mid", 0, unet.mid_block)] if unet.mid_block is not None else []
        deep += [("up", i, b) for i, b in enumerate(unet.up_blocks) if i < n - self.branch]
        handles = []
        for kind, i, block in deep:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_Cached(self.state, f"{kind}{i}"), HOOK)
            handles.append(_Handle(block))
        return handles

    def wrap(self, model_fn: ModelFn, step=None) -> ModelFn:
        if self.interval == 1 or step is None or self.state is None:
            return model_fn
        record = {"full": 0, "partial": 0, "flops": {}}
        self.records.append(record)
        state = self.state
        state["cache"].clear()  # a new loop (Self-Cascade's pivot loop, then its 2x loop) starts with a full step

        def fn(x: torch.Tensor, t, cond: dict) -> torch.Tensor:
            kind = "partial" if step.full_step % self.interval and state["cache"] else "full"
            if kind == "full":
                state["cache"].clear()
            state["partial"] = kind == "partial"
            record[kind] += 1
            if kind in record["flops"]:
                return model_fn(x, t, cond)
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:  # once per kind and sampling call: the cost share
                out = model_fn(x, t, cond)
            record["flops"][kind] = counter.get_total_flops()
            return out

        return fn

    # -- per-image records and the run's summary (hiresrun/store.py) -----------------------------------------
    def mark(self) -> int:
        return len(self.records)

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
