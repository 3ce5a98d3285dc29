"""The real images metrics compare against, and the cache of their features.

Each feature kind (Inception, patch crops, SWD descriptors, digit features) is one .npz under
<cache_dir>/reference/<real set>-<res>px-n<n>/, named by the hash of its key (dataset, resolution,
extractor, weights hash, n, scheme): a changed key is a new file, an unchanged key is never recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hiresrun.errors import UsageError

MANIFEST = "real.json"  # marks a cached-statistics folder (usable as `eval.ref=<folder>`)


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float -> uint8, rounded as hiresrun.sampling.to_uint8 does for samples."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass
class RealSet:
    """A named real image set at one resolution; `load(idx)` reads images only on a cache miss."""

    name: str                                # dataset identity (cache key)
    resolution: int
    channels: int
    size: int                                # images available
    load: Callable[[Tensor], Tensor]         # indices -> uint8 (k, C, H, W)
    mnist: bool = False                      # the embedded MNIST: digit metrics apply
    folder: Path | None = None               # a cached-statistics folder it was read from

    def subset(self, n: int | None) -> Tensor:
        """The n reference indices: all, or a seeded random subset (classes stay mixed)."""
        if n is None or n >= self.size:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(0))[:n].sort().values


def from_mnist(data) -> RealSet:
    """The embedded MNIST's held-out reference split (MnistDataModule.ref_set) at the data's resolution."""
    per_class = data.ref_per_class

    def load(idx: Tensor) -> Tensor:
        data.setup("test")
        return to_uint8(data.ref_set.image[idx])

    return RealSet(f"mnist5k-ref{per_class}-seed{data.seed}", data.resolution, 1, 10 * per_class, load, mnist=True)


def from_folder(root: str | Path, resolution: int, channels: int) -> RealSet:
    """Every image under `root`, centre-cropped and resized to `resolution` as FolderDataModule does."""
    from hiresrun.data import IMAGE_SUFFIXES, FolderImages

    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder of real images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}); point the reference at a folder of images")
    ident = hashlib.sha256("\n".join(f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                     for p in files).encode()).hexdigest()[:12]
    ds = FolderImages(files, resolution, resolution, channels)
    load = lambda idx: to_uint8(torch.stack([ds[i]["image"] for i in idx.tolist()]))
    return RealSet(f"folder-{root.name}-{ident}", resolution, channels, len(files), load)


def from_cache(folder: str | Path) -> RealSet:
    """A cached-statistics folder (written by `hiresrun eval eval.mode=ref`): features only, no images."""
    info = json.loads((Path(folder) / MANIFEST).read_text())

    def load(idx: Tensor) -> Tensor:
        raise UsageError(f"{folder} holds cached statistics, not images, and lacks features for these metric "
                         f"settings; recompute them with `hiresrun eval eval.mode=ref` and the same metrics options")

    return RealSet(info["name"], info["resolution"], info["channels"], info["size"], load, info.get("mnist", False),
                   Path(folder))


def real_set(real, resolution: int, channels: int) -> RealSet:
    """A RealSet from what the caller has: a RealSet, a datamodule, a cached-statistics folder, an image
    folder, or a uint8 tensor."""
    from hiresrun.data import FolderDataModule, MnistDataModule

    if isinstance(real, RealSet):
        return real
    if isinstance(real, MnistDataModule):
        return from_mnist(real)
    if isinstance(real, FolderDataModule):
        return from_folder(real.root, real.resolution, real.channels)
    if isinstance(real, Tensor):
        ident = hashlib.sha256(real.contiguous().numpy().tobytes()).hexdigest()[:12]
        return RealSet(f"tensor-{ident}", real.shape[-1], real.shape[1], len(real), lambda idx: real[idx])
    if isinstance(real, (str, Path)) and (Path(real).expanduser() / MANIFEST).is_file():
        return from_cache(Path(real).expanduser())
    if isinstance(real, (str, Path)):
        return from_folder(real, resolution, channels)
    raise UsageError(f"cannot use {type(real).__name__} as real images; give a data config, a folder or cached stats")


# -- the cache ----------------------------------------------------------------------------------------------
def folder_for(cache_dir: str | Path, real: RealSet, n: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", real.name)[:80]
    return Path(cache_dir) / "reference" / f"{slug}-{real.resolution}px-n{n}"


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


class Cache:
    """Reference features by key; `hits` and `misses` count lookups (tests read them)."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir, self.hits, self.misses = Path(cache_dir), 0, 0

    def get(self, real: RealSet, n: int, kind: str, key: dict,
            compute: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], str]:
        """Cached arrays for (real set, resolution, n, kind, key), computed once; and their sha256."""
        full = {"dataset": real.name, "resolution": real.resolution, "n": n, "kind": kind, **key}
        text = json.dumps(full, sort_keys=True, default=str)
        folder = real.folder or folder_for(self.cache_dir, real, n)
        path = folder / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npz"
        if path.is_file():
            cached = self._read(path, text)
            if cached is not None:
                self.hits += 1
                return cached
        self.misses += 1
        arrays = compute()
        digest = arrays_sha256(arrays)
        self._write(folder, path, real, n, {**arrays, "__key__": np.array(text), "__sha256__": np.array(digest)})
        return arrays, digest

    @staticmethod
    def _read(path: Path, text: str) -> tuple[dict[str, np.ndarray], str] | None:
        """The cached arrays and the sha256 recomputed from them (the stored one is only a check: a file whose arrays
        no longer hash to it was changed after it was written, and is rebuilt); None when it cannot be used."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["__key__"]) != text:
                    return None
                arrays, stored = {k: z[k] for k in z.files if not k.startswith("__")}, str(z["__sha256__"])
        except (OSError, ValueError, KeyError, EOFError) as e:  # torn or not an npz
            print(f"hiresrun: warning: {path} is unreadable ({type(e).__name__}); recomputing it", flush=True)
            return None
        digest = arrays_sha256(arrays)
        if digest != stored:
            print(f"hiresrun: warning: {path} holds arrays that do not hash to its recorded sha256 (changed after it "
                  f"was written); recomputing it", flush=True)
            return None
        return arrays, digest

    @staticmethod
    def _write(folder: Path, path: Path, real: RealSet, n: int, arrays: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        info = {"name": real.name, "resolution": real.resolution, "channels": real.channels, "size": n,
                "mnist": real.mnist}
        (folder / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")


def load_folder(folder: str | Path) -> tuple[Tensor, list[int] | None]:
    """Every image under `folder` (name order) as uint8 (N, C, H, W), and the seeds their names give
    (`000042.png` -> 42, as `hiresrun sample` writes them) or None when the names are not numbers."""
    from hiresrun.data import IMAGE_SUFFIXES
    from hiresrun.outputs import load_image

    root = Path(folder).expanduser()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
    if not files:
        raise UsageError(f"eval.gen={folder}: no images there; point it at a folder of PNG/JPEG files "
                         f"(e.g. a sample run's samples/)")
    images = [load_image(f) for f in files]
    if len({im.shape for im in images}) > 1:
        raise UsageError(f"eval.gen={folder}: images differ in size or channels; generated images must share one")
    stems = [p.stem for p in files]
    ids = [int(s) for s in stems] if all(s.isdigit() for s in stems) and len(set(stems)) == len(stems) else None
    return torch.stack(images), ids
