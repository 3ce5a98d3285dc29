"""Features of generated images, cached per image beside the images, so that each image's Inception features are
computed once: by the rank that made it, while sampling, and never again by a resume, a merge of shards or a rescore.

    <sample folder>/features/<kind>-<key hash>/<seed:06d>-<png sha256[:16]>.npy     the rows of one image

`kind` is `inception` (pool3 of the whole image, FID and KID) or `patch` (pool3 of its seeded crops, patch-FID); the
key names the extractor's weights, the resize and for crops the crop scheme, so other settings never read these
rows. The PNG's hash is in the name: a redone image is a new file. Files are written atomically; one that does not
load or has another shape is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hiresrun.errors import DataError
from hiresrun.outputs import atomic

FOLDER = "features"


def key_tag(kind: str, key: dict) -> str:
    return f"{kind}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"


class FeatureCache:
    """Per-image rows of the images of one scoring call: image i lives in `folders[i]` with seed `seeds[i]` and
    PNG hash `hashes[i]` (a union of shards has several folders). `computed` / `reused` count images."""

    def __init__(self, folders: Sequence[Path], seeds: Sequence[int], hashes: Sequence[str]):
        self.folders, self.seeds, self.hashes = [Path(f) for f in folders], list(seeds), list(hashes)
        self.computed, self.reused, self.unsaved = 0, 0, 0  # unsaved: rows a read-only folder could not keep

    def path(self, i: int, tag: str) -> Path:
        return self.folders[i] / FOLDER / tag / f"{self.seeds[i]:06d}-{self.hashes[i][:16]}.npy"

    def _load(self, path: Path, shape: tuple) -> np.ndarray | None:
        try:
            row = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return row if row.shape == shape and row.dtype == np.float32 else None

    def rows(self, kind: str, key: dict, shape: tuple, compute: Callable[[list[int]], np.ndarray]) -> np.ndarray:
        """(N, *shape) float32: cached rows where they exist, `compute(indices)` -> (k, *shape) for the rest (saved)."""
        tag = key_tag(kind, key)
        found = [self._load(self.path(i, tag), shape) for i in range(len(self.seeds))]
        missing = [i for i, row in enumerate(found) if row is None]
        if missing:
            new = np.asarray(compute(missing), np.float32).reshape(len(missing), *shape)
            for i, row in zip(missing, new):
                found[i] = row
                try:
                    save(self.path(i, tag), row)
                except DataError:  # a folder on read-only storage (shards merged from an archive): a cache only
                    self.unsaved += 1
        self.computed += len(missing)
        self.reused += len(self.seeds) - len(missing)
        if not found:
            return np.zeros((0, *shape), np.float32)
        return np.stack(found)

    def summary(self) -> str:
        return (f"per image under <sample folder>/{FOLDER}/ (keyed by extractor, resize, crops and the PNG's sha256): "
                f"{self.reused} row sets reused, {self.computed} computed by this scoring call")


def save(path: Path, row: np.ndarray) -> None:
    """Atomic (outputs.atomic): a temporary name no reader globs, then rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, row, allow_pickle=False)

    atomic(path, write)


class BatchFeatures:
    """`hiresrun sample` with metrics: the rank that wrote a batch computes its rows at once, on its own device, so
    scoring (rank 0, or `hiresrun merge` of shards) reads them instead of running Inception over the union."""

    def __init__(self, metrics_config, folder: Path):
        self.config, self.folder, self.metrics = metrics_config, Path(folder), None

    def __call__(self, seeds: list[int], images, hashes: list[str], device) -> None:
        if self.metrics is None:
            from hydra.utils import instantiate

            self.metrics = instantiate(self.config, device=str(device))
        self.metrics.generated_features(images, list(seeds), FeatureCache([self.folder] * len(seeds), seeds, hashes))
