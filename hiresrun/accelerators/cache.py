"""accelerator=cache: diffusers' own cache hooks on a transformer base (DiT, FLUX), configured, not copied.

`accelerator.kind` picks one of diffusers' cache configs and its `apply_*` function (`diffusers.hooks`):

- `first_block`: First Block Cache (ParaAttention; after TeaCache): when the first block's residual changed by less
  than `threshold` (relative mean absolute difference) since the last computed step, the other blocks are skipped
  and their cached residual is added;
- `taylorseer`: TaylorSeer (Liu et al. 2025): every `interval`-th step computes the attention / feed-forward
  outputs, the steps between predict them by a Taylor expansion of their history;
- `magcache`: MagCache (Ma et al. 2025): skips steps while the accumulated magnitude-ratio error stays below
  `threshold`; needs the model's per-step magnitude ratios (`accelerator.options.mag_ratios`, printed by one run
  with `accelerator.options.calibrate=true`);
- `pab`: Pyramid Attention Broadcast (Zhao et al. 2024): self-attention outputs are reused for `interval` - 1 steps
  inside the timestep window `options.spatial_attention_timestep_skip_range` (default: the whole run).

Everything else a config takes goes verbatim through `accelerator.options`. DiT's blocks name their attention
`attn1` and their MLP `ff`, which TaylorSeer's default patterns do not match, so for a DiT its `cache_identifiers`
default to those modules. diffusers wires these hooks through `CacheMixin` on the transformers it lists;
`DiTTransformer2DModel` is not one, so this class does what `enable_cache` / `cache_context` / `disable_cache` do:
apply the config's hooks, set a `CacheContext` before each call (the loop's step index and timestep), remove the
hooks after the sampling call. The hooks are applied afresh at the start of each sampling loop, so no state leaks
between loops or batches. Cost: each call's FLOPs over those of the loop's first call, which always runs every block,
summed per image as `cost_per_image` (full-evaluation units); torch's FLOP counter runs on that first call only and
later calls add up the modules they ran (`accelerators.FlopShare`), so the counting stays out of the timed calls.
"""

from __future__ import annotations

import torch
from torch import nn

from hiresrun.accelerators import Accelerator, FlopShare
from hiresrun.errors import UsageError
from hiresrun.models import ModelFn
from hiresrun.support import TRANSFORMERS, Support

KINDS = {"first_block": ("FirstBlockCacheConfig", "apply_first_block_cache"),
         "taylorseer": ("TaylorSeerCacheConfig", "apply_taylorseer_cache"),
         "magcache": ("MagCacheConfig", "apply_mag_cache"),
         "pab": ("PyramidAttentionBroadcastConfig", "apply_pyramid_attention_broadcast")}
DIT_MODULES = [r"^transformer_blocks\.\d+\.attn1$", r"^transformer_blocks\.\d+\.ff$"]


def hook_names(module: nn.Module) -> set[str]:
    """The names of the diffusers registry hooks anywhere under `module`."""
    return {name for m in module.modules() if (r := getattr(m, "_diffusers_hook", None)) for name in r.hooks}


class _Handle:
    """Removes every diffusers registry hook this accelerator put under the transformer (what attach returns)."""

    def __init__(self, acc: DiffusersCache):
        self.acc = acc

    def remove(self) -> None:
        self.acc.remove()
        self.acc.transformer = None


