"""PaGoDA's networks: the one-step generator (a copy of the base UNet at sigma_max, grown by appended upsampling
levels), its freezing rule, and a small conv discriminator with DiffAugment."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun.methods.pagoda.ode import view_of


def grow_level(C: int, E: int, groups: int) -> nn.ModuleList:
    """One new resolution: ResBlock(up=True) + 2 ResBlocks at width C, diffusers `ResnetBlock2D`;
    output convs zero-initialised (ADM's zero_module), so a new level starts as nearest 2x upsampling."""
    from diffusers.models.resnet import ResnetBlock2D

    blocks = nn.ModuleList(ResnetBlock2D(in_channels=C, out_channels=C, temb_channels=E, groups=groups, up=up)
                           for up in (True, False, False))
    for b in blocks:
        nn.init.zeros_(b.conv2.weight)
        nn.init.zeros_(b.conv2.bias)
    return blocks


class Generator(nn.Module):
    """G(z) = UNet(c_in(sigma_max) z, t(sigma_max)), grown by `levels` doublings applied to the output of
    the last up block (before conv_norm_out, which is reused). g_output=x0 returns the base's own denoised image
    D(z; sigma_max) (VP: up(z) - sigma_max eps_hat; EDM: c_skip up(z) + c_out F); raw returns the network output,
    image-like only for x0-predicting and EDM bases (for EDM, F ~ D / sigma_data at sigma_max: the official choice).
    `PaGoDA` picks x0 for eps and v bases and raw otherwise unless method.g_output says."""

    def __init__(self, unet: nn.Module, scheduler_config: dict, sigma_max: float = 80.0, levels: int = 0,
                 g_output: str = "raw"):
        super().__init__()
        self.unet, self.sigma_max, self.g_output = unet, sigma_max, g_output
        self.view = view_of(scheduler_config)
        C, E = unet.config.block_out_channels[0], unet.time_embedding.linear_2.out_features
        self.levels = nn.ModuleList(grow_level(C, E, unet.config.norm_num_groups) for _ in range(levels))
        unet.up_blocks[-1].register_forward_hook(self._grow)  # a bound method: deep copies (EMA) follow it

    def _grow(self, module, args, out):
        emb = args[2]  # UNet2DModel calls up blocks as (hidden, res_samples, emb)
        for level in self.levels:
            for block in level:
                out = block(out, emb)
        return out

    def forward(self, z: Tensor, cond: dict | None = None) -> Tensor:
        sigma = self.sigma_max
        t = torch.full((z.shape[0],), self.view.t(sigma), device=z.device, dtype=torch.float32)
        out = self.unet(self.view.c_in(sigma) * z, t, **(cond or {})).sample
        if self.g_output == "raw":
            return out
        up = lambda v: F.interpolate(v, size=out.shape[-2:], mode="nearest") if v.shape[-1] != out.shape[-1] else v
        return self.view.x0(out, up(z), sigma)


def up_path_units(unet: nn.Module) -> list[list[nn.Module]]:
    """The decoder as ADM output blocks: one unit per up-block resnet (with its attention; the block's upsampler
    joins its last unit), in forward order."""
    units = []
    for block in unet.up_blocks:
        n = len(block.resnets)
        for j in range(n):
            unit = [block.resnets[j]] + ([block.attentions[j]] if getattr(block, "attentions", None) else [])
            units.append(unit + (list(block.upsamplers) if j == n - 1 and block.upsamplers else []))
    return units


def freeze_for_growing(gen: Generator, activate_frac: float) -> None:
    """progressive=True: only the last round(activate_frac * units) decoder units (ADM activate_from=9
    of 16 = 7/16), the new levels and the out layers (conv_norm_out, conv_out) train."""
    gen.requires_grad_(False)
    units = up_path_units(gen.unet)
    for unit in units[len(units) - round(activate_frac * len(units)):]:
        for m in unit:
            m.requires_grad_(True)
    for m in (gen.levels, gen.unet.conv_norm_out, gen.unet.conv_out):
        m.requires_grad_(True)


class Discriminator(nn.Module):
    """Small conv hinge discriminator from random init (ours; the official one is Projected-GAN on frozen
    DeiT + EfficientNet): strided 4x4 convs down to <= 4 px, a 1x1 logit map, averaged per image."""

    def __init__(self, channels: int, resolution: int, width: int = 32):
        super().__init__()
        layers, C, size = [], channels, resolution
        while size > 4:
            W = min(width * 2 ** (len(layers) // 2), 256)
            layers += [nn.Conv2d(C, W, 4, 2, 1), nn.LeakyReLU(0.2)]
            C, size = W, size // 2
        self.body = nn.Sequential(*layers, nn.Conv2d(C, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).mean((1, 2, 3))


def diff_augment(x: Tensor, translation: float = 0.125, cutout: float = 0.2) -> Tensor:
    """DiffAugment (Zhao et al. 2020) translation (zero padded, shift <= `translation` of the size) and cutout
    (one square of `cutout` of the size), differentiable, per-sample parameters from the global RNG."""
    B, _, H, W = x.shape
    sh, sw = int(H * translation + 0.5), int(W * translation + 0.5)
    if sh or sw:
        dy = torch.randint(-sh, sh + 1, (B,)).tolist()
        dx = torch.randint(-sw, sw + 1, (B,)).tolist()
        x = torch.stack([torch.roll(F.pad(v, (sw, sw, sh, sh)), (a, b), (1, 2))[:, sh:sh + H, sw:sw + W]
                         for v, a, b in zip(x, dy, dx)])
    ch, cw = int(H * cutout + 0.5), int(W * cutout + 0.5)
    if ch and cw:
        cy, cx = torch.randint(0, H + 1 - ch, (B,)), torch.randint(0, W + 1 - cw, (B,))
        ys, xs = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
        hole = ((ys >= cy[:, None, None]) & (ys < cy[:, None, None] + ch)
                & (xs >= cx[:, None, None]) & (xs < cx[:, None, None] + cw))
        x = x * (~hole).to(x)[:, None]
    return x
