"""Multi-scale sliced Wasserstein distance on Laplacian pyramids, weight-free (Karras et al. 2018,
ProGAN, appendix D; after Rabin et al. 2011), following progressive_growing_of_gans/metrics/sliced_wasserstein.py.

Per pyramid level: 128 random 7x7 neighbourhoods per image, normalised per set and channel, compared by
4 x 128 random projections; reported x 1e3 per level and averaged, as ProGAN reports it. Every draw is
seeded, so identical sets give exactly 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NHOOD = 7              # descriptor side (ProGAN nhood_size)
PER_IMAGE = 128        # descriptors per image and level (nhoods_per_image)
REPEATS, DIRS = 4, 128  # projection repeats x directions per repeat (dir_repeats, dirs_per_repeat)
MIN_RES = 16           # coarsest pyramid level (ProGAN stops at 16)

_K1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
GAUSS = torch.outer(_K1, _K1) / 256  # ProGAN's 5x5 binomial filter (= cv2.pyrDown)


def protocol() -> str:
    """The declared SWD protocol, for metrics.json."""
    return (f"ProGAN SWD: Laplacian pyramid (5x5 binomial, mirror padding) down to {MIN_RES}px; {PER_IMAGE} random "
            f"{NHOOD}x{NHOOD} descriptors per image and level, normalised per set and channel; larger set "
            f"subsampled to the smaller; {REPEATS}x{DIRS} random unit projections; x1e3, mean over levels")


def _blur(x: Tensor, scale: float = 1.0) -> Tensor:
    c = x.shape[1]
    k = (GAUSS * scale).to(x).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=c)  # reflect = scipy.ndimage "mirror"


def pyr_down(x: Tensor) -> Tensor:
    return _blur(x)[:, :, ::2, ::2]


def pyr_up(x: Tensor) -> Tensor:
    up = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3] * 2, dtype=x.dtype)
    up[:, :, ::2, ::2] = x
    return _blur(up, 4.0)


def resolutions(size: int) -> list[int]:
    """Pyramid levels, finest first: size, size/2, ... while >= MIN_RES (one level for smaller images)."""
    out = [size]
    while out[-1] // 2 >= MIN_RES and out[-1] % 2 == 0:
        out.append(out[-1] // 2)
    return out


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """float (N, C, H, W) -> band-pass levels, finest first; the last level is the low-pass residual."""
    pyramid = [x.float()]
    for _ in range(1, levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyr_up(pyramid[-1])
    return pyramid


def descriptors(images: Tensor, seed: int = 0, batch_size: int = 256) -> list[Tensor]:
    """uint8 (N, C, H, W) -> per level (N * PER_IMAGE, C, 7, 7) raw neighbourhoods at seeded positions."""
    levels = resolutions(images.shape[-1])
    out: list[list[Tensor]] = [[] for _ in levels]
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + lvl) for lvl in range(len(levels))]
    for i in range(0, len(images), batch_size):
        for lvl, (band, g) in enumerate(zip(laplacian_pyramid(images[i:i + batch_size].float(), len(levels)), gens)):
            out[lvl].append(_neighbourhoods(band, g))
    return [torch.cat(d) for d in out]


def _neighbourhoods(band: Tensor, g: torch.Generator) -> Tensor:
    n, _, h, w = band.shape
    r = NHOOD // 2
    ys = torch.randint(r, h - r, (n * PER_IMAGE,), generator=g)
    xs = torch.randint(r, w - r, (n * PER_IMAGE,), generator=g)
    patches = band.unfold(2, NHOOD, 1).unfold(3, NHOOD, 1)  # (n, C, h-6, w-6, 7, 7)
    img = torch.arange(n).repeat_interleave(PER_IMAGE)
    return patches[img, :, ys - r, xs - r]


def _normalise(d: Tensor) -> Tensor:
    """Per-set, per-channel zero mean and unit std over all descriptors and pixels (finalize_descriptors)."""
    d = d.double()
    d = d - d.mean(dim=(0, 2, 3), keepdim=True)
    return (d / d.std(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-12)).flatten(1)


def sliced_wasserstein(a: Tensor, b: Tensor, seed: int = 0) -> float:
    """Mean |sorted projection difference| over REPEATS x DIRS random unit directions (ProGAN)."""
    g = torch.Generator().manual_seed(seed)
    if len(a) != len(b):  # ProGAN compares equal counts: subsample the larger set, seeded
        m = min(len(a), len(b))
        a, b = (x[torch.randperm(len(x), generator=g)[:m]] if len(x) > m else x for x in (a, b))
    results = []
    for _ in range(REPEATS):
        dirs = torch.randn(a.shape[1], DIRS, generator=g, dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        pa, pb = np.sort((a @ dirs).numpy(), axis=0), np.sort((b @ dirs).numpy(), axis=0)  # numpy: 4x faster
        results.append(np.abs(pa - pb).mean())
    return float(np.mean(results))


def swd(desc_a: list[Tensor], desc_b: list[Tensor], seed: int = 0) -> tuple[float, list[float]]:
    """SWD x 1e3 per level (finest first) and their mean, from two sets' raw descriptors."""
    if len(desc_a) != len(desc_b):
        raise ValueError("SWD needs images of the same size in both sets")
    per_level = [1e3 * sliced_wasserstein(_normalise(a), _normalise(b), seed) for a, b in zip(desc_a, desc_b)]
    return sum(per_level) / len(per_level), per_level
