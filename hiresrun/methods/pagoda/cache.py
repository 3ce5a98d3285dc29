"""The encoded training set on disk: one file per (flip, chunk of dataset indices), written atomically.

Folder <cache_dir>/pagoda/<key>/, key = sha256 of (base weights hash, solver, steps, sigma_max). A killed encode
leaves only whole chunk files, so a rerun skips them; a changed key is a new folder (re-encode). Each latent is
stored with a fingerprint of the base-resolution view it came from, checked when training reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from hiresrun.errors import UsageError


def fingerprint(x: Tensor) -> str:
    """sha256 (16 hex) of one image's float32 bytes: the encoder input must be the view the trainer loads."""
    return hashlib.sha256(x.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class LatentCache:
    """Latents z (VE scale) per (dataset index, flip)."""

    def __init__(self, cache_dir: str | Path, key: dict):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(cache_dir).expanduser() / "pagoda" / digest

    def path(self, flip: int, start: int) -> Path:
        return self.folder / f"f{flip}_{start:08d}.pt"

    def write(self, flip: int, start: int, index: Tensor, z: Tensor, prints: list[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "key.json").write_text(json.dumps(self.key, indent=1, sort_keys=True))
        tmp = self.path(flip, start).with_suffix(".tmp")
        torch.save({"index": index.cpu(), "z": z.detach().float().cpu(), "fingerprint": prints}, tmp)
        os.replace(tmp, self.path(flip, start))

    def load(self) -> dict[tuple[int, int], tuple[Tensor, str]]:
        out = {}
        for f in sorted(self.folder.glob("f*_*.pt")):
            flip, chunk = int(f.name[1]), torch.load(f, weights_only=True)
            out.update({(int(i), flip): (z, p) for i, z, p in zip(chunk["index"], chunk["z"], chunk["fingerprint"])})
        return out


def encode_dataset(encoder, dataset, cache: LatentCache, flips: list[int], chunk: int, log=print) -> dict:
    """Encode every image's base view (`dataset[i]["base"]`, mirrored for flip 1) with `encoder(x, labels)`,
    chunk by chunk; chunks already on disk are skipped."""
    computed = reused = 0
    for flip in flips:
        for start in range(0, len(dataset), chunk):
            index = torch.arange(start, min(start + chunk, len(dataset)))
            if cache.path(flip, start).is_file():
                reused += len(index)
                continue
            items = [dataset[int(i)] for i in index]
            x = torch.stack([it["base"] for it in items])
            labels = torch.stack([torch.as_tensor(it["label"]) for it in items])
            z = encoder(x.flip(-1) if flip else x, labels)
            cache.write(flip, start, index, z, [fingerprint(v) for v in x])
            computed += len(index)
            log(f"hiresrun: encoded {start + len(index)}/{len(dataset)} (flip {flip}) -> {cache.folder}")
    return {"encoded": computed, "reused": reused, "cache": str(cache.folder)}


def lookup(latents: dict, index: Tensor, flip: Tensor, base: Tensor) -> Tensor:
    """The cached z of each (index, flip), after checking it was encoded from this batch's base view."""
    out = []
    for i, f, x in zip(index.tolist(), flip.tolist(), base):
        if (i, f) not in latents:
            raise UsageError(f"no cached latent for image {i} (flip {f}): run `hiresrun train +method=pagoda "
                             f"method.stage=encode` with the same model, data and method.inv_* settings first")
        z, p = latents[(i, f)]
        if p != fingerprint(x):
            raise UsageError(f"the cached latent of image {i} was encoded from a different image: the data config "
                             f"changed since method.stage=encode; encode again with method.cache_tag=<new tag>")
        out.append(z)
    return torch.stack(out).to(base.device)
