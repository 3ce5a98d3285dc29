"""Quality metrics against the real data at the target resolution (`metrics=default`; docs/metrics.md).

`Metrics(...)` is built from conf/metrics/default.yaml; `Metrics.evaluate(images, real, reference, seeds)`
returns flat numbers (fid, kid, kid_std, patch_fid, swd, digit_acc, digit_conf, fd_digits, and with a
reference run lpips_to_ref, psnr_to_ref, ssim_to_ref) plus a `protocol` dict. Features are computed once
per image set; the real set's are cached by key (reference.py).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hiresrun.errors import UsageError
from hiresrun.metrics import digits as digit_metrics
from hiresrun.metrics import swd as swd_metric
from hiresrun.metrics.fid import RESIZE, InceptionPool3, crop_scheme, fid_floor, frechet_distance, kid, random_crops
from hiresrun.metrics.generated import FeatureCache
from hiresrun.metrics.reference import Cache, RealSet, folder_for, load_folder, real_set
from hiresrun.outputs import package_versions

LIBRARIES = ("torch", "torchvision", "clean-fid", "torchmetrics", "lpips", "scipy", "numpy", "pillow")


def _versions() -> dict:
    return package_versions(LIBRARIES)


class _Lazy:
    """The real images, read at most once and only when some cached feature is missing."""

    def __init__(self, real: RealSet, idx: Tensor):
        self.real, self.idx, self.images = real, idx, None

    def __call__(self) -> Tensor:
        if self.images is None:
            self.images = self.real.load(self.idx)
        return self.images


class Metrics:
    """Every quality number of a sample run, from features computed once per image set (docs/ARCHITECTURE.md, "Data
    flow" 6)."""

    def __init__(self, fid: bool = True,                  # FID (Heusel et al. 2017), clean-fid preprocessing
                 kid: bool = True,                        # KID (Binkowski et al. 2018), torchmetrics' subsets
                 patch_fid: bool = True,                  # FID on fixed random native-resolution crops
                 swd: bool = True,                        # ProGAN multi-scale sliced Wasserstein (weight-free)
                 digits: bool | None = None,              # digit_acc/conf, fd_digits; null = only on the embedded MNIST
                 num_reference: int | None = None,        # real images (seeded subset); null = the whole real set
                 kid_subsets: int = 100,
                 kid_subset_size: int = 1000,             # clipped to the smaller set
                 patch_size: int | None = None,           # crop side in px; null = half the image side
                 patches_per_image: int = 1,
                 digit_threshold: float = 0.9,            # digit_acc: top softmax probability >= this
                 digit_classifier: str | None = None,     # weights file; null = the shipped one
                 lpips_net: str = "alex",                 # alex | vgg (lpips_to_ref)
                 seed: int = 0,                           # crops, KID subsets, SWD positions and projections
                 batch_size: int = 32,
                 inception_path: str | None = None,       # explicit Inception TorchScript; null = the shipped one
                 inception_sha256: str | None = None,     # the sha256 you checked for inception_path
                 lpips_path: str | None = None,           # explicit LPIPS trunk; null = search
                 download: bool = True,                   # LPIPS trunks: last resort when none is found offline
                 cache_dir: str = ".cache/hiresrun",      # project-private: reference features, bridged weights
                 device: str = "auto",                    # auto = cuda when available
                 clip_model: str | None = "openai/clip-vit-large-patch14"):  # text runs: clip_score's CLIP
                                                          # (local folder or HF cache only); null = no clip_score
        self.fid, self.kid, self.patch_fid, self.swd, self.digits = fid, kid, patch_fid, swd, digits
        for key, value, least in (("num_reference", num_reference, 2), ("kid_subsets", kid_subsets, 1),
                                  ("kid_subset_size", kid_subset_size, 2), ("patch_size", patch_size, 1),
                                  ("patches_per_image", patches_per_image, 1), ("batch_size", batch_size, 1)):
            if value is not None and value < least:  # FID/KID need two images a set; the rest one of each
                raise UsageError(f"metrics.{key}={value}: must be at least {least}")
        if not 0 <= digit_threshold <= 1:
            raise UsageError(f"metrics.digit_threshold={digit_threshold}: a probability, in [0, 1]")
        self.num_reference, self.kid_subsets, self.kid_subset_size = num_reference, kid_subsets, kid_subset_size
        self.patch_size, self.patches_per_image, self.seed = patch_size, patches_per_image, seed
        self.digit_threshold, self.digit_classifier, self.lpips_net = digit_threshold, digit_classifier, lpips_net
        self.batch_size, self.inception_path, self.lpips_path = batch_size, inception_path, lpips_path
        self.inception_sha256 = inception_sha256
        self.download, self.cache_dir, self.clip_model = download, cache_dir, clip_model
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.cache = Cache(cache_dir)

    def check_weights(self, lpips: bool = False) -> None:
        """Refuse before any work when the weights these metrics need are not on this machine: the pinned Inception
        file (FID/KID/patch-FID) and, with a reference run, the LPIPS trunk (unless it may still be downloaded)."""
        from hiresrun.metrics import weights

        if self.fid or self.kid or self.patch_fid:
            weights.inception_path(self.inception_path, self.inception_sha256)
        if lpips:
            try:
                weights.lpips_trunk_path(self.lpips_net, self.lpips_path, self.cache_dir, download_ok=False)
            except UsageError:
                if not self.download:
                    raise

    @cached_property
    def inception(self) -> InceptionPool3:
        return InceptionPool3(self.inception_path, self.inception_sha256, self.device)

    @cached_property
    def classifier(self) -> tuple:
        return digit_metrics.load_classifier(self.digit_classifier)

    @cached_property
    def lpips(self):
        from hiresrun.metrics.lpips import LPIPS

        return LPIPS(self.lpips_net, self.lpips_path, self.cache_dir, self.download).to(self.device)

    # -- reference features (cached) ---------------------------------------------------------------------
    def _inception_key(self) -> dict:
        return {"extractor": InceptionPool3.name, "weights_sha256": self.inception.sha256, "resize": RESIZE}

    def ref_inception(self, real: RealSet, n: int, load) -> tuple[np.ndarray, str]:
        arrays, h = self.cache.get(real, n, "inception", self._inception_key(),
                                   lambda: {"features": self.inception.features(
                                       load(), self.batch_size, label=f"real-set Inception features ({real.name})")})
        return arrays["features"], h

    def _crops(self, images: Tensor, ids: list[int] | None) -> Tensor:
        size = self.patch_size or images.shape[-1] // 2
        return random_crops(images, size, self.patches_per_image, self.seed, ids)

    def _crop_scheme(self, resolution: int) -> str:
        return crop_scheme(self.patch_size or resolution // 2, self.patches_per_image, self.seed)

    def ref_patch(self, real: RealSet, n: int, load) -> tuple[np.ndarray, str]:
        key = {**self._inception_key(), "crops": self._crop_scheme(real.resolution)}
        compute = lambda: {"features": self.inception.features(self._crops(load(), None), self.batch_size,
                                                               label=f"real-set patch features ({real.name})",
                                                               unit="crops")}
        arrays, h = self.cache.get(real, n, "patch", key, compute)
        return arrays["features"], h

    def ref_swd(self, real: RealSet, n: int, load) -> tuple[list[Tensor], str]:
        compute = lambda: {f"level{i}": d.numpy() for i, d in enumerate(swd_metric.descriptors(load(), self.seed))}
        arrays, h = self.cache.get(real, n, "swd", {"protocol": swd_metric.protocol(), "seed": self.seed}, compute)
        return [torch.from_numpy(arrays[f"level{i}"]) for i in range(len(arrays))], h

    def ref_digits(self, real: RealSet, n: int, load) -> tuple[dict, str]:
        net, weights = self.classifier
        compute = lambda: dict(zip(("probs", "features"), digit_metrics.classify(net, load())))
        return self.cache.get(real, n, "digits", {"classifier_sha256": weights}, compute)

    def _uses_digits(self, real: RealSet) -> bool:
        return self.digits if self.digits is not None else real.mnist

    # -- the numbers -------------------------------------------------------------------------------------
    def evaluate(self, images: Tensor, real, reference: str | Path | None = None,
                 seeds: list[int] | None = None, prompts: list[str] | None = None,
                 labels: list[int] | None = None, cache: FeatureCache | None = None) -> dict:
        """uint8 (N, C, H, W) samples -> flat metrics + `protocol`. `real`: a datamodule, image folder,
        cached-statistics folder or RealSet; `reference`: a run folder with samples/<seed>.png for `seeds`;
        `prompts`: each image's prompt (text models), for clip_score and, on the embedded MNIST, prompt_acc (the
        digit each prompt names); `labels`: each image's requested class (class models), for class_acc there;
        `cache`: where each image's Inception rows are kept (metrics/generated.py), else they are computed here."""
        real = real_set(real, images.shape[-1], images.shape[1])
        _check(images, real)
        idx = real.subset(self.num_reference)
        n, load, ids = len(idx), _Lazy(real, idx), (list(map(int, seeds)) if seeds is not None else None)
        out, proto = {}, self._protocol(images, real, n, ids)
        gen = self.generated_features(images, ids, cache)
        self._inception_metrics(gen.get("inception"), real, n, load, out, proto)
        self._patch_metrics(gen.get("patch"), real, n, load, out, proto)
        self._swd_metrics(images, real, n, load, out, proto)
        if cache is not None and gen:
            proto["generated_features"] = cache.summary()
        self._digit_metrics(images, real, n, load, ids, out, proto, labels, prompts)
        if reference is not None:
            self._fidelity(images, reference, ids, out, proto)
        if prompts is not None and self.clip_model:
            self._clip(images, prompts, out, proto)
        return {**out, "protocol": proto}

    def fidelity(self, images: Tensor, reference: str | Path, seeds: list[int]) -> dict:
        """LPIPS / PSNR / SSIM to a reference run alone (reference= without metrics=default), with `protocol`."""
        out, proto = {}, {}
        self._fidelity(images, reference, list(map(int, seeds)), out, proto)
        return {**out, "protocol": proto}

    def _clip(self, images, prompts, out, proto) -> None:
        from hiresrun.metrics import clip
        from hiresrun.metrics.weights import sha256

        folder = clip.resolve(self.clip_model)
        if folder is None:
            print(clip.missing_line(self.clip_model))
            proto["clip_score"] = f"skipped: no local weights for {self.clip_model}"
            return
        out["clip_score"] = clip.clip_score(images, prompts, folder, self.batch_size, self.device)
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        proto["clip_score"] = {"model": self.clip_model, "folder": str(folder),
                               "weights_sha256": sha256(weights[0]) if weights else None,
                               "definition": "torchmetrics CLIPScore: max(100 * mean over images of cos, 0), "
                                             "CLIP processor resize to the model's input size"}

    # -- features of the generated images (computed once per image when a cache is given) ----------------
    def generated_features(self, images: Tensor, ids: list[int] | None, cache: FeatureCache | None = None) -> dict:
        """{"inception": (N, 2048), "patch": (N * patches_per_image, 2048)} for the enabled metrics. The compute
        functions take the indices of the images still missing from `cache`, or None for all of them."""
        out, d = {}, InceptionPool3.num_features
        pick = lambda xs, idx: xs if idx is None else (xs[idx] if isinstance(xs, Tensor) else [xs[i] for i in idx])
        whole = lambda idx: self.inception.features(pick(images, idx), self.batch_size,
                                                    label="generated-image Inception features")
        if self.fid or self.kid:
            out["inception"] = whole(None) if cache is None else cache.rows(
                "inception", self._inception_key(), (d,), whole)
        if self.patch_fid:
            key, p = {**self._inception_key(), "crops": self._crop_scheme(images.shape[-1])}, self.patches_per_image
            crops = lambda idx: self.inception.features(
                self._crops(pick(images, idx), None if ids is None else pick(ids, idx)), self.batch_size,
                label="generated-image patch features", unit="crops")
            out["patch"] = crops(None) if cache is None or ids is None else cache.rows(
                "patch", key, (p, d), crops).reshape(-1, d)
        return out

    def _inception_metrics(self, gen, real, n, load, out, proto) -> None:
        if gen is None:
            return
        ref, proto["reference_stats_sha256"]["inception"] = self.ref_inception(real, n, load)
        if self.fid:
            out["fid"] = frechet_distance(gen, ref)
            if (floor := fid_floor(ref, len(gen), self.seed)) is not None:
                out["fid_floor"] = floor
        if self.kid:
            out["kid"], out["kid_std"] = kid(ref, gen, self.kid_subsets, self.kid_subset_size, self.seed)

    def _patch_metrics(self, gen, real, n, load, out, proto) -> None:
        if gen is None:
            return
        ref, proto["reference_stats_sha256"]["patch"] = self.ref_patch(real, n, load)
        out["patch_fid"] = frechet_distance(gen, ref)

    def _swd_metrics(self, images, real, n, load, out, proto) -> None:
        if not self.swd:
            return
        ref, proto["reference_stats_sha256"]["swd"] = self.ref_swd(real, n, load)
        out["swd"], levels = swd_metric.swd(ref, swd_metric.descriptors(images, self.seed), self.seed)
        out.update({f"swd_{r}px": v for r, v in zip(swd_metric.resolutions(images.shape[-1]), levels)})

    def _digit_metrics(self, images, real, n, load, ids, out, proto, labels=None, prompts=None) -> None:
        if not self._uses_digits(real):
            return
        probs, feats = digit_metrics.classify(self.classifier[0], images)
        if labels is not None:  # class-conditional digits: does the image show the digit it was sampled for?
            out["class_acc"] = digit_metrics.class_acc(probs, labels)
        if prompts is not None:  # prompted digits: does the image show the digit its prompt asks for?
            from hiresrun.digits_text import requested_digit

            asked = [requested_digit(p) for p in prompts]
            if all(d is not None for d in asked):
                out["prompt_acc"] = digit_metrics.class_acc(probs, asked)
            else:
                proto["prompt_acc"] = (f"skipped: {sum(d is None for d in asked)} of {len(asked)} prompts name no "
                                       f"single digit (zero-nine or 0-9)")
        ref, proto["reference_stats_sha256"]["digits"] = self.ref_digits(real, n, load)
        out.update(digit_metrics.scores(probs, self.digit_threshold))
        out["fd_digits"] = frechet_distance(feats, ref["features"])
        proto["digits"]["digit_acc_real"] = digit_metrics.scores(ref["probs"], self.digit_threshold)["digit_acc"]

    def _fidelity(self, images, reference, ids, out, proto) -> None:
        from hiresrun.metrics.lpips import fidelity, load_reference_run

        if ids is None:
            raise UsageError("reference=<run dir> needs the samples' seeds to pair images; give seeds")
        out.update(fidelity(images, load_reference_run(reference, ids), self.lpips, self.batch_size))
        proto["reference_run"] = str(reference)
        proto["lpips"] = {"net": self.lpips_net, "version": "0.1", "trunk_sha256": self.lpips.trunk_sha256,
                          "input": "[-1,1] RGB (grey repeated), bilinear-upsampled to >= 32 px"}
        proto["psnr_ssim"] = ("per image on uint8 values, data range 1, mean over images; PSNR capped at one grey "
                              "level off in one pixel; SSIM torchmetrics 11x11 Gaussian sigma 1.5")

    def _protocol(self, images: Tensor, real: RealSet, n: int, ids: list[int] | None) -> dict:
        from hiresrun.outputs import seed_ranges

        proto = {"n_generated": len(images), "n_reference": n, "real": real.name, "resolution": images.shape[-1],
                 "reference_subset": "all" if n == real.size else "seeded random subset (torch.Generator(0))",
                 "reference_stats_sha256": {}, "backend": "clean-fid 'clean' features, hiresrun distances",
                 "library_versions": _versions()}
        if ids is not None:
            proto["seeds"] = seed_ranges(ids)
        if self.fid or self.kid or self.patch_fid:
            proto.update(feature_extractor=InceptionPool3.name, feature_weights_sha256=self.inception.sha256,
                         resize_mode=RESIZE, fid_formula="exact; nuclear-norm form when n < 2048, else scipy sqrtm")
        if self.kid:
            proto["kid_protocol"] = (f"{self.kid_subsets} subsets of min({self.kid_subset_size}, n) (torchmetrics "
                                     f"draws, seed {self.seed}); cubic polynomial kernel; std over subsets")
        if self.patch_fid:
            proto["crop_scheme"] = self._crop_scheme(images.shape[-1])
        if self.swd:
            proto["swd_protocol"] = swd_metric.protocol() + f"; seed {self.seed}"
        if self._uses_digits(real):
            proto["digits"] = {"classifier_sha256": self.classifier[1], "threshold": self.digit_threshold,
                               "input": "grey, resized to 32 px as hiresrun.data.resize"}
        return proto

    # -- the verbs' other entry points ------------------------------------------------------------------
    def reference_statistics(self, real, resolution: int, channels: int) -> dict:
        """Compute (or find) and cache every enabled kind of reference features; `hiresrun eval eval.mode=ref`."""
        real = real_set(real, resolution, channels)
        idx = real.subset(self.num_reference)
        n, load = len(idx), _Lazy(real, idx)
        hashes = {}
        if self.fid or self.kid:
            hashes["inception"] = self.ref_inception(real, n, load)[1]
        if self.patch_fid:
            hashes["patch"] = self.ref_patch(real, n, load)[1]
        if self.swd:
            hashes["swd"] = self.ref_swd(real, n, load)[1]
        if self._uses_digits(real):
            hashes["digits"] = self.ref_digits(real, n, load)[1]
        return {"real": real.name, "resolution": real.resolution, "n_reference": n,
                "folder": str(real.folder or folder_for(self.cache_dir, real, n)), "computed": self.cache.misses,
                "reused": self.cache.hits, "protocol": {"reference_stats_sha256": hashes}}

    def proxy(self, real) -> FidProxy:
        return FidProxy(self, real)


class FidProxy:
    """`val/fid_proxy`: FID of the few validation samples against the cached real features, logged with its
    n (`val/fid_proxy_n`). Small-n FID is biased upwards: compare it only across steps of one run."""

    def __init__(self, metrics: Metrics, real):
        self.metrics, self.real = metrics, real

    def __call__(self, images: Tensor) -> dict:
        m = self.metrics
        real = real_set(self.real, images.shape[-1], images.shape[1])
        idx = real.subset(m.num_reference)
        ref, _ = m.ref_inception(real, len(idx), _Lazy(real, idx))
        fid = frechet_distance(m.inception.features(images, m.batch_size), ref)
        return {"val/fid_proxy": fid, "val/fid_proxy_n": float(len(images))}


def _check(images: Tensor, real: RealSet) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UsageError(f"metrics take uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[-1] != real.resolution or images.shape[-2] != real.resolution:
        raise UsageError(f"the images are {images.shape[-2]}x{images.shape[-1]} but the real set {real.name} is "
                         f"{real.resolution}px; set data.resolution={images.shape[-1]} or give real images that size")
    if images.shape[1] != real.channels:
        raise UsageError(f"the images have {images.shape[1]} channel(s), the real set {real.name} {real.channels}; "
                         f"compare greyscale with greyscale and RGB with RGB (data.channels)")
    if len(images) < 2:
        raise UsageError("metrics need at least 2 images; raise sample.num_samples")


__all__ = ["Metrics", "FidProxy", "load_folder", "RealSet"]