class DiffusersCache(Accelerator):
    """One of diffusers' cache configs on the transformer, with a cache context per call."""

    # SD3 is left out: its last joint block returns no text stream (context_pre_only), which diffusers' block hooks
    # subtract from (SD3Transformer2DModel is not one of diffusers' CacheMixin models either)
    supports = Support(unets=TRANSFORMERS + ("FluxTransformer2DModel",), needs_steps=True, level="blocks", flow=True,
                       whole_batches=True,  # one batch's state
                       why="diffusers' cache hooks wrap a DiT's or FLUX's transformer blocks")

    def __init__(self, kind: str = "first_block",   # first_block | taylorseer | magcache | pab
                 threshold: float = 0.05,           # first_block, magcache: the skip threshold; 0 never skips
                 interval: int = 2,                 # taylorseer: cache_interval; pab: the attention skip range;
                                                    # 1 computes every step
                 options: dict | None = None,       # further fields of the diffusers config, verbatim
                 count_flops: bool = True):         # cost_per_image (accelerators.FlopShare)
        if kind not in KINDS:
            raise UsageError(f"accelerator.kind={kind}: choose {' | '.join(KINDS)}")
        if threshold < 0:
            raise UsageError(f"accelerator.threshold={threshold}: must be >= 0 (0 never skips)")
        if int(interval) < 1:
            raise UsageError(f"accelerator.interval={interval}: must be at least 1 (1 computes every step)")
        self.kind, self.threshold, self.interval = kind, float(threshold), int(interval)
        self.options, self.count_flops = dict(options or {}), bool(count_flops)
        if kind == "magcache" and "mag_ratios" not in self.options and not self.options.get("calibrate"):
            raise UsageError("accelerator.kind=magcache needs the model's magnitude ratios: run once with "
                             "accelerator.options.calibrate=true, then pass accelerator.options.mag_ratios=[...]")
        self.transformer: nn.Module | None = None
        self.names: set[str] = set()  # the hooks this accelerator applied (and removes)
        self.records: list[dict] = []
        self.meter = FlopShare(nn.Module())  # replaced by each loop's own

    @property
    def neutral(self) -> bool:
        """The setting that computes everything: no hooks at all."""
        return (self.kind in ("first_block", "magcache") and self.threshold == 0 and not self.options) or \
            (self.kind in ("taylorseer", "pab") and self.interval == 1 and not self.options)

    def config(self, num_steps: int, timestep: dict):
        """The diffusers config object of this kind for a loop of `num_steps` steps."""
        import diffusers.hooks as hooks

        fields = {"first_block": {"threshold": self.threshold},
                  "magcache": {"threshold": self.threshold, "num_inference_steps": num_steps},
                  "taylorseer": {"cache_interval": self.interval},
                  "pab": {"spatial_attention_block_skip_range": self.interval,
                          "spatial_attention_timestep_skip_range": (-1, 10 ** 9),
                          "current_timestep_callback": lambda: timestep["t"]}}[self.kind]
        if self.kind == "taylorseer" and type(self.transformer).__name__ == "DiTTransformer2DModel":
            fields["cache_identifiers"] = DIT_MODULES
        fields.update(self.options)
        if "spatial_attention_timestep_skip_range" in fields:
            fields["spatial_attention_timestep_skip_range"] = tuple(fields["spatial_attention_timestep_skip_range"])
        try:
            return getattr(hooks, KINDS[self.kind][0])(**fields)
        except TypeError as e:
            raise UsageError(f"accelerator.options for kind={self.kind}: {e} (fields of diffusers' "
                             f"{KINDS[self.kind][0]})") from None

    def attach(self, net: nn.Module) -> list:
        if self.neutral:
            return []
        transformer = getattr(net, "unet", net)
        kinds = self.supports.unets
        if type(transformer).__name__ not in kinds:
            raise UsageError(f"accelerator=cache needs a transformer base ({' or '.join(kinds)}); got "
                             f"{type(transformer).__name__}: use accelerator=deepcache on UNets")
        self.transformer = transformer
        return [_Handle(self)]

    def remove(self) -> None:
        """Take off the hooks this accelerator applied (diffusers' `disable_cache` does the same by name)."""
        from diffusers.hooks import HookRegistry

        self.meter.remove()
        if self.transformer is not None and self.names:
            registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
            for name in self.names:
                registry.remove_hook(name, recurse=True)
            registry.invalidate_child_registries_cache()
        self.names = set()

    def wrap(self, model_fn: ModelFn, step=None) -> ModelFn:
        if self.neutral or step is None or self.transformer is None:
            return model_fn
        import diffusers.hooks as hooks
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        transformer = self.transformer
        self.remove()  # a new loop starts with fresh hook state
        num_steps = -(-len(step.timesteps) // step.order)
        timestep = {"t": None}
        before = hook_names(transformer)
        getattr(hooks, KINDS[self.kind][1])(transformer, self.config(num_steps, timestep))
        self.names = hook_names(transformer) - before
        record = {"calls": 0, "cost": 0.0, "partial": 0}
        self.records.append(record)
        self.meter.remove()
        self.meter = FlopShare(transformer)  # a new loop: its first call is counted, the rest only noted

        def fn(x: torch.Tensor, t, cond: dict) -> torch.Tensor:
            timestep["t"] = step.time(t)
            _set_cache_context(transformer, CacheContext("cond", step_index=step.full_step,
                                                         num_inference_steps=num_steps, timestep=timestep["t"]))
            try:
                if not self.count_flops:
                    out = model_fn(x, t, cond)
                else:
                    out, share = self.meter(model_fn, x, t, cond)  # the loop's first call runs everything
                    record["cost"] += share
                    record["partial"] += int(share < 0.999)
            finally:
                _set_cache_context(transformer, None)
            record["calls"] += 1
            return out

        return fn

    # -- per-image records and the run's summary (hiresrun/store.py) -----------------------------------------
    def per_image(self, mark: int, seeds: list[int]) -> dict | None:
        recs = self.records[mark:]
        if not recs or not self.count_flops:
            return None
        calls, cost, partial = (sum(r[k] for r in recs) for k in ("calls", "cost", "partial"))
        return {str(s): {"calls": calls, "cost": cost, "partial": partial} for s in seeds}

    def summary(self, per_image: dict) -> tuple[dict, dict] | None:
        if not per_image:
            return None
        p = list(per_image.values())
        return per_image, {"cost_per_image": sum(x["cost"] for x in p) / len(p),
                           "partial_per_image": sum(x["partial"] for x in p) / len(p)}
