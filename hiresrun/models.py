"""Base models: a frozen, pre-trained low-resolution diffusers model and the one call convention.

`load_model` takes a local diffusers directory (pipeline layout with `unet/` + `scheduler/`, or a bare
UNet folder with `scheduler_config.json` beside it), a name under `hiresrun/assets/`, or a hub id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from hiresrun.errors import UsageError

ASSETS = Path(__file__).parent / "assets"
ModelFn = Callable[[Tensor, Tensor], Tensor]

# The documented default when a model ships no scheduler config: diffusers' DDPMScheduler defaults
# (1000 steps, linear betas 1e-4..0.02, epsilon prediction), the setting of the original DDPM release.
DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                     "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon"}


@dataclass
class BaseModel:
    """Everything a method needs from the pre-trained model: the denoiser, its training schedule, its
    native resolution, and (for latent models) the autoencoder that maps images to its sample space."""

    unet: nn.Module
    scheduler_config: dict
    resolution: int                      # native (base) resolution of the sample space, in pixels
    channels: int                        # channels of the image the user sees
    weights_hash: str                    # sha256 over the UNet's weight files (or "scratch")
    source: str                          # path or hub id it came from
    vae: nn.Module | None = None         # latent models: images <-> latents
    vae_scale: float = 1.0               # latents are multiplied by this once after encoding
    conditioning: str = "none"           # none | class | text
    cond: dict = field(default_factory=dict)  # extra keyword arguments for every UNet call

    @property
    def downsample_factor(self) -> int:
        """Spatial size must be divisible by this (2 per down block that downsamples)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def latent_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_resolution(self, resolution: int) -> None:
        step = self.downsample_factor * self.latent_factor
        if resolution % step:
            ok = [r for r in (resolution - resolution % step, resolution - resolution % step + step) if r > 0]
            raise UsageError(f"data.resolution={resolution} is not divisible by {step}, the model's downsampling "
                             f"factor; use e.g. data.resolution={ok[-1]}")

    @property
    def num_classes(self) -> int:
        return int(getattr(self.unet.config, "num_class_embeds", None) or 0)

    def condition(self, gens: list[torch.Generator], device) -> dict:
        """UNet keyword arguments for one sampling call. Class-conditional models draw each image's label
        from its own seed's generator (uniform over classes), so the label too depends on the seed only."""
        if self.conditioning != "class":
            return dict(self.cond)
        labels = torch.cat([torch.randint(self.num_classes, (1,), generator=g) for g in gens])
        return {**self.cond, "class_labels": labels.to(device)}

    def batch_condition(self, batch: dict) -> dict:
        """UNet keyword arguments for a training batch (its labels, for class-conditional models)."""
        if self.conditioning != "class":
            return dict(self.cond)
        if (batch["label"] < 0).any():
            raise UsageError("model.conditioning=class needs labelled data (data=mnist); this data has no labels")
        return {**self.cond, "class_labels": batch["label"]}

    def encode(self, image: Tensor) -> Tensor:
        """Image in [-1, 1] -> sample space (identity for pixel models)."""
        if self.vae is None:
            return image
        return self.vae.encode(image).latent_dist.mode() * self.vae_scale

    def decode(self, x: Tensor) -> Tensor:
        """Sample space -> image in [-1, 1]; latent scaling undone once here, never per step."""
        if self.vae is None:
            return x
        return self.vae.decode(x / self.vae_scale).sample


# Which rows of the sampled batch the current network call covers (None: all of them). An accelerator that runs
# the model on part of the batch (AdaptiveDiffusion's per-image decisions) sets it, so that anything bound to the
# whole batch (class labels, Self-Cascade's pivot) follows the rows instead of failing on a shape mismatch.
BATCH_ROWS: ContextVar[Tensor | None] = ContextVar("batch_rows", default=None)


@contextmanager
def batch_rows(rows: Tensor) -> Iterator[None]:
    token = BATCH_ROWS.set(rows)
    try:
        yield
    finally:
        BATCH_ROWS.reset(token)


def rows_of(v, batch: int):
    """`v` restricted to the current rows when it is a per-image tensor of the whole batch (more rows than the call)."""
    rows = BATCH_ROWS.get()
    if rows is None or not isinstance(v, Tensor) or v.ndim == 0 or v.shape[0] <= batch:
        return v
    return v[rows.to(v.device)]


def model_fn(unet: nn.Module, cond: dict | None = None) -> ModelFn:
    """The one call convention: (x_t, t) -> raw model output, conditioning bound in a closure."""
    kwargs = cond or {}
    return lambda x, t: unet(x, t, **{k: rows_of(v, x.shape[0]) for k, v in kwargs.items()}).sample


