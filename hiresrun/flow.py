"""Flow-matching transformers (Stable Diffusion 3 / 3.5, FLUX.1): how the loop calls them and sets their schedule.

Both families learn the velocity v = eps - x0 along the straight path x_sigma = (1 - sigma) x0 + sigma eps, and both
are sampled on a sigma grid from 1 to 0 (diffusers' `FlowMatchEulerDiscreteScheduler`; the network reads the
timestep 1000 sigma). What differs from the UNets, and lives here:

- **the call.** SD3's transformer patchifies the latent itself; FLUX's reads a sequence of 2x2-packed latent
  patches with 3-axis position ids (text ids all zero, image ids (0, row, column)) and the timestep as sigma.
  hiresrun's loop keeps every latent in its unpacked shape (B, C, H, W): packing is a fixed permutation, so the
  elementwise sampler steps give the same numbers either way, and every method (resizing a pivot, mixing latents)
  works on FLUX unchanged. `model_fn` packs on the way in and unpacks on the way out, as `FluxPipeline` does.
- **guidance.** SD3 runs true classifier-free guidance over the doubled batch [unconditional; conditional], as its
  pipeline. FLUX.1-dev is guidance-distilled: the guidance scale is an input (`cond["guidance"]`, one row per image),
  one pass per step; true CFG (`FluxPipeline`'s `true_cfg_scale` with a negative prompt) is the generic guidance of
  models.py (`cond["negative"]`, `cond["guidance_scale"]`).
- **the schedule.** FLUX shifts its sigmas by an amount that grows with the image's token count (mu, linear in the
  number of packed tokens between `base_image_seq_len` and `max_image_seq_len`), on explicit sigmas
  linspace(1, 1/N, N); SD3 uses a fixed shift on the scheduler's own grid. `set_timesteps` computes mu from the
  latent the loop is about to integrate, so a pass at 2x resolution gets the shift the pipeline would give that size.
- **positions above the native size** (`model.positions`): FLUX's RoPE ids as they are (`extrapolate`, what
  diffusers does), scaled into the native range (`interpolate`, position interpolation), or the RoPE base enlarged by
  NTK-aware scaling (`ntk`: theta' = theta s^(d / (d - 2)) for a token-grid ratio s and axis width d). SD3's absolute
  embedding is a centre crop of a `pos_embed_max_size` grid, so it extrapolates up to that size and no further.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hiresrun.errors import UsageError

FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}  # denoiser class -> family
FLOW_TRANSFORMERS = tuple(FAMILIES)  # support.FLOW_TRANSFORMERS (kept free of torch for composition)
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}  # pipeline class -> family
POSITIONS = ("extrapolate", "interpolate", "ntk")
TOKEN_SIDE = 2  # latent pixels per token side: FLUX packs 2x2, SD3's released transformers use patch_size 2


def family(net: nn.Module) -> str | None:
    """"sd3" | "flux" for a flow-matching transformer, None otherwise."""
    return FAMILIES.get(type(net).__name__)


def latent_channels(net: nn.Module) -> int:
    """Channels of the unpacked latent the loop integrates (FLUX's transformer reads 4 of them per packed token)."""
    channels = int(net.config.in_channels)
    return channels // 4 if family(net) == "flux" else channels


# -- positions ---------------------------------------------------------------------------------------------------
@dataclass
class Positions:
    """How a FLUX transformer places image tokens of a grid larger than its native one (module docstring)."""

    mode: str = "extrapolate"
    native: int = 0              # the native image's token-grid side (latent side / 2); 0: unknown (never scaled)

    def scale(self, rows: int, cols: int) -> tuple[float, float]:
        """The token-grid ratios (rows, cols) of this pass to the native grid, 1 where the pass is not larger."""
        if self.native <= 0:
            return 1.0, 1.0
        return max(rows / self.native, 1.0), max(cols / self.native, 1.0)


def configure(net: nn.Module, mode: str, native_side: int) -> None:
    """Record on a flow transformer how its positions extend above `native_side` pixels of latent (model_fn reads
    it): FLUX takes every mode; SD3 only `extrapolate` (its crop of the learned grid), and refuses a size beyond the
    grid in `check_size`."""
    if mode not in POSITIONS:
        raise UsageError(f"model.positions={mode}: choose {' | '.join(POSITIONS)}")
    if family(net) == "sd3" and mode != "extrapolate":
        raise UsageError(f"model.positions={mode}: SD3's position embedding is a crop of a learned "
                         f"{net.config.pos_embed_max_size}x{net.config.pos_embed_max_size} grid, not rotary; only "
                         f"model.positions=extrapolate applies")
    net.hiresrun_positions = Positions(mode, native_side // TOKEN_SIDE)


def check_size(net: nn.Module, latent_side: int, resolution: int) -> None:
    """Refuse a latent side SD3's cropped position embedding cannot cover (the pipeline would fail mid-run)."""
    if family(net) != "sd3":
        return
    grid, patch = int(net.config.pos_embed_max_size), int(net.config.patch_size)
    if latent_side // patch > grid:
        largest = grid * patch * resolution // latent_side
        raise UsageError(f"data.resolution={resolution}: SD3's position embedding covers {grid}x{grid} patches "
                         f"({largest} px at most); pick data.resolution <= {largest}")


def _image_ids(net: nn.Module, rows: int, cols: int, device, dtype) -> Tensor:
    """FLUX's image position ids (0, row, column) for a rows x cols token grid, as `FluxPipeline` makes them; under
    `interpolate` the row and column ids are scaled into the native range."""
    from diffusers import FluxPipeline

    ids = FluxPipeline._prepare_latent_image_ids(1, rows, cols, device, dtype)
    positions = getattr(net, "hiresrun_positions", Positions())
    if positions.mode == "interpolate":
        sr, sc = positions.scale(rows, cols)
        if (sr, sc) != (1.0, 1.0):
            ids = ids.clone()
            ids[:, 1] /= sr
            ids[:, 2] /= sc
    return ids


def _ntk_theta(net: nn.Module, rows: int, cols: int) -> float | None:
    """The RoPE base of an `ntk` call above the native grid, or None (the model's own). Image ids use the last two
    axes, which share one width in every FLUX release; text and the first axis sit at position 0, where the rotation
    is the identity whatever the base."""
    positions = getattr(net, "hiresrun_positions", Positions())
    if positions.mode != "ntk":
        return None
    s = max(positions.scale(rows, cols))
    if s == 1.0:
        return None
    d = int(net.config.axes_dims_rope[-1])
    return float(net.pos_embed.theta) * s ** (d / (d - 2))


# -- the call ---------------------------------------------------------------------------------------------------
def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) -> FLUX's (B, H/2 * W/2, 4C) sequence of 2x2 patches (FluxPipeline._pack_latents)."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def unpack(seq: Tensor, h: int, w: int) -> Tensor:
    """FLUX's packed sequence back to (B, C, H, W) (FluxPipeline._unpack_latents, at latent scale)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(seq, h, w, 1)


def model_fn(net: nn.Module):
    """The denoiser of a flow transformer as the loop calls it: (x_t unpacked, t = 1000 sigma, cond) -> velocity."""
    from hiresrun.models import cat_rows, guide, guided, unet_kwargs

    flux = family(net) == "flux"

    def call(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        kwargs, two = unet_kwargs(cond), guided(cond)
        # SD3's pipeline batches [unconditional; conditional]; FLUX's true CFG calls conditional then unconditional
        both = (cat_rows(kwargs, cond["negative"]) if flux else cat_rows(cond["negative"], kwargs)) if two else kwargs
        xx = torch.cat([x, x]) if two else x
        tt = torch.as_tensor(t, device=x.device)
        tt = tt.expand(xx.shape[0]) if tt.ndim == 0 else torch.cat([tt, tt]) if two else tt
        if not flux:
            out = net(hidden_states=xx, timestep=tt, **both, return_dict=False)[0]
            if not two:
                return out
            uncond, text = out.chunk(2)
            return guide(uncond, text, cond)
        h, w = x.shape[-2:]
        seq = both["encoder_hidden_states"]
        ids = _image_ids(net, h // 2, w // 2, x.device, seq.dtype)
        theta, old = _ntk_theta(net, h // 2, w // 2), net.pos_embed.theta
        net.pos_embed.theta = old if theta is None else theta
        try:
            out = net(hidden_states=pack(xx), timestep=(tt / 1000).to(xx.dtype), guidance=both.get("guidance"),
                      pooled_projections=both["pooled_projections"], encoder_hidden_states=seq,
                      txt_ids=torch.zeros(seq.shape[1], 3, device=x.device, dtype=seq.dtype), img_ids=ids,
                      return_dict=False)[0]
        finally:
            net.pos_embed.theta = old
        out = unpack(out, h, w)
        if not two:
            return out
        text, uncond = out.chunk(2)
        return guide(uncond, text, cond)

    return call


# -- the schedule ---------------------------------------------------------------------------------------------------
def is_flow_scheduler(scheduler) -> bool:
    """Whether a diffusers scheduler integrates a flow-matching velocity."""
    return type(scheduler).__name__.startswith("FlowMatch") or bool(getattr(scheduler.config, "use_flow_sigmas", False))


def mu(config, tokens: int) -> float:
    """FLUX's resolution-dependent shift exponent (the pipelines' `calculate_shift`): linear in the token count,
    base_shift at base_image_seq_len tokens and max_shift at max_image_seq_len."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    get = config.get if isinstance(config, dict) else lambda k, d: getattr(config, k, d)
    return float(calculate_shift(tokens, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                                 get("base_shift", 0.5), get("max_shift", 1.15)))


