"""Peak device memory of a sample run, estimated from the model's config files before any weight is loaded, so that a
resolution the device cannot hold is refused in one line instead of dying in the VAE decode an hour later.

The estimate is an upper bound built from three terms, each a closed form in the sizes the configs state:

    weights     every parameter of the denoiser, the VAE and the text encoders, in fp32 (hiresrun loads fp32 weights and
                samples under autocast), counted from the safetensors headers (the file size for other formats)
    denoiser    one network call at the target latent: the down path's skip tensors (kept for the up path) plus the
                working set of the largest level (20 tensors of it; 40 more where it has transformer blocks), or
                for a transformer the working set of one block over all tokens; x2 under classifier-free guidance.
                Attention through scaled_dot_product_attention (diffusers' default processors) is linear in the token
                count; explicit attention (Attn-SF's scaled logits) adds heads x N^2 scores
    VAE decode  the decoder at the image size: 7 tensors of the largest (channels x pixels) of its levels (the
                upsampled input of each level counted with the level's own), in fp32, plus the mid-block attention;
                with tiling, the same at the tile size plus the decoded tiles and the image they are blended into

The working-set factors (20 + 40, 7) are not derived op by op: they are fitted, with a margin, to the peaks measured
on the embedded latent model at 256-512 px (tests/test_memory.py checks that the estimate bounds the measured peak and
stays within 3x of it), where the forward's temporaries (group norms, activations, the skip concatenations, GEGLU's
8x-wide projection, the attention kernel's contiguous copies) and the allocator's slack all count.

The two activation terms never coexist (the decoder runs after the last network call), so the peak is weights +
max(denoiser, VAE). The bench script (bench/gpu.py) prints the estimate beside CUDA's measured peak.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MB = 2 ** 20
WEIGHT_DIRS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
        "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class Estimate:
    weights_mb: float
    denoiser_mb: float
    vae_mb: float
    tiled: bool

    @property
    def total_mb(self) -> float:
        return self.weights_mb + max(self.denoiser_mb, self.vae_mb)

    def as_dict(self) -> dict:
        return {"estimated_peak_mb": round(self.total_mb, 1), "weights_mb": round(self.weights_mb, 1),
                "denoiser_mb": round(self.denoiser_mb, 1), "vae_decode_mb": round(self.vae_mb, 1),
                "vae_tiled": self.tiled}


# -- weights -------------------------------------------------------------------------------------------------------
def safetensors_params(path: Path) -> int:
    """Number of elements in a .safetensors file, from its JSON header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in entry["shape"]:
            count *= int(d)
        total += count
    return total


def weights_bytes(root: Path) -> int:
    """fp32 bytes of every weight file of a model folder's denoiser, VAE and text encoders (or of a bare folder)."""
    dirs = [root / d for d in WEIGHT_DIRS if (root / d).is_dir()] or [root]
    total = 0
    for d in dirs:
        tensors = sorted(d.glob("*.safetensors"))
        if tensors:
            total += 4 * sum(safetensors_params(p) for p in tensors)
        else:  # .bin / .pt: their size on disk (usually fp32 already)
            total += sum(p.stat().st_size for p in d.glob("*.bin"))
    return total


