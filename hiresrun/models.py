"""Base models: a frozen, pre-trained low-resolution diffusers model and the one call convention.

`load_model` takes a local diffusers directory (pipeline layout with `unet/` + `scheduler/`, or a bare
UNet folder with `scheduler_config.json` beside it), a name under `hiresrun/assets/`, or a hub id.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from hiresrun.errors import UsageError

ASSETS = Path(__file__).parent / "assets"
ModelFn = Callable[[Tensor, Tensor, dict], Tensor]  # (x_t, t, cond) -> raw output (eps, v or x0)

# The documented default when a model ships no scheduler config: diffusers' DDPMScheduler defaults
# (1000 steps, linear betas 1e-4..0.02, epsilon prediction), the setting of the original DDPM release.
DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                     "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon"}


@dataclass
class BaseModel:
    """Everything a method needs from the pre-trained model: the denoiser, its training schedule, its
    native resolution, (for latent models) the autoencoder that maps images to its sample space, and (for text
    models) the pipeline's text encoders."""

    unet: nn.Module
    scheduler_config: dict
    resolution: int                      # native (base) resolution of the sample space, in pixels
    channels: int                        # channels of the image the user sees
    weights_hash: str                    # sha256 over the UNet's weight files (or "scratch")
    source: str                          # path or hub id it came from
    vae: nn.Module | None = None         # latent models: images <-> latents
    vae_scale: float = 1.0               # latents are (z - vae_shift) * vae_scale once after encoding
    conditioning: str = "none"           # none | class | text
    cond: dict = field(default_factory=dict)  # extra UNet keyword arguments for every call (one row, broadcast)
    text: object | None = None           # text models: conditioning.TextEncoder (the pipeline's encode_prompt)
    vae_shift: float = 0.0               # the VAE config's shift_factor (SD3-style VAEs; SD/SDXL have none)
    vae_tile_above: int | None = None    # tiled VAE decode/encode for images larger than this side (pixels)
    vae_tile_size: int | None = None     # the tiles' side in image pixels (None: the VAE's own sample_size)
    compile: bool = False                # sampling: torch.compile the denoiser (nn.Module.compile, in place)
    channels_last: bool = False          # sampling: the denoiser's 4-D weights in channels-last memory format
    caption_dropout: float = 0.0         # training: share of captions replaced by "" (serves unguided calls)
    null_class: int | None = None        # class models: the label the model was trained with as "no class"
    label_dropout: float = 0.0           # training: share of labels replaced by null_class (class guidance)
    parametrization: str = "standard"    # standard (eps/v/x0 on the scheduler's VP grid) | edm (EDM's F, sigma)
    default_prompts: str | None = None   # text models: prompts used when neither prompts= nor sample.prompt is set
    trained_on: str | None = None        # the data the weights learned (mnist, laion, imagenet); None: not stated
    resolution_shift: bool = False       # flow models: the schedule's shift times the side ratio to the native size

    @property
    def flow(self) -> str | None:
        """"sd3" | "flux" for a flow-matching transformer base (hiresrun/flow.py), None for eps/v/x0 and EDM bases."""
        from hiresrun import flow

        return flow.family(self.unet)

    @property
    def latent_channels(self) -> int:
        """Channels of the sample space the loop integrates (a FLUX transformer reads four of them per packed token)."""
        from hiresrun import flow

        return flow.latent_channels(self.unet)

    @property
    def downsample_factor(self) -> int:
        """Spatial size must be divisible by this (2 per down block that downsamples; a transformer's patch; FLUX's
        2x2 packing)."""
        if self.flow == "flux":
            return 2
        if _is_transformer(self.unet) or self.flow:
            return int(self.unet.config.patch_size)
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def latent_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_resolution(self, resolution: int) -> None:
        step = self.downsample_factor * self.latent_factor
        if resolution < 1:
            raise UsageError(f"data.resolution={resolution}: must be a positive image side in pixels, a multiple "
                             f"of {step} for this model (e.g. data.resolution={self.resolution * 2})")
        if resolution % step:
            ok = [r for r in (resolution - resolution % step, resolution - resolution % step + step) if r > 0]
            raise UsageError(f"data.resolution={resolution} is not divisible by {step}, the model's downsampling "
                             f"factor; use e.g. data.resolution={ok[-1]}")
        from hiresrun import flow

        flow.check_size(self.unet, resolution // self.latent_factor, resolution)

    @property
    def default_guidance(self) -> float:
        """The guidance scale of the model's own pipeline when the user sets none: SD 7.5, SDXL 5.0, DiT 4.0
        (DiTPipeline's default); 1 (no guidance) otherwise."""
        if self.text is not None:
            return self.text.default_guidance
        return 4.0 if _is_transformer(self.unet) and self.conditioning == "class" else 1.0

    @property
    def class_table(self) -> int:
        """Rows of the class embedding: valid labels are 0 .. class_table - 1 (the null class among them)."""
        return _class_rows(self.unet)

    @property
    def num_classes(self) -> int:
        """Classes to draw from: the embedding's rows without the null class, wherever it sits."""
        return self.class_table - (0 if self.null_class is None else 1)

    def class_of(self, drawn: Tensor) -> Tensor:
        """Labels from draws in 0 .. num_classes - 1: the rows at and above the null class move up by one, so the
        null class is never an image's class (with the null class last, the labels are the draws)."""
        return drawn if self.null_class is None else drawn + (drawn >= self.null_class).to(drawn.dtype)

    def broadcast(self, batch: int, device) -> dict:
        """`cond`'s fixed keyword arguments as one row per image."""
        return {k: v.to(device).expand(batch, *v.shape[1:]) if isinstance(v, Tensor) and v.shape[0] == 1 else v
                for k, v in self.cond.items()}

    def batch_condition(self, batch: dict, dropout: bool = True, guidance: float | None = 1.0,
                        size: int | None = None) -> dict:
        """UNet keyword arguments for a training batch: its labels (class models), its captions (text models,
        `caption_dropout` of them replaced by the empty prompt from the step's seeded RNG, unless `dropout` is off;
        with `guidance` > 1, or None for the pipeline's default, a guided cond for sampling from the captions).
        `size`: the pixel side of the pass it conditions (SDXL's time ids), else the batch's image side."""
        size = batch["image"].shape[0] if "image" in batch else len(batch["label"])
        device = (batch["image"] if "image" in batch else batch["label"]).device
        cond = self.broadcast(size, device)
        if self.conditioning == "class":
            labels = batch["label"]
            if (labels < 0).any():
                raise UsageError("model.conditioning=class needs labelled data (data=mnist, or data=folder "
                                 "data.labels=subfolders); this data has no labels")
            if int(labels.max()) >= self.class_table:
                raise UsageError(f"a training label is {int(labels.max())}, but the model's class embedding has "
                                 f"{self.class_table} rows; use a model with more classes or fewer class folders")
            if dropout and self.label_dropout > 0:
                drop = (torch.rand(len(labels)) < self.label_dropout).to(labels.device)
                labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
            cond["class_labels"] = labels
        elif self.conditioning == "text":
            captions = list(batch.get("caption") or [""] * size)
            if dropout and self.caption_dropout > 0:
                drop = torch.rand(size) < self.caption_dropout
                captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            side = size or (batch["image"].shape[-1] if "image" in batch else self.resolution)
            scale = self.text.default_guidance if guidance is None else float(guidance)
            cond.update(self.text.encode(captions, device, size=side, guidance=scale > 1))
            if scale > 1:
                cond["guidance_scale"] = scale
        return cond

    def _tiling(self, side: int) -> None:
        on = self.vae_tile_above is not None and side > self.vae_tile_above
        if on and self.vae_tile_size is not None:  # diffusers' AutoencoderKL reads these two at each tiled call
            self.vae.tile_sample_min_size = int(self.vae_tile_size)
            self.vae.tile_latent_min_size = int(self.vae_tile_size) // self.latent_factor
        (self.vae.enable_tiling if on else self.vae.disable_tiling)()

    def encode(self, image: Tensor) -> Tensor:
        """Image in [-1, 1] -> sample space (identity for pixel models); in fp32 when the VAE says force_upcast."""
        if self.vae is None:
            return image
        vae = self.vae.to(image.device)
        self._tiling(image.shape[-1])
        with _fp32(vae):
            z = vae.encode(image.float() if _upcast(vae) else image.to(vae.dtype)).latent_dist.mode()
        return (z - self.vae_shift) * self.vae_scale

    def decode(self, x: Tensor) -> Tensor:
        """Sample space -> image in [-1, 1]; latent scaling undone once here, never per step. SDXL's VAE
        (force_upcast) overflows in fp16, so it decodes in fp32 with autocast off."""
        if self.vae is None:
            return x
        vae = self.vae.to(x.device)
        self._tiling(x.shape[-1] * self.latent_factor)
        z = x / self.vae_scale + self.vae_shift
        with _fp32(vae):
            return vae.decode(z.float() if _upcast(vae) else z.to(vae.dtype)).sample


def _upcast(vae: nn.Module) -> bool:
    return bool(getattr(vae.config, "force_upcast", False))


def _fp32(vae: nn.Module):
    """The VAE in fp32 with autocast off when its config says force_upcast (SDXL's VAE overflows in fp16/bf16);
    otherwise nothing changes (the VAE runs as the caller runs it)."""
    from contextlib import nullcontext

    if not _upcast(vae):
        return nullcontext()
    if next(vae.parameters()).dtype != torch.float32:
        vae.to(torch.float32)
    return torch.autocast(next(vae.parameters()).device.type, enabled=False)


# -- the call convention: (x_t, t, cond) -> raw output -------------------------------------------------------
# `cond` holds one row per image of x_t for every tensor in it (nested dicts too: SDXL's added_cond_kwargs), so a
# caller that runs part of the batch slices it with `rows` (k-diffusion's `extra_args`). Numbers in it (the
# guidance scale) are settings, not rows. Keys that are not UNet keyword arguments:
GUIDANCE = ("negative",          # the unconditional half's UNet kwargs (same keys); guidance needs it
            "guidance_scale",    # w: eps_u + w (eps_c - eps_u); <= 1 is one unguided pass (diffusers' rule)
            "guidance_rescale")  # phi of Lin et al. 2023 (diffusers' rescale_noise_cfg); 0 = off


def rows(cond: dict, idx: Tensor) -> dict:
    """`cond` restricted to the images `idx` (every tensor sliced on its first axis; numbers kept)."""
    def pick(v):
        if isinstance(v, dict):
            return {k: pick(u) for k, u in v.items()}
        return v[idx.to(v.device)] if isinstance(v, Tensor) else v

    return pick(cond)


def cat_rows(first: dict, second: dict) -> dict:
    """Two conditionings with the same keys, stacked row-wise (first's rows first)."""
    return {k: cat_rows(v, second[k]) if isinstance(v, dict) else torch.cat([v, second[k]]) for k, v in first.items()}


def guided(cond: dict) -> bool:
    """Whether a call with `cond` runs classifier-free guidance (two UNet passes per image)."""
    return cond.get("negative") is not None and float(cond.get("guidance_scale", 1.0)) > 1.0


def unet_kwargs(cond: dict) -> dict:
    return {k: v for k, v in cond.items() if k not in GUIDANCE}


def model_fn(unet: nn.Module) -> ModelFn:
    """The denoiser the loop calls: one UNet pass, or under guidance one pass over the doubled batch
    [unconditional; conditional] (diffusers' order), combined as eps_u + w (eps_c - eps_u), optionally rescaled.
    A DiT transformer goes through `transformer_fn`."""
    if _is_transformer(unet):
        return transformer_fn(unet)
    from hiresrun import flow

    if flow.family(unet):
        return flow.model_fn(unet)

    def call(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        kwargs, channels = unet_kwargs(cond), x.shape[1]  # ADM's learned-variance channels dropped: samplers take eps
        if not guided(cond):
            return unet(x, t, **kwargs).sample[:, :channels]
        both = cat_rows(cond["negative"], kwargs)
        tt = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim and t.shape[0] == x.shape[0] else t
        uncond, text = unet(torch.cat([x, x]), tt, **both).sample[:, :channels].chunk(2)
        return guide(uncond, text, cond)

    return call


def guide(uncond: Tensor, text: Tensor, cond: dict, start: Tensor | None = None) -> Tensor:
    """Classifier-free guidance eps_u + w (eps_c - eps_u), rescaled by phi = `guidance_rescale` when it is set (Lin et
    al. 2023, diffusers' `rescale_noise_cfg`: the guided output's std per image brought towards the conditional's).
    `start`: the prediction guidance starts from instead of eps_u (ScaleCrafter's noise-damped guidance)."""
    out = (uncond if start is None else start) + float(cond["guidance_scale"]) * (text - uncond)
    if float(cond.get("guidance_rescale", 0.0)) > 0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        out = rescale_noise_cfg(out, text, guidance_rescale=float(cond["guidance_rescale"]))
    return out


TRANSFORMERS = ("DiTTransformer2DModel", "Transformer2DModel")  # diffusers transformer denoisers hiresrun drives


def denoiser_dir(root: Path) -> Path:
    """Where a model folder keeps its denoiser: `unet/` or `transformer/` (pipeline layouts), else the folder."""
    for sub in ("unet", "transformer"):
        if (root / sub / "config.json").is_file():
            return root / sub
    return root


def transformer_fn(net: nn.Module) -> ModelFn:
    """A DiT as `DiTPipeline` calls it: the timestep as one value per row, under guidance the doubled batch in DiT's
    order [conditional; unconditional] with labels [c; null], guidance on the first `in_channels` output channels,
    and the learned-variance channels dropped (the sampler takes eps). `guidance_rescale` applies as on UNets
    (DiTPipeline has no such knob; at 0, the default, the output is the pipeline's)."""
    channels = int(net.config.in_channels)

    def call(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        kwargs, two = unet_kwargs(cond), guided(cond)
        both = cat_rows(kwargs, cond["negative"]) if two else kwargs
        xx = torch.cat([x, x]) if two else x
        tt = torch.as_tensor(t, device=x.device)
        tt = tt.expand(xx.shape[0]) if tt.ndim == 0 else torch.cat([tt, tt]) if two else tt
        out = net(xx, timestep=tt, **both).sample[:, :channels]
        if not two:
            return out
        text, uncond = out.chunk(2)
        return guide(uncond, text, cond)

    return call


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


LIBRARIES = ("diffusers", "transformers")  # the only modules a model folder may name classes from


def library_class(library, class_name, where: str) -> type:
    """The class a model folder's `model_index.json` (or config `_class_name`) names, taken from diffusers or
    transformers only: a folder naming any other module would run that module's code on import."""
    if library not in LIBRARIES:
        raise UsageError(f"{where} names the module {library!r}; hiresrun loads classes from diffusers and "
                         f"transformers only (a model folder may not choose code to run)")
    found = getattr(importlib.import_module(library), str(class_name), None)
    if not isinstance(found, type) or not hasattr(found, "from_pretrained"):
        raise UsageError(f"{where} names {library}.{class_name}, which is not a {library} model or tokenizer class; "
                         f"repair the folder or re-export it with save_pretrained")
    return found


def _unet_class(config: dict, where: str = "the denoiser's config.json") -> type:
    """The diffusers model class a config's `_class_name` names (diffusers only, and a model class)."""
    from diffusers import ModelMixin

    cls = library_class("diffusers", config.get("_class_name", "UNet2DModel"), f"{where} (_class_name)")
    if not issubclass(cls, ModelMixin):
        raise UsageError(f"{where} names {cls.__name__} as its _class_name, which is not a diffusers model; repair "
                         f"the folder")
    return cls


def describe(path: str, revision: str | None = None, vae: str | None = None) -> tuple[str | None, str | None]:
    """(UNet class name, "pixel" | "latent") from the model's config files alone: no weights, no network.
    (None, None) for a hub id not in the local Hugging Face cache."""
    root = _resolve(path)
    if root is None:
        from huggingface_hub import try_to_load_from_cache

        for name in ("unet/config.json", "transformer/config.json", "config.json"):
            try:
                found = try_to_load_from_cache(path, name, revision=revision)
            except ValueError:  # not a hub id either (load_model says so in its own line)
                return None, None
            if isinstance(found, str):
                root = Path(found).parent.parent if "/" in name else Path(found).parent
                break
        else:
            return None, None
    config = denoiser_dir(root) / "config.json"
    unet = json.loads(config.read_text()).get("_class_name", "UNet2DModel") if config.is_file() else None
    latent = (Path(vae) if vae else root / "vae").joinpath("config.json").is_file()
    return unet, "latent" if latent else "pixel"


def native_resolution(path: str, revision: str | None = None, vae: str | None = None) -> int | None:
    """The model's native image side from its config files alone (the denoiser's sample_size times the VAE's
    downsampling): what `data.resolution` defaults to when the model file states none; None when unknown."""
    root = _resolve(path) or _hub_root(path, revision)
    config = denoiser_dir(root) / "config.json" if root is not None else None
    if config is None or not config.is_file():
        return None
    vae_config = (Path(vae) if vae else root / "vae") / "config.json"
    factor = 2 ** (len(_read_json(vae_config).get("block_out_channels", [0])) - 1) if vae_config.is_file() else 1
    return _native(root, _read_json(config), factor)


def _native(root: Path, config: dict, factor: int) -> int | None:
    """The native image side: the folder's own statement (hiresrun.json `resolution`, written by hiresrun.tiny), else
    the denoiser's sample_size times the VAE's factor; FLUX's transformer states no sample size, so its pipeline's
    default (128 latent pixels, 1024 px for the released VAE) stands in."""
    facts = _read_json(root / "hiresrun.json") if (root / "hiresrun.json").is_file() else {}
    if isinstance(facts.get("resolution"), int):
        return int(facts["resolution"])
    size = config.get("sample_size", 128 if config.get("_class_name") == "FluxTransformer2DModel" else None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * factor if isinstance(size, int) else None


def _hub_root(path: str, revision: str | None) -> Path | None:
    """The hub model's snapshot folder in the local Hugging Face cache, or None (nothing is downloaded)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception:  # not cached (or not a hub id at all)
        return None


def text_model(path: str, revision: str | None = None) -> bool | None:
    """Whether the model folder is a text-to-image pipeline (its model_index.json names a text encoder), from
    config files alone; None when unknown (a hub id not in the cache)."""
    root = _resolve(path) or _hub_root(path, revision)
    if root is None:
        return None
    index = root / "model_index.json"
    return index.is_file() and (json.loads(index.read_text()).get("text_encoder") or [None])[0] is not None


# What a hub snapshot needs: configs, the denoiser and VAE, the text encoders and tokenizers, the scheduler.
HUB_PATTERNS = ["*.json", "*.txt", "unet/*", "transformer/*", "vae/*", "scheduler/*", "text_encoder*/*", "tokenizer*/*"]


def _fetch(path: str, revision: str | None) -> Path:
    """A hub model from the Hugging Face cache, or downloaded when the network is allowed; one line otherwise."""
    import os

    from huggingface_hub import snapshot_download

    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:  # a path, never a hub id (owner/name)
        raise UsageError(f"model.path={path}: no such folder; give a local diffusers folder or a hub id (owner/name)")
    cached = _hub_root(path, revision)
    if cached is not None:
        return cached
    how = (f"pass a local diffusers folder (model.path=/data/<model>, e.g. one written by "
           f"`huggingface-cli download {path} --local-dir /data/<model>` on a machine with network access) or "
           f"fill the Hugging Face cache (HF_HOME) once online")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UsageError(f"model.path={path}: not a local directory, not an embedded asset, and not in the Hugging "
                         f"Face cache (HF_HUB_OFFLINE is set, so nothing is downloaded); {how}")
    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=HUB_PATTERNS, etag_timeout=10))
    except Exception as e:  # offline, unknown id, no access: all end the same way for the user
        raise UsageError(f"model.path={path}: not a local directory, not an embedded asset, and not fetchable "
                         f"from the Hugging Face Hub ({type(e).__name__}); {how}") from None


def load_model(path: str, revision: str | None = None, init: str = "pretrained", vae: str | None = None,
               vae_scale: float | None = None, conditioning: str = "auto",
               vae_tile_above: int | None = None, vae_tile_size: int | None = None, null_class: int | None = None,
               parametrization: str = "standard", compile: bool = False, channels_last: bool = False,
               sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
               prompts: str | None = None, resolution: int | None = None,
               trained_on: str | None = None, denoiser: str | None = None, space: str | None = None,
               positions: str = "extrapolate", resolution_shift: bool = False) -> BaseModel:
    """Load the base model. `init=scratch` builds the same architecture with fresh weights (pretrain).
    `conditioning=auto`: text when the folder is a text-to-image pipeline, class when the UNet has a class
    embedding, else none. `resolution`: the native size a model file states (data.resolution's default), refused
    when the weights say otherwise; `trained_on`: the data the weights learned (recorded; run.py checks metrics);
    `denoiser` / `space`: what the option's released model is (denoiser class, pixel or latent), read by the support
    checks only while no config file of the model is on this machine (support.model_facts); the files always win,
    so `model.path=` pointing elsewhere needs no change to them. `positions`: how a flow transformer places tokens
    above its native size (hiresrun/flow.py; extrapolate | interpolate | ntk); `resolution_shift`: a flow model's
    schedule shifted by the side ratio to its native size (flow.resolution_alpha)."""
    del denoiser, space  # declarations for support.model_facts; loading reads the files
    if init not in ("pretrained", "scratch"):
        raise UsageError(f"model.init={init}: choose pretrained or scratch")
    if parametrization not in ("standard", "edm"):
        raise UsageError(f"model.parametrization={parametrization}: choose standard or edm")
    if parametrization == "edm" and not (0 < sigma_min < sigma_max and sigma_data > 0):
        raise UsageError(f"model.sigma_min={sigma_min}, sigma_max={sigma_max}, sigma_data={sigma_data}: need "
                         f"0 < sigma_min < sigma_max and sigma_data > 0 (EDM: 0.002, 80, 0.5)")
    if conditioning not in ("auto", "none", "class", "text"):
        raise UsageError(f"model.conditioning={conditioning}: choose auto, none, class or text")
    if vae_tile_above is not None and vae_tile_above < 1:
        raise UsageError(f"model.vae_tile_above={vae_tile_above}: give an image side in px (tiles above it), or null "
                         f"for no tiling")
    for name, value in (("compile", compile), ("channels_last", channels_last)):
        if not isinstance(value, bool):
            raise UsageError(f"model.{name}={value}: choose true or false")
    if vae_tile_size is not None and (vae_tile_size < 8 or vae_tile_size % 8):
        raise UsageError(f"model.vae_tile_size={vae_tile_size}: give the tiles' side in image px, a multiple of 8 "
                         f"(e.g. 512), or null for the VAE's own size")
    root = _resolve(path) or _fetch(path, revision)
    unet_dir = denoiser_dir(root)
    if not (unet_dir / "config.json").is_file():
        raise UsageError(f"model.path={path}: no diffusers UNet or transformer config.json in {root}, {root}/unet "
                         f"or {root}/transformer; point model.path at a folder written by save_pretrained")
    cls = _unet_class(_read_json(unet_dir / "config.json"), f"model.path={path}: {unet_dir / 'config.json'}")
    if init == "scratch":
        unet, digest = cls.from_config(cls.load_config(unet_dir)), "scratch"
    else:
        # fp32 whatever the files hold (bf16 / fp16 folders too): mixed precision is the sampler's autocast
        unet = cls.from_pretrained(unet_dir, low_cpu_mem_usage=False, torch_dtype=torch.float32)
        digest = weights_hash(unet_dir)
    autoencoder = _load_vae(root, vae)
    config = getattr(autoencoder, "config", None)
    scale = vae_scale if vae_scale is not None else getattr(config, "scaling_factor", 1.0)
    shift = getattr(config, "shift_factor", None) or 0.0
    channels = autoencoder.config.in_channels if autoencoder is not None else unet.config.in_channels
    native = _native(root, dict(unet.config), 1 if autoencoder is None else
                     2 ** (len(autoencoder.config.block_out_channels) - 1))
    if resolution is not None and int(resolution) != native:
        raise UsageError(f"model.resolution={resolution}, but the weights at {path} are {native} px; set "
                         f"model.resolution={native} (or null: read from the weights)")
    resolution = native
    is_text = bool(text_model(str(root)))
    if conditioning == "auto":
        conditioning = "text" if is_text else "class" if _class_rows(unet) else "none"
    if conditioning == "class" and not _class_rows(unet):
        raise UsageError(f"model.conditioning=class but the UNet at {path} has no class embedding "
                         f"(num_class_embeds); use model.conditioning=none")
    text = None
    if conditioning == "text":
        if not is_text:
            raise UsageError(f"model.conditioning=text but {root} has no text encoder (model_index.json names "
                             f"none); point model.path at a Stable Diffusion / SDXL pipeline folder")
        from hiresrun.conditioning import TextEncoder

        text = TextEncoder.load(root, unet, autoencoder, _scheduler_config(root))
    facts = _read_json(root / "hiresrun.json") if (root / "hiresrun.json").is_file() else {}  # hiresrun convert's
    said = facts.get("parametrization")
    if said is not None and said != parametrization:
        network = "EDM's F" if said == "edm" else "a standard eps network"
        raise UsageError(f"model.parametrization={parametrization}, but {root}/hiresrun.json says the network is "
                         f"{network} (converted from {facts.get('source')}); set model.parametrization={said}")
    if said == "edm" and float(facts.get("sigma_data", sigma_data)) != float(sigma_data):
        raise UsageError(f"model.sigma_data={sigma_data}, but {root}/hiresrun.json says the network was trained with "
                         f"sigma_data={facts['sigma_data']}; set model.sigma_data={facts['sigma_data']}")
    if float(facts.get("timestep_scale", 1.0)) != 1.0:  # the network reads k t (consistency models' EDM teacher)
        unet.time_proj.scale = float(facts["timestep_scale"])
    schedule = _scheduler_config(root)
    if parametrization == "edm":  # EDM's preconditioning lives in the EDM schedulers (hiresrun/edm.py)
        from hiresrun import edm

        schedule = edm.scheduler_config(sigma_data, sigma_min, sigma_max)
    base = BaseModel(unet=unet, scheduler_config=schedule, resolution=resolution,
                     channels=channels, weights_hash=digest, source=str(root), vae=autoencoder,
                     vae_scale=scale, conditioning=conditioning, text=text, vae_shift=float(shift),
                     vae_tile_above=vae_tile_above, vae_tile_size=vae_tile_size, parametrization=parametrization,
                     trained_on=trained_on, compile=compile, channels_last=channels_last)
    if prompts is not None:
        if text is None:
            raise UsageError(f"model.prompts={prompts}: {path} takes no text; drop it")
        base.default_prompts = str(prompts)
    from hiresrun import flow

    if flow.family(unet):
        flow.configure(unet, str(positions), resolution // base.latent_factor)
        base.resolution_shift = bool(resolution_shift)
    elif resolution_shift:
        raise UsageError(f"model.resolution_shift=true shifts a flow-matching model's schedule (SD3, FLUX); {path} has "
                         f"a {type(unet).__name__}: for a VP model the same idea is method=simple's shifted schedule")
    if not flow.family(unet) and positions != "extrapolate":
        raise UsageError(f"model.positions={positions}: position handling applies to flow transformers (SD3, FLUX); "
                         f"{path} has a {type(unet).__name__}; drop it")
    if _is_transformer(unet) and conditioning == "class":  # DiT's label embedding keeps its null row last
        base.null_class = base.class_table - 1
    if null_class is not None:
        if conditioning != "class":
            raise UsageError(f"model.null_class={null_class}, but {path} is not class-conditional; drop it")
        index = null_class + base.class_table if null_class < 0 else null_class
        if not 0 <= index < base.class_table:
            raise UsageError(f"model.null_class={null_class}: outside the model's {base.class_table} class rows "
                             f"(0..{base.class_table - 1}; -1 = the last)")
        base.null_class = index
    return base


def _is_transformer(net: nn.Module) -> bool:
    return type(net).__name__ in TRANSFORMERS


def _class_rows(net: nn.Module) -> int:
    """Rows of the class embedding: a UNet's num_class_embeds; a DiT's classes plus its null row."""
    if _is_transformer(net):
        n = getattr(net.config, "num_embeds_ada_norm", None)
        return int(n) + 1 if n else 0
    return int(getattr(net.config, "num_class_embeds", None) or 0)


def _read_json(path: Path) -> dict:
    """A config file, or one line naming it when it does not parse."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e}); repair or re-export the model folder") from None


def _load_vae(root: Path, vae: str | None) -> nn.Module | None:
    """Latent models carry an AutoencoderKL in `vae/` (or at `model.vae=<path>`); pixel models none."""
    folder = Path(vae) if vae else root / "vae"
    if not (folder / "config.json").is_file():
        if vae:
            raise UsageError(f"model.vae={vae}: no AutoencoderKL config.json there")
        return None
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False, torch_dtype=torch.float32).eval() \
        .requires_grad_(False)


def count_params(module: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


@torch.no_grad()
def save_pipeline(unet: nn.Module, scheduler_config: dict, folder: Path) -> None:
    """Write a diffusers pipeline folder (model_index.json, unet/, scheduler/) that `load_model` and
    diffusers' own DDPMPipeline.from_pretrained both read; a flow transformer goes to transformer/ beside its
    scheduler/ (the parts a FLUX / SD3 pipeline folder takes it from)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from hiresrun import flow

    if flow.family(unet):
        unet.save_pretrained(folder / "transformer")
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=1) + "\n")
        return

    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler_config))
    pipe.save_pretrained(folder)