def resolution_alpha(scheduler, x: Tensor) -> float:
    """`model.resolution_shift`'s factor for a pass over latents shaped like `x`: alpha = sqrt(tokens / native
    tokens), the side ratio to the native image (1 at or below it, and without the knob). The resolution-dependent
    shift of Esser et al. 2024 (SD3, sec. 5.3.2), which is simple diffusion's shifted schedule in flow form: a shift by
    alpha scales the noise-to-signal ratio sigma / (1 - sigma) by alpha, i.e. log-SNR by -2 log alpha."""
    native = getattr(scheduler, "hiresrun_native_tokens", None)
    tokens = (x.shape[-2] // TOKEN_SIDE) * (x.shape[-1] // TOKEN_SIDE)
    return max(tokens / native, 1.0) ** 0.5 if native else 1.0


def set_timesteps(scheduler, num_steps: int, x: Tensor) -> None:
    """The scheduler's grid for a loop over latents shaped like `x`, as the model's pipeline sets it: FLUX-style
    schedulers (dynamic shifting) on sigmas linspace(1, 1/N, N) with mu from x's token count; SD3-style ones on their
    own grid with their fixed shift; every other scheduler as before. Under `model.resolution_shift` the shift is
    multiplied by `resolution_alpha` (fixed shift: shift alpha; dynamic: mu + ln alpha)."""
    if not is_flow_scheduler(scheduler):
        scheduler.set_timesteps(num_steps, device=x.device)
        return
    alpha = resolution_alpha(scheduler, x)
    if not getattr(scheduler.config, "use_dynamic_shifting", False):
        if hasattr(scheduler, "hiresrun_native_tokens"):  # FlowMatchEuler (build.sampler_scheduler allows no other)
            scheduler.set_shift(float(scheduler.config.shift) * alpha)
        scheduler.set_timesteps(num_steps, device=x.device)
        return
    import math

    import numpy as np

    shift = mu(scheduler.config, (x.shape[-2] // TOKEN_SIDE) * (x.shape[-1] // TOKEN_SIDE)) + math.log(alpha)
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        scheduler.set_timesteps(num_steps, device=x.device, sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                                mu=shift)
    else:  # DPM-Solver++ / UniPC in flow mode take mu alone
        scheduler.set_timesteps(num_steps, device=x.device, mu=shift)


def scheduler_from(kind: str):
    """A flow sampler's factory from the base's scheduler config: `euler` and `heun` are diffusers' FlowMatch
    schedulers; `dpmsolver` and `unipc` are DPM-Solver++ (2M) and UniPC in diffusers' flow mode (flow sigmas, flow
    prediction) with the model's shift, dynamic when the model's is."""
    def build(config: dict):
        import diffusers

        config = dict(config)
        if not type_is_flow(config):
            raise UsageError(f"sampler=flow_{kind} integrates a flow-matching model; this model's scheduler is "
                             f"{config.get('_class_name')}: pick ddim, euler, heun, dpmsolver or unipc")
        if kind == "euler":
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        if kind == "heun":
            if config.get("use_dynamic_shifting"):
                raise UsageError("sampler=flow_heun: diffusers' FlowMatchHeunDiscreteScheduler has no "
                                 "resolution-dependent shift, which this model's schedule (FLUX) needs; use "
                                 "sampler=flow_euler or flow_dpmsolver")
            return diffusers.FlowMatchHeunDiscreteScheduler.from_config(config)
        dynamic = bool(config.get("use_dynamic_shifting"))
        common = dict(num_train_timesteps=int(config.get("num_train_timesteps", 1000)), use_flow_sigmas=True,
                      prediction_type="flow_prediction", flow_shift=float(config.get("shift", 1.0)),
                      use_dynamic_shifting=dynamic)
        if kind == "dpmsolver":
            return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
        return diffusers.UniPCMultistepScheduler(**common)

    return build


def type_is_flow(config: dict) -> bool:
    """Whether a scheduler config is a flow-matching model's (its class, or diffusers' flow mode)."""
    return str(config.get("_class_name", "")).startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))


# -- training -------------------------------------------------------------------------------------------------------
def training_scheduler(config: dict):
    """The flow-matching training grid: the model's FlowMatchEulerDiscreteScheduler as built from its config (SD3: its
    1000 sigmas shifted by 3; FLUX: unshifted, as diffusers' FLUX training scripts draw from it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


def training_loss(net: nn.Module, scheduler, x0: Tensor, cond: dict | None = None) -> Tensor:
    """The rectified-flow loss of SD3 (Esser et al. 2024) as diffusers' SD3 / FLUX training scripts compute it: u
    from the logit-normal density (mean 0, std 1: SD3's default sampling), the training grid's sigma at index
    floor(u T), x_sigma = (1 - sigma) x0 + sigma eps, and the MSE of the predicted velocity against eps - x0 (uniform
    weighting). Randomness from the global RNG, which the training loop seeds per step (exact resume)."""
    import torch.nn.functional as F
    from diffusers.training_utils import compute_density_for_timestep_sampling

    eps = torch.randn_like(x0)
    u = compute_density_for_timestep_sampling("logit_normal", batch_size=x0.shape[0], logit_mean=0.0, logit_std=1.0)
    index = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
    sigma = scheduler.sigmas[index].to(x0.device, x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    x_t = (1 - sigma) * x0 + sigma * eps
    pred = model_fn(net)(x_t, scheduler.timesteps[index].to(x0.device), cond or {})
    return F.mse_loss(pred.float(), (eps - x0).float())