# -- activations ---------------------------------------------------------------------------------------------------
def _as_list(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_elements(config: dict, side: int, eager: bool) -> int:
    """Elements alive at the peak of one UNet call on one latent of side `side` (see the module docstring)."""
    channels = list(config["block_out_channels"])
    layers = _as_list(config.get("layers_per_block", 2), len(channels))
    down = config.get("down_block_types") or [""] * len(channels)
    heads = _as_list(config.get("attention_head_dim") if config.get("num_attention_heads") is None
                     else config["num_attention_heads"], len(channels))
    skips, working = 0, 0
    for level, c in enumerate(channels):
        pixels = (side // 2 ** level) ** 2
        attends = "Attn" in str(down[level])
        skips += (int(layers[level]) + 1) * c * pixels
        work = 20 * c * pixels + (40 * c * pixels if attends else 0)
        if attends and eager:
            work += int(heads[level] or 8) * pixels * pixels
        working = max(working, work)
    return skips + working


def transformer_elements(config: dict, side: int, eager: bool) -> int:
    """Elements alive at the peak of one transformer call: one block's working set over all tokens (the residual
    stream, q/k/v, the feed-forward's 4x hidden and their temporaries: 24 widths per token), plus the text tokens of
    joint attention."""
    patch = int(config.get("patch_size") or 2)
    heads = int(config.get("num_attention_heads") or 16)
    width = heads * int(config.get("attention_head_dim") or 72)
    tokens = (side // patch) ** 2 + (512 if config.get("joint_attention_dim") else 0)
    return 24 * tokens * width + (heads * tokens * tokens if eager else 0)


def vae_elements(config: dict, side: int, eager: bool) -> int:
    """Elements alive at the peak of decoding one image of side `side` (see the module docstring)."""
    channels = list(reversed(config["block_out_channels"]))  # the decoder climbs from the deepest level
    levels = len(channels)
    peak = 0
    for j, c in enumerate(channels):
        pixels = (side // 2 ** (levels - 1 - j)) ** 2
        incoming = channels[j - 1] if j else c  # the upsampled output of the level below arrives at this size
        peak = max(peak, 7 * max(c, incoming) * pixels)
    latent = (side // 2 ** (levels - 1)) ** 2
    if eager:
        peak = max(peak, latent * latent + 3 * channels[0] * latent)
    return peak


def estimate(root: Path, side: int, batch: int, passes: int, activation_bytes: int, tile_above: int | None,
             tile_size: int | None, eager: bool = False) -> Estimate:
    """The peak memory of sampling `batch` images of `side` px from the model folder `root`: `passes` network rows per
    image (2 under classifier-free guidance), activations of `activation_bytes` (2 under bf16/fp16 autocast)."""
    from hiresrun.models import _read_json, denoiser_dir

    net = _read_json(denoiser_dir(root) / "config.json")
    vae_config = _read_json(root / "vae" / "config.json") if (root / "vae" / "config.json").is_file() else None
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config else 1
    latent = side // factor
    if "block_out_channels" in net:
        elements = unet_elements(net, latent, eager)
    else:
        elements = transformer_elements(net, latent, eager)
    denoiser = batch * passes * activation_bytes * elements
    vae, tiled = 0, False
    if vae_config is not None:
        tiled = tile_above is not None and side > tile_above
        tile = int(tile_size or vae_config.get("sample_size") or side)
        if tiled and tile < side:
            out = int(vae_config.get("out_channels", 3))
            vae = 4 * (vae_elements(vae_config, tile, eager) + 3 * out * side * side)  # tile + tiles + image
        else:
            tiled = False
            vae = 4 * vae_elements(vae_config, side, eager)
        vae *= batch
    return Estimate(weights_bytes(root) / MB, denoiser / MB, vae / MB, tiled)


# -- the device ----------------------------------------------------------------------------------------------------
def device_mb(device) -> float | None:
    """Memory the device can give: a CUDA device's total memory, the host's available memory for the CPU
    (MemAvailable), None where unknown."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / MB
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        return None
    return None


def override_mb() -> float | None:
    """HIRESRUN_DEVICE_MEMORY_MB: the memory to plan for instead of the device's (a GPU shared with other jobs)."""
    from hiresrun.errors import UsageError

    value = os.environ.get("HIRESRUN_DEVICE_MEMORY_MB")
    if not value:
        return None
    try:
        mb = float(value)
    except ValueError:
        mb = float("nan")
    if not mb > 0:
        raise UsageError(f"HIRESRUN_DEVICE_MEMORY_MB={value}: give the memory to plan for in MiB (e.g. 40000), or "
                         f"unset it to use the device's own")
    return mb


# -- the refusal ---------------------------------------------------------------------------------------------------
def passes_per_image(cfg, root: Path) -> int:
    """Network rows per image: 2 where classifier-free guidance doubles the batch (text and class models at their
    default or a given scale > 1; FLUX only under true CFG), else 1."""
    from hiresrun.models import _read_json, denoiser_dir

    s = cfg.sample
    name = _read_json(denoiser_dir(root) / "config.json").get("_class_name", "")
    if name == "FluxTransformer2DModel":
        return 2 if float(s.get("true_cfg_scale") or 1) > 1 else 1
    conditioned = (root / "model_index.json").is_file() or "class" in str(cfg.model.get("conditioning"))
    scale = s.get("guidance_scale")
    return 2 if conditioned and (scale is None or float(scale) > 1) else 1


def check(cfg) -> dict | None:
    """Refuse, before any weight is loaded, a sample run whose estimated peak exceeds the device's memory (one line:
    the estimate's terms and the knob that lowers the largest); -> the estimate for metrics.json, or None where the
    model's files are not on this machine (the loader then says so) or sample.memory_check=false."""
    import torch

    from hiresrun import models
    from hiresrun.errors import UsageError

    if not cfg.sample.get("memory_check", True):
        return None
    path, m = str(cfg.model.path), cfg.model
    root = models._resolve(path) or models._hub_root(path, m.get("revision"))
    if root is None or not (models.denoiser_dir(root) / "config.json").is_file():
        return None
    t = cfg.trainer
    gpu = str(t.get("accelerator", "cpu")) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    precision = str(t.get("precision", "32-true"))
    side, batch = int(cfg.data.resolution), int(cfg.sample.batch_size)
    eager = "attnsf" in str((cfg.get("method") or {}).get("_target_", "")).lower()
    est = estimate(root, side, batch, passes_per_image(cfg, root), 2 if precision.startswith(("bf16", "16")) else 4,
                   m.get("vae_tile_above"), m.get("vae_tile_size"), eager)
    record = {**est.as_dict(), "device": str(device)}
    have = override_mb() or device_mb(device)
    if have is None or est.total_mb <= have:
        return {**record, "device_mb": round(have, 1) if have else None}
    gib = lambda mb: f"{mb / 1024:.1f} GiB"
    vae_bound = est.vae_mb >= est.denoiser_mb
    if est.weights_mb > have:
        fix = "the weights alone do not fit: use a device with more memory"
    elif vae_bound and not est.tiled:
        fix = f"tile the VAE decode: model.vae_tile_above={max(side // 2, 8)} (or lower sample.batch_size)"
    elif vae_bound:
        fix = f"smaller VAE tiles (model.vae_tile_size=512) or a smaller sample.batch_size={max(batch // 2, 1)}"
    else:
        per = est.denoiser_mb / batch
        fix = (f"lower sample.batch_size (each image's activations: {gib(per)})" if batch > 1 else
               "the network's activations for one image do not fit: a smaller data.resolution, bf16 "
               "(trainer.precision=bf16-mixed) or a device with more memory")
    where = "HIRESRUN_DEVICE_MEMORY_MB" if override_mb() else ("the GPU's memory" if gpu else "the memory available")
    raise UsageError(f"sampling {batch} x {side} px needs an estimated {gib(est.total_mb)} on {device} (weights "
                     f"{gib(est.weights_mb)} + {'VAE decode' if vae_bound else 'network activations'} "
                     f"{gib(max(est.vae_mb, est.denoiser_mb))}), more than {where} ({gib(have)}); {fix}; or "
                     f"sample.memory_check=false to try anyway (the estimate is an upper bound: docs/memory.md)")