def weights_hash(folder: Path) -> str:
    """sha256 over the weight files of a diffusers model folder, in name order."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _resolve(path: str) -> Path | None:
    """A local folder, or an embedded asset name; None means 'treat as a hub id'."""
    for candidate in (Path(path).expanduser(), ASSETS / path):
        if candidate.is_dir():
            return candidate
    return None


def _scheduler_config(root: Path) -> dict:
    for f in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if f.is_file():
            return json.loads(f.read_text())
    return dict(DEFAULT_SCHEDULER)


def _unet_class(config: dict) -> type:
    import diffusers

    return getattr(diffusers, config.get("_class_name", "UNet2DModel"))


def describe(path: str, revision: str | None = None, vae: str | None = None) -> tuple[str | None, str | None]:
    """(UNet class name, "pixel" | "latent") from the model's config files alone: no weights, no network.
    (None, None) for a hub id not in the local Hugging Face cache."""
    root = _resolve(path)
    if root is None:
        from huggingface_hub import try_to_load_from_cache

        for name in ("unet/config.json", "config.json"):
            try:
                found = try_to_load_from_cache(path, name, revision=revision)
            except ValueError:  # not a hub id either (load_model says so in its own line)
                return None, None
            if isinstance(found, str):
                root = Path(found).parent.parent if name.startswith("unet/") else Path(found).parent
                break
        else:
            return None, None
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    config = unet_dir / "config.json"
    unet = json.loads(config.read_text()).get("_class_name", "UNet2DModel") if config.is_file() else None
    latent = (Path(vae) if vae else root / "vae").joinpath("config.json").is_file()
    return unet, "latent" if latent else "pixel"


def _fetch(path: str, revision: str | None) -> Path:
    """Download (or find in the Hugging Face cache) a hub model; one clear line when impossible."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=["*.json", "unet/*", "vae/*",
                                                                              "scheduler/*", "*.safetensors"]))
    except Exception as e:  # offline, unknown id, no access: all end the same way for the user
        raise UsageError(f"model.path={path}: not a local directory, not an embedded asset, and not fetchable "
                         f"from the Hugging Face Hub ({type(e).__name__}); pass a local diffusers folder "
                         f"(e.g. model.path=/data/ddpm-cifar10) or run once online to fill the cache") from None


def load_model(path: str, revision: str | None = None, init: str = "pretrained", vae: str | None = None,
               vae_scale: float | None = None, conditioning: str = "none") -> BaseModel:
    """Load the base model. `init=scratch` builds the same architecture with fresh weights (pretrain)."""
    if init not in ("pretrained", "scratch"):
        raise UsageError(f"model.init={init}: choose pretrained or scratch")
    if conditioning not in ("none", "class", "text"):
        raise UsageError(f"model.conditioning={conditioning}: choose none, class or text")
    root = _resolve(path) or _fetch(path, revision)
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise UsageError(f"model.path={path}: no diffusers UNet config.json in {root} or {root}/unet; "
                         f"point model.path at a folder written by save_pretrained")
    cls = _unet_class(json.loads((unet_dir / "config.json").read_text()))
    if init == "scratch":
        unet, digest = cls.from_config(cls.load_config(unet_dir)), "scratch"
    else:
        unet, digest = cls.from_pretrained(unet_dir, low_cpu_mem_usage=False), weights_hash(unet_dir)
    autoencoder = _load_vae(root, vae)
    scale = vae_scale if vae_scale is not None else getattr(getattr(autoencoder, "config", None),
                                                           "scaling_factor", 1.0)
    channels = autoencoder.config.in_channels if autoencoder is not None else unet.config.in_channels
    size = unet.config.sample_size
    resolution = (size if isinstance(size, int) else size[0]) * (1 if autoencoder is None else
                                                                  2 ** (len(autoencoder.config.block_out_channels) - 1))
    if conditioning == "class" and not getattr(unet.config, "num_class_embeds", None):
        raise UsageError(f"model.conditioning=class but the UNet at {path} has no class embedding "
                         f"(num_class_embeds); use model.conditioning=none")
    return BaseModel(unet=unet, scheduler_config=_scheduler_config(root), resolution=resolution,
                     channels=channels, weights_hash=digest, source=str(root), vae=autoencoder,
                     vae_scale=scale, conditioning=conditioning)


def _load_vae(root: Path, vae: str | None) -> nn.Module | None:
    """Latent models carry an AutoencoderKL in `vae/` (or at `model.vae=<path>`); pixel models none."""
    folder = Path(vae) if vae else root / "vae"
    if not (folder / "config.json").is_file():
        if vae:
            raise UsageError(f"model.vae={vae}: no AutoencoderKL config.json there")
        return None
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False).eval().requires_grad_(False)


def count_params(module: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


@torch.no_grad()
def save_pipeline(unet: nn.Module, scheduler_config: dict, folder: Path) -> None:
    """Write a diffusers pipeline folder (model_index.json, unet/, scheduler/) that `load_model` and
    diffusers' own DDPMPipeline.from_pretrained both read."""
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler_config))
    pipe.save_pretrained(folder)
