"""method=selfcascade: Self-Cascade (Guo et al., ECCV 2024, arXiv 2402.10491).

Tuning-free: a base-resolution pivot, upsampled and re-noised to an intermediate step (pivot-guided noise
re-schedule, `strength` of the N-step grid kept), denoised at the target size by the unmodified base UNet;
`stages` doublings (16 -> 32 -> 64). Tuned: time-aware feature upsamplers U_j add the frozen UNet's features of
the clean pivot (run with the high-resolution step's time embedding) into the hidden states after every down
block and the mid block -- never into the skips. Attachment points come from `len(unet.down_blocks)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun import sampling
from hiresrun.data import resize
from hiresrun.errors import UsageError
from hiresrun.hooks import hooks_removed_after
from hiresrun.methods.finetune import denoising_loss
from hiresrun.methods.none import NoneMethod
from hiresrun.methods.upsample import upscale
from hiresrun.models import BaseModel, model_fn, rows
from hiresrun.support import ANY_UNET, Support


class ResBlockUp(nn.Module):
    """The official upsampler half: ADM ResBlock (GN-SiLU-[2x nearest]-conv, + emb, GN-SiLU-zero conv)."""

    def __init__(self, C: int, E: int, up: bool):
        super().__init__()
        self.up = up
        self.norm1, self.conv1 = nn.GroupNorm(min(32, C), C), nn.Conv2d(C, C, 3, padding=1)
        self.emb = nn.Linear(E, C)
        self.norm2, self.conv2 = nn.GroupNorm(min(32, C), C), nn.Conv2d(C, C, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        double = (lambda x: F.interpolate(x, scale_factor=2, mode="nearest")) if self.up else (lambda x: x)
        x = self.conv1(double(F.silu(self.norm1(h))))
        x = x + self.emb(F.silu(emb))[:, :, None, None]
        return double(h) + self.conv2(F.silu(self.norm2(x)))


class ResBlockUpsampler(nn.Sequential):
    """upsampler=resblock: two ResBlocks, the first doubling; 2 (18 C^2 + (E + 7) C) parameters; at
    initialisation it returns exactly nearest-upsample(h) (zero output convs)."""

    def __init__(self, C: int, E: int):
        super().__init__(ResBlockUp(C, E, up=True), ResBlockUp(C, E, up=False))

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for block in self:
            h = block(h, emb)
        return h


class LightUpsampler(nn.Module):
    """upsampler=light (ours): nearest-upsample plus a zero-initialised depthwise 3x3 residual whose gain
    depends on the time embedding through one scalar: 10 C + E + 1 parameters, time-aware, identity-at-init."""

    def __init__(self, C: int, E: int):
        super().__init__()
        self.dw = nn.Conv2d(C, C, 3, padding=1, groups=C)
        self.gain = nn.Linear(E, 1)
        nn.init.zeros_(self.dw.weight)
        nn.init.zeros_(self.dw.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        u = F.interpolate(h, scale_factor=2, mode="nearest")
        return u + (1 + self.gain(F.silu(emb)))[:, :, None, None] * self.dw(u)


UPSAMPLERS = {"resblock": ResBlockUpsampler, "light": LightUpsampler}


class CascadeNet(nn.Module):
    """The frozen base UNet plus one upsampler set per stage (what Lightning trains and checkpoints)."""

    def __init__(self, unet: nn.Module, upsampler: str, stages: int):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        widths = list(unet.config.block_out_channels)  # down block j outputs widths[j]; mid keeps widths[-1]
        E = unet.time_embedding.linear_2.out_features
        self.upsamplers = nn.ModuleList(nn.ModuleList(UPSAMPLERS[upsampler](C, E) for C in widths + widths[-1:])
                                        for _ in range(stages))

    @property
    def device(self) -> torch.device:
        return self.unet.device


def lr_features(unet: nn.Module, pivot: Tensor, emb: Tensor, extra: dict) -> list[Tensor]:
    """The frozen UNet's conv_in -> down blocks -> mid block on the clean pivot, with the HR step's `emb`."""
    h, feats = unet.conv_in(pivot), []
    for block in unet.down_blocks:
        kw = extra if getattr(block, "has_cross_attention", False) else {}
        h = block(hidden_states=h, temb=emb, **kw)[0]
        feats.append(h)
    kw = extra if getattr(unet.mid_block, "has_cross_attention", False) else {}
    feats.append(unet.mid_block(h, emb, **kw))
    return feats


def attach_upsamplers(net: CascadeNet, stage: int, pivot: Tensor, min_t: float = -1.0) -> list:
    """Hooks that add U_j(LR features of `pivot`) to the HR hidden states after down block j and the mid
    block. The LR pass runs inside the HR call (triggered by down block 0's pre-hook, which sees `temb`),
    with the hooks inactive; pivot repeated to the HR batch (classifier-free guidance doubles it). During sampling
    the model function sets `state["pivot"]` to the rows of the call (cond["pivot"]: an accelerator's sub-batch)."""
    unet, ups = net.unet, net.upsamplers[stage]
    state = {"feats": None, "emb": None, "busy": False, "extra": {}, "pivot": pivot}
    CROSS = ("encoder_hidden_states", "attention_mask", "cross_attention_kwargs", "encoder_attention_mask")

    def call(module, args, kwargs):  # the UNet's own conditioning, for the LR pass's cross-attention blocks
        if not state["busy"]:
            state["extra"] = {k: kwargs[k] for k in CROSS if kwargs.get(k) is not None}

    def start(module, args, kwargs):
        t_now = state.get("t")
        if state["busy"] or (t_now is not None and t_now < min_t):
            state["feats"] = None
            return
        emb, h = kwargs["temb"], kwargs.get("hidden_states", args[0] if args else None)
        extra, rows = state["extra"], state["pivot"]
        p = rows.repeat(h.shape[0] // rows.shape[0], 1, 1, 1)  # [pivot; pivot] under guidance's doubled batch
        state["busy"] = True
        try:
            with torch.no_grad():
                state["feats"] = lr_features(unet, p.to(h.dtype), emb, extra)
        finally:
            state["busy"] = False
        state["emb"] = emb

    def add(j):
        def hook(module, args, kwargs, out):
            if state["busy"] or state["feats"] is None:
                return None
            inject = ups[j](state["feats"][j], state["emb"])
            if isinstance(out, tuple):  # down block: (hidden, skips); skips stay the block's own tensors
                return (out[0] + inject, *out[1:])
            return out + inject
        return hook

    handles = [unet.register_forward_pre_hook(call, with_kwargs=True),
               unet.down_blocks[0].register_forward_pre_hook(start, with_kwargs=True)]
    blocks = list(unet.down_blocks) + [unet.mid_block]
    handles += [b.register_forward_hook(add(j), with_kwargs=True) for j, b in enumerate(blocks)]
    return handles, state


class SelfCascade(NoneMethod):
    """Pivot-guided re-schedule (tuning_free) and time-aware feature upsamplers (tuned)."""

    TUNED = Support(unets=ANY_UNET, why="the tuned upsamplers hook the UNet's down and mid blocks", edm=False,
                    why_edm="the upsamplers train with DDPM's eps loss on the VP grid and their branch is gated on the "
                            "VP timestep; use method.mode=tuning_free")

    @classmethod
    def declared(cls, config) -> Support:
        return cls.TUNED if config.get("mode", "tuned") == "tuned" else cls.supports

    def __init__(self, resolution: int,                # final target resolution
                 mode: str = "tuned",                  # tuned (train upsamplers) | tuning_free
                 strength: float = 0.7,                 # fraction of the N-step grid kept (official 0.7)
                 stages: int = 1,                       # doublings: 1 = 2x, 2 = 4x (base -> 2x -> 4x)
                 upsampler: str = "resblock",           # resblock (official) | light (ours, <= 0.01M)
                 pivot_source: str = "downsampled",     # downsampled: the training image's own low-res view |
                                                        # generated: a base sample (official), cached per seed
                 pivot_steps: int = 50,                 # generated pivots: DDIM steps at the base resolution
                 pivot_guidance: float | None = None,   # generated pivots, text models: CFG scale (None: pipeline's)
                 pivot_upsample: str = "bicubic",       # resize of the pivot in sample space
                 lr_branch_min_t: float = 100):         # LR features off for t < this (official 100 of 1000)
        super().__init__(resolution)
        if mode not in ("tuning_free", "tuned"):
            raise UsageError(f"method.mode={mode}: choose tuning_free or tuned")
        if not 0.0 <= strength <= 1.0:
            raise UsageError(f"method.strength={strength}: must lie in [0, 1]")
        if upsampler not in UPSAMPLERS:
            raise UsageError(f"method.upsampler={upsampler}: choose {' or '.join(UPSAMPLERS)}")
        if pivot_source not in ("downsampled", "generated"):
            raise UsageError(f"method.pivot_source={pivot_source}: choose downsampled or generated")
        if pivot_source == "generated" and stages != 1:
            raise UsageError(f"method.pivot_source=generated trains one doubling; with method.stages={stages} "
                             f"use pivot_source=downsampled")
        self.mode, self.strength, self.stages, self.upsampler = mode, strength, stages, upsampler
        self.pivot_source, self.pivot_steps, self.pivots = pivot_source, pivot_steps, {}
        self.pivot_guidance = pivot_guidance
        self.pivot_upsample, self.lr_branch_min_t = pivot_upsample, lr_branch_min_t
        self.trains = mode == "tuned"

    def wrap(self, base: BaseModel) -> nn.Module:
        self.base = base
        if self.resolution != base.resolution * 2 ** self.stages:
            raise UsageError(f"method.stages={self.stages} doubles {base.resolution} to "
                             f"{base.resolution * 2 ** self.stages}, not data.resolution={self.resolution}; "
                             f"set data.resolution={base.resolution * 2 ** self.stages} or change method.stages")
        if self.mode == "tuning_free":
            return base.unet.eval().requires_grad_(False)
        if base.parametrization == "edm":  # also reached without the support check (scripts, the Python API)
            raise UsageError(f"method.mode=tuned does not drive EDM-preconditioned networks ({self.TUNED.why_edm})")
        from diffusers import DDPMScheduler

        self.train_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        return CascadeNet(base.unet, self.upsampler, self.stages)

    def _unet(self, net: nn.Module) -> nn.Module:
        return net.unet if isinstance(net, CascadeNet) else net

    def sample(self, net: nn.Module, gens: list[torch.Generator], loop) -> Tensor:
        """Noise is drawn lazily in a fixed order per seed: base noise, then one eps per stage. Strength 1 draws
        only the final eps (= what `method=none` draws); strength 0 only the base noise (= `method=upsample`)."""
        unet, f = self._unet(net), self.base.latent_factor
        sizes = [self.base.resolution * 2 ** s // f for s in range(self.stages + 1)]
        shape = lambda s: (self.base.latent_channels, sizes[s], sizes[s])
        num_steps = loop.num_steps
        start = num_steps - int(num_steps * self.strength)
        if start == 0:  # strength 1: a pure-noise start; the pivot is never needed
            return self.base.decode(loop(model_fn(unet), sampling.noise(gens, shape(self.stages), unet.device)))
        # Every pass is conditioned at its own size (base x 2^s): the pivot as the base model samples at its size.
        x = loop.at(self.base.resolution)(model_fn(unet), sampling.noise(gens, shape(0), unet.device))
        for s in range(1, self.stages + 1):
            up = upscale(x, sizes[s], self.pivot_upsample)
            if start >= num_steps:  # strength 0: nothing to denoise
                x = up
                continue
            stage_loop = loop.at(self.base.resolution * 2 ** s)
            x = self._stage(net, s, x, up, sampling.noise(gens, shape(s), unet.device), stage_loop, start)
        return self.base.decode(x)

    def loop_steps(self, num_steps: int) -> list[int]:
        """The pivot's N steps, then each stage's last N - start (none at strength 0; one loop at strength 1)."""
        start = num_steps - int(num_steps * self.strength)
        if start == 0:
            return [num_steps]
        return [num_steps] + ([num_steps - start] * self.stages if start < num_steps else [])

    def _stage(self, net, s: int, pivot: Tensor, up: Tensor, eps: Tensor, loop, start: int) -> Tensor:
        unet = self._unet(net)
        if not isinstance(net, CascadeNet):
            return loop(model_fn(unet), up, start_step=start, renoise=eps)
        handles, state = attach_upsamplers(net, s - 1, pivot, self.lr_branch_min_t)
        plain = model_fn(unet)

        def fn(x: Tensor, t: Tensor, c: dict) -> Tensor:  # the pivot travels in cond: it follows sub-batches
            state["t"] = float(torch.as_tensor(t).flatten()[0])  # the VP timestep (tuned mode refuses EDM bases)
            state["pivot"] = c["pivot"]
            return plain(x, t, {k: v for k, v in c.items() if k != "pivot"})

        with hooks_removed_after(handles):
            return loop(fn, up, start_step=start, renoise=eps, cond={**(loop.cond or {}), "pivot": pivot})

    def loss(self, net: CascadeNet, batch: dict) -> dict[str, Tensor]:
        """eps-MSE at each stage's resolution, the pivot being the image's own exact lower-resolution view
        (`downsampled`) or a base-model sample for the same condition (`generated`)."""
        image, out = batch["image"], {}
        for s in range(1, self.stages + 1):
            side = self.base.resolution * 2 ** s
            target = resize(image, side)
            if self.pivot_source == "generated":
                pivot = self.generated_pivots(net.unet, batch)
            else:
                pivot = self.base.encode(resize(image, self.base.resolution * 2 ** (s - 1)))
            with hooks_removed_after(attach_upsamplers(net, s - 1, pivot)[0]):
                out[f"loss_stage{s}"] = denoising_loss(net.unet, self.train_scheduler, self.base.encode(target),
                                                       self.base.batch_condition(batch, size=side))
        out["loss"] = sum(out.values()) / self.stages
        return out

    @torch.no_grad()
    def generated_pivots(self, unet: nn.Module, batch: dict) -> Tensor:
        """The official code's pivot: a base-resolution sample (sample space) for the training image's condition,
        not aligned with the image. Seed = 2^31 + the image's dataset index (sampling.training_generators: never a
        sampling seed, so an evaluated pivot is never a training pivot), so the pivot is made once per image and
        kept (the official code samples a fresh one every step; caching makes the cost one base sample per
        training image). Frozen UNet, DDIM with `pivot_steps` steps; a text model's pivot is sampled from the image's
        own caption (never dropped) with classifier-free guidance, `pivot_guidance`."""
        from diffusers import DDIMScheduler

        index = batch["index"].tolist()
        todo = [i for i, k in enumerate(index) if k not in self.pivots]
        if todo:
            gens = sampling.training_generators([index[i] for i in todo])
            cond = rows(self.base.batch_condition(batch, dropout=False, guidance=self.pivot_guidance,
                                                  size=self.base.resolution),
                        torch.tensor(todo))
            size = self.base.resolution // self.base.latent_factor
            x = sampling.noise(gens, (self.base.latent_channels, size, size), unet.device)
            scheduler = DDIMScheduler.from_config(self.base.scheduler_config)
            x = sampling.sample(model_fn(unet), x, scheduler, self.pivot_steps, gens=gens, cond=cond)
            self.pivots.update({index[i]: p.cpu() for i, p in zip(todo, x)})
        return torch.stack([self.pivots[k] for k in index]).to(unet.device)
