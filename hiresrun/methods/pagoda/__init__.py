"""method=pagoda: PaGoDA (Kim et al., NeurIPS 2024, arXiv 2405.14822); defaults as the official code, docs/pagoda.md.

Three stages of `hiresrun train`: `encode` integrates the frozen base's PF-ODE data -> noise on the base-resolution
view of every training image and caches the latents; `base` trains a one-step generator G (a copy of the base at
sigma_max) to reconstruct the image from its latent, plus a hinge GAN on fresh noise; `grow` appends upsampling
levels to G, freezes most of it and trains at 2x, 4x, ... Sampling is one evaluation: x = G(sigma_max eps).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun import sampling
from hiresrun.data import resize
from hiresrun.errors import UsageError
from hiresrun.methods import Method
from hiresrun.methods.pagoda.cache import LatentCache, encode_dataset, lookup
from hiresrun.methods.pagoda.nets import Discriminator, Generator, diff_augment, freeze_for_growing
from hiresrun.methods.pagoda.ode import ddim_invert, heun, heun_invert, karras_sigmas, view_of
from hiresrun.models import BaseModel
from hiresrun.support import Support

STAGES, SOLVERS, REC_LOSSES = ("encode", "base", "grow"), ("heun", "ddim_inverse"), ("lpips_alex", "lpips_vgg",
                                                                                      "l2_pyramid")


class PagodaNet(nn.Module):
    """What Lightning trains and checkpoints: the generator and the discriminator."""

    def __init__(self, gen: Generator, disc: Discriminator):
        super().__init__()
        self.gen, self.disc = gen, disc

    @property
    def device(self) -> torch.device:
        return self.gen.unet.device


class PaGoDA(Method):
    """Frozen base as PF-ODE encoder, one-step decoder trained with L_rec + adaptive hinge GAN, progressive growing."""

    trains = True
    supports = Support(spaces=("pixel",), unets=("UNet2DModel",), one_step=True, text=False,
                       why="G grows through UNet2DModel's positional up-block call; L_rec is LPIPS in sample space",
                       why_text="its one-step generator and discriminator take no text embeddings, and the encoder "
                                "integrates the unguided ODE")

    def __init__(self, resolution: int,                  # target resolution of stage=grow (2x, 4x the base)
                 stage: str = "base",                    # encode | base | grow
                 sigma_max: float = 80.0,                # VE noise level of the latent and of G's input
                 inv_solver: str = "heun",               # heun (official, Karras grid) | ddim_inverse (paper's words)
                 inv_steps: int = 40,                    # Karras points (78 NFE) or DDIM steps
                 flips: tuple = (0, 1),                  # official flip doubling; [0] for digits
                 encode_chunk: int = 64,                 # images per cache file (the resume granularity)
                 cache_dir: str = ".cache/hiresrun",     # latents under <cache_dir>/pagoda/<key>/
                 cache_tag: str = "",                    # part of the cache key: set when the data changes
                 g_output: str = "auto",                 # auto: x0 for eps/v bases, raw for x0/EDM | raw | x0
                 rec_loss: str = "lpips_alex",           # lpips_alex | lpips_vgg | l2_pyramid (official: cnn_vit)
                 pixel_weight: float = 1.0,              # L2 term added to the LPIPS term
                 adv_weight: float = 0.2,                # discriminator_weight (stage 2: 0.2; growing: 1.0)
                 adaptive: bool = True,                  # VQGAN adaptive weight, clamped to [0.01, 10]
                 distill_weight: float = 0.0,            # paper's L_dstl vs a teacher sample (not in official code)
                 distill_steps: int = 10,                # Karras points of the teacher sample for L_dstl
                 activate_frac: float = 0.4375,          # grow: last 7/16 of the decoder trains (activate_from=9)
                 previous: str | None = None,            # grow: the previous stage's run folder or .ckpt
                 g_lr: float = 8.0e-6,                   # official (an implicit default)
                 d_lr: float = 2.0e-3,
                 d_width: int = 32):                     # discriminator's first conv width
        for name, value, options in (("stage", stage, STAGES), ("inv_solver", inv_solver, SOLVERS),
                                     ("rec_loss", rec_loss, REC_LOSSES), ("g_output", g_output, ("auto", "raw", "x0"))):
            if value not in options:
                raise UsageError(f"method.{name}={value}: choose {' | '.join(options)}")
        if not set(flips) <= {0, 1} or not flips:
            raise UsageError(f"method.flips={list(flips)}: a non-empty subset of [0, 1] (1 = mirrored)")
        self.resolution, self.stage, self.sigma_max, self.inv_solver, self.inv_steps = (resolution, stage, sigma_max,
                                                                                         inv_solver, inv_steps)
        self.flips, self.encode_chunk, self.cache_dir, self.cache_tag = list(flips), encode_chunk, cache_dir, cache_tag
        self.g_output, self.rec_loss, self.pixel_weight, self.adv_weight = g_output, rec_loss, pixel_weight, adv_weight
        self.adaptive, self.distill_weight, self.distill_steps = adaptive, distill_weight, distill_steps
        self.activate_frac, self.previous, self.g_lr, self.d_lr, self.d_width = (activate_frac, previous, g_lr,
                                                                                 d_lr, d_width)
        self._latents, self._lpips = None, None

    # -- stage encode ---------------------------------------------------------------------------------------
    def cache(self, base: BaseModel) -> LatentCache:
        return LatentCache(self.cache_dir, {"weights_sha256": base.weights_hash, "solver": self.inv_solver,
                                            "steps": self.inv_steps, "sigma_max": self.sigma_max,
                                            "base_resolution": base.resolution, "tag": self.cache_tag})

    def encoder(self, base: BaseModel):
        """(base view in [-1, 1], labels) -> z in VE scale, with the frozen base."""
        view, unet = view_of(base.scheduler_config), base.unet.eval().requires_grad_(False)
        if view.kind == "edm" and self.inv_solver != "heun":
            raise UsageError(f"method.inv_solver={self.inv_solver} integrates a VP model's DDIM grid; an EDM base "
                             f"(model.parametrization=edm) is inverted with method.inv_solver=heun")

        def encode(x: Tensor, labels: Tensor) -> Tensor:
            x0, cond = base.encode(x.to(unet.device)), base.batch_condition({"label": labels.to(unet.device)})
            if self.inv_solver == "heun":
                return heun_invert(view, unet, x0, self.inv_steps, self.sigma_max, cond)
            return ddim_invert(view, unet, x0, self.inv_steps, self.sigma_max, base.scheduler_config, cond)

        return encode

    def precompute(self, base: BaseModel, data, run_dir: Path) -> bool:
        """stage=encode is all of `hiresrun train`: encode the training set (resumable) and stop."""
        if self.stage != "encode":
            return False
        from hiresrun import outputs

        data.setup("fit")
        stats = encode_dataset(self.encoder(base), data.train_set, self.cache(base), self.flips, self.encode_chunk)
        outputs.write_metrics(Path(run_dir), "train", {"stage": "encode", **stats})
        print(f"hiresrun: pagoda encode: {stats['encoded']} latents computed, {stats['reused']} reused "
              f"-> {stats['cache']}")
        return True

    # -- the networks ---------------------------------------------------------------------------------------
    def wrap(self, base: BaseModel) -> nn.Module:
        self.base, self.view = base, view_of(base.scheduler_config)
        self.teacher = base.unet.eval().requires_grad_(False)
        levels = 0
        if self.stage == "grow":
            ratio = self.resolution / base.resolution
            levels = round(math.log2(ratio)) if ratio > 1 else 0
            if levels < 1 or base.resolution * 2 ** levels != self.resolution:
                raise UsageError(f"method.resolution={self.resolution}: stage=grow needs a power-of-two multiple of "
                                 f"the base's {base.resolution} (e.g. {base.resolution * 2})")
            if not self.previous:
                raise UsageError("method.stage=grow needs method.previous=<run folder or .ckpt of the previous "
                                 "stage (stage=base, or a smaller grow)>")
        self.levels = levels
        self.resolution = base.resolution * 2 ** levels
        gen = Generator(copy.deepcopy(base.unet).train().requires_grad_(True), base.scheduler_config,
                        self.sigma_max, levels, self.generator_output(self.view.kind))
        if self.stage == "grow":
            from hiresrun.methods.pagoda.grow import load_previous

            load_previous(gen, self.previous, base.weights_hash)
            freeze_for_growing(gen, self.activate_frac)
        disc = Discriminator(base.unet.config.in_channels, self.resolution // base.latent_factor, self.d_width)
        return PagodaNet(gen, disc)

    def generator_output(self, kind: str) -> str:
        """method.g_output, or (auto) what makes G's initial output image-like: the raw network output predicts
        noise for an eps base and -x0-ish for a v base at sigma_max, so those start from the base's own D(z)."""
        if self.g_output != "auto":
            return self.g_output
        return "x0" if kind in ("epsilon", "v_prediction") else "raw"

    manual_optimization = True  # G and D take turns (`training_step`)

    def optimizers(self, net: PagodaNet, factory) -> list:
        """Two optimisers (the configured class): G at g_lr over its trainable part, D at d_lr."""
        return [factory([p for p in net.gen.parameters() if p.requires_grad], lr=self.g_lr),
                factory(net.disc.parameters(), lr=self.d_lr)]

    # -- training -------------------------------------------------------------------------------------------
    def training_step(self, lit, batch: dict) -> dict[str, Tensor]:
        """Manual optimisation: even steps update G, odd steps D (as the official code; steps count both)."""
        g_opt, d_opt = lit.optimizers()
        if lit.global_step % 2 == 0:
            out, opt, key = self.loss(lit.net, batch), g_opt, "loss"
        else:
            out, opt, key = {"loss_d": self.discriminator_loss(lit.net, batch)}, d_opt, "loss_d"
        opt.zero_grad()
        lit.manual_backward(out[key])
        opt.step()
        return out

    def _real(self, batch: dict, flip: Tensor) -> Tensor:
        """The real image at G's resolution (the base view at stage base), mirrored where flip = 1, sample space."""
        real = batch["base"] if self.levels == 0 else resize(batch["image"], self.resolution)
        real = torch.where(flip.to(real.device)[:, None, None, None].bool(), real.flip(-1), real)
        return self.base.encode(real)

    def _noise(self, batch: dict) -> Tensor:
        """sigma_max eps at the base latent size: the PF-ODE prior G maps from."""
        size = self.base.resolution // self.base.latent_factor
        C, B = self.base.unet.config.in_channels, batch["base"].shape[0]
        return self.sigma_max * torch.randn(B, C, size, size, device=batch["base"].device)

    def latents(self) -> dict:
        if self._latents is None:
            self._latents = self.cache(self.base).load()
            if not self._latents:
                raise UsageError(f"no encoded latents in {self.cache(self.base).folder}: run `hiresrun train "
                                 f"+method=pagoda method.stage=encode` (same model and method.inv_*) first")
        return self._latents

    def loss(self, net: PagodaNet, batch: dict) -> dict[str, Tensor]:
        """G's loss: L_rec(G(z_inv(x)), x) + adv_weight * w * L_G(G(sigma_max eps)) [+ distill_weight * L_dstl]."""
        B = batch["base"].shape[0]
        flip = torch.tensor(self.flips)[torch.randint(len(self.flips), (B,))]
        z = lookup(self.latents(), batch["index"], flip, batch["base"])
        cond = self.base.batch_condition(batch)
        rec = self.reconstruction(net.gen(z, cond), self._real(batch, flip))
        noise = self._noise(batch)
        fake = net.gen(noise, cond)
        adv = -net.disc(diff_augment(fake)).mean()
        w = self.adaptive_weight(rec, adv, net.gen.unet.conv_out.weight)
        out = {"rec": rec, "adv": adv, "w": w, "loss": rec + self.adv_weight * w * adv}
        if self.distill_weight > 0:
            out["distill"] = F.mse_loss(resize(fake, self.base.resolution // self.base.latent_factor),
                                        self.teacher_sample(noise, cond))
            out["loss"] = out["loss"] + self.distill_weight * out["distill"]
        return out

    def discriminator_loss(self, net: PagodaNet, batch: dict) -> Tensor:
        """Hinge: ReLU(1 - D(real)) + ReLU(1 + D(G(sigma_max eps))), both through DiffAugment."""
        flip = torch.tensor(self.flips)[torch.randint(len(self.flips), (batch["base"].shape[0],))]
        with torch.no_grad():
            fake = net.gen(self._noise(batch), self.base.batch_condition(batch))
        real = self._real(batch, flip)
        return F.relu(1 - net.disc(diff_augment(real))).mean() + F.relu(1 + net.disc(diff_augment(fake))).mean()

    def adaptive_weight(self, rec: Tensor, adv: Tensor, layer: Tensor) -> Tensor:
        """VQGAN (Esser et al. 2021, eq. 7): ||grad_W L_rec|| / (||grad_W L_G|| + 1e-4), clamped to [0.01, 10]."""
        if not self.adaptive:
            return torch.ones((), device=rec.device)
        g_rec = torch.autograd.grad(rec, layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv, layer, retain_graph=True)[0]
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.01, 10.0).detach()

    def reconstruction(self, x: Tensor, real: Tensor) -> Tensor:
        """d(x, real) under one shared DiffAugment: LPIPS (shipped weights) + pixel_weight * L2, or L2 + a
        multi-scale L1 pyramid (l2_pyramid). Official: frozen DeiT + EfficientNet features (downloads)."""
        x, real = diff_augment(torch.cat([x, real], 1)).split(x.shape[1], 1)
        l2 = F.mse_loss(x, real)
        if self.rec_loss == "l2_pyramid":
            l1, a, b = 0.0, x, real
            while a.shape[-1] >= 4:
                l1, a, b = l1 + F.l1_loss(a, b), F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
            return l2 + l1
        return self.lpips(x, real).mean() + self.pixel_weight * l2

    def lpips(self, x: Tensor, y: Tensor) -> Tensor:
        """Differentiable LPIPS v0.1 on float images in [-1, 1] (greyscale repeated, >= 32 px)."""
        if self._lpips is None:
            from hiresrun.metrics.lpips import LPIPS

            self._lpips = LPIPS(self.rec_loss.split("_")[1], cache_dir=self.cache_dir, download=False)
        model = self._lpips.model.to(x.device)
        rgb = lambda v: v.repeat(1, 3, 1, 1) if v.shape[1] == 1 else v[:, :3]
        size = max(32, x.shape[-1])
        up = lambda v: F.interpolate(rgb(v), size=(size, size), mode="bilinear", align_corners=False)
        return model(up(x), up(y)).flatten()

    @torch.no_grad()
    def teacher_sample(self, noise: Tensor, cond: dict) -> Tensor:
        """The base's Heun sample from sigma_max eps over `distill_steps` Karras points (the target of L_dstl)."""
        sigmas = karras_sigmas(self.distill_steps, sigma_max=self.sigma_max)[:-1]
        teacher = self.teacher.to(noise.device)
        return heun(lambda x, s: self.view.denoise(teacher, x, s, cond), noise, sigmas)

    # -- sampling: one evaluation -------------------------------------------------------------------------------
    def loop_steps(self, num_steps: int) -> list[int]:
        return []  # one generator evaluation, no sampling loop

    @torch.no_grad()
    def sample(self, net: PagodaNet, gens: list[torch.Generator], loop) -> Tensor:
        """x = G(sigma_max eps) at the grown resolution, NFE 1; `loop` only lends its counting wrapper."""
        size = self.base.resolution // self.base.latent_factor
        z = self.sigma_max * sampling.noise(gens, (self.base.unet.config.in_channels, size, size), net.device)
        t = torch.tensor(self.view.t(self.sigma_max))
        f = loop.wrap(lambda x, t_, c: net.gen(x, c), sampling.Step(timesteps=t[None], order=1))
        x = f(z, t, loop.cond or {})
        return self.base.decode(x.clamp(-1, 1) if self.base.vae is None else x)
