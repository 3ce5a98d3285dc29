"""What a run leaves behind: samples/<seed>.png, grid.png, metrics.json, manifest.json (all atomic)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from hiresrun.errors import DataError, UsageError

PACKAGES = ("hiresrun", "torch", "torchvision", "diffusers", "lightning", "hydra-core", "omegaconf",
            "torchmetrics", "clean-fid", "wandb", "numpy")


PEAK_MEMORY = ("peak during sampling (from a reset at its start; the loaded model included): CUDA: "
               "torch.cuda.max_memory_allocated on rank 0's device; CPU: the process's resident-set high-water mark "
               "(VmHWM, reset through /proc/self/clear_refs)")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (jobs of one Hydra multirun share a process, so a lifetime peak would carry over)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last reset_peak_memory, in MiB, as PEAK_MEMORY describes it."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 1024, 1)  # kB
    except (OSError, StopIteration):
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # no /proc: lifetime peak


def strict(obj):
    """`obj` with every non-finite float replaced: NaN -> null, +-inf -> "inf" / "-inf" (strings), so the file is
    strict JSON (a bare NaN or Infinity token is not, and most readers outside Python reject it)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def atomic(path: Path, write) -> None:
    """`write(tmp)` into a hidden temporary file beside `path`, then rename: a reader (or a kill) never sees half a
    file. A failed write (a full disk, read-only storage) removes the temporary file and ends in one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")  # a name no reader globs (not *.png, *.json)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not write {path}: {e.strerror or e}; free space in {path.parent} or put the run on a "
                        f"writable disk (hydra.run.dir=<folder>); the same command then resumes") from None


def write_json(path: Path, obj: dict) -> None:
    """Atomic (see `atomic`), strict JSON (see `strict`)."""
    text = json.dumps(strict(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    atomic(path, lambda tmp: tmp.write_text(text))


def write_metrics(run_dir: Path, task: str, numbers: dict) -> dict:
    """The one writer of a run's metrics.json, for every verb and stage: {"task": the verb, flat numbers and names,
    "protocol": {how they were measured}} (the only nested value), strict JSON, atomic. Returns what it wrote."""
    nested = sorted(k for k, v in numbers.items() if isinstance(v, dict) and k != "protocol")
    if nested:
        raise ValueError(f"metrics.json holds flat values and one `protocol` dict; nested: {nested}")
    record = {**{k: v for k, v in numbers.items() if k != "task"}, "task": task}
    write_json(Path(run_dir) / "metrics.json", record)
    return record


def read_jsonl(path: Path, name: str, example: str) -> list[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSON-lines file; a line that does not parse ends with one
    line naming `name` (how the user gave the file), the line, and an `example` of a good line."""
    from hiresrun.errors import UsageError

    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UsageError(f"{name}: line {n} is not JSON ({e.msg}); write one object per line, e.g. "
                             f"{example}") from None
    return rows


def write_text(path: Path, text: str) -> None:
    """A text file, atomically like every other write here."""
    atomic(path, lambda tmp: tmp.write_text(text))


def save_png(image: Tensor, path: Path) -> None:
    """uint8 (C, H, W) -> PNG, written atomically."""
    a = image.permute(1, 2, 0).numpy()
    im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    atomic(path, lambda tmp: im.save(tmp, format="PNG"))


def grid(images: Tensor, pad: int = 1) -> Tensor:
    """uint8 (N, C, H, W) -> one uint8 (C, H', W') image, square-ish, white separators."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        out[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = im
    return out


GRID_WIDTH = 512   # a grid narrower than this is enlarged by a whole factor, nearest neighbour (pixels stay pixels)
CAPTION_PX = 11    # caption font size


def captioned_grid(images: Tensor, captions: list[str] | None = None, min_width: int = GRID_WIDTH,
                   pad: int = 2) -> Image.Image:
    """uint8 (N, C, H, W) -> a square-ish RGB grid, each tile enlarged by the smallest whole factor that makes the
    grid at least `min_width` px wide (nearest neighbour) and captioned under it, cut to the tile's width."""
    from PIL import ImageDraw, ImageFont

    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    k = max(1, math.ceil(min_width / (cols * w)))
    font = ImageFont.load_default(size=CAPTION_PX)
    strip = CAPTION_PX + 4 if captions else 0
    tw, th = w * k, h * k
    canvas = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + strip + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        x, y = pad + q * (tw + pad), pad + r * (th + strip + pad)
        a = im.permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(a[..., 0] if c == 1 else a).convert("RGB").resize((tw, th), Image.NEAREST), (x, y))
        if captions:
            text = captions[i]
            while text and draw.textlength(text, font=font) > tw:
                text = text[:-2] + "…" if len(text) > 1 else ""
            draw.text((x, y + th + 1), text, fill="black", font=font)
    return canvas


def captions(seeds: list[int], prompts: list[str] | None = None, labels: list[int] | None = None) -> list[str]:
    """What each image's caption says: its seed, and its prompt or class label."""
    if prompts is not None:
        return [f"{s}: {p}" for s, p in zip(seeds, prompts)]
    if labels is not None:
        return [f"{s}: class {lab}" for s, lab in zip(seeds, labels)]
    return [f"seed {s}" for s in seeds]


def save_grid(images: Tensor, path: Path, captions: list[str] | None = None) -> None:
    """The grid as a PNG: enlarged to at least GRID_WIDTH px and captioned (seeds, prompts or labels) when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = captioned_grid(images, captions)
    atomic(path, lambda tmp: im.save(tmp, format="PNG"))


def side_by_side(grids: list[tuple[str, Path]], path: Path, top: int = 18, pad: int = 8) -> None:
    """Several runs' grid.png next to each other, each under its name (demo and study figures)."""
    from PIL import ImageDraw

    images = [Image.open(p).convert("RGB") for _, p in grids]
    w, h = max(im.width for im in images), max(im.height for im in images)
    canvas = Image.new("RGB", (len(images) * (w + pad) - pad, h + top), "white")
    draw = ImageDraw.Draw(canvas)
    for i, ((name, _), im) in enumerate(zip(grids, images)):
        canvas.paste(im, (i * (w + pad), top))
        draw.text((i * (w + pad) + 2, 3), name, fill="black")
    canvas.save(path)


def save_samples(seeds: Tensor, images: Tensor, folder: Path) -> None:
    """<folder>/<seed:06d>.png for each seed, as sample runs name them; other files there are left alone."""
    for s, im in zip(seeds.tolist(), images):
        save_png(im, folder / f"{s:06d}.png")


def load_image(path: Path) -> Tensor:
    """One image file as uint8 (C, H, W): greyscale (L, 1, I;16) one channel, anything else RGB. The one reader of
    images from disk (samples, reference runs, `eval.gen` folders)."""
    try:
        with Image.open(path) as im:
            im = im if im.mode in ("L", "RGB") else im.convert("L" if im.mode in ("I;16", "1") else "RGB")
            a = torch.from_numpy(np.asarray(im).copy())
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated or foreign files
        raise UsageError(f"{path}: not a readable image ({type(e).__name__}); replace or remove the file") from None
    return a[None] if a.ndim == 2 else a.permute(2, 0, 1)


def load_images(paths) -> Tensor:
    """Image files (or every PNG of a folder, in name order) as uint8 (N, C, H, W)."""
    paths = sorted(Path(paths).glob("*.png")) if isinstance(paths, (str, Path)) else list(paths)
    return torch.stack([load_image(p) for p in paths])


def seed_ranges(seeds: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (the form `sample.seeds=` accepts)."""
    seeds = sorted(seeds)
    runs = [[seeds[0], seeds[0]]]
    for s in seeds[1:]:
        if s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def git_commit() -> str:
    try:
        here = Path(__file__).parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names) -> dict:
    """Installed version of each distribution (None where it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# The command a Python API call stands for (hiresrun/api.py sets it for the call's duration): the run's manifest
# records it instead of the interpreter's own argv.
API_COMMAND: list[str] | None = None


def manifest(weights_hash: str, model_source: str) -> dict:
    """Enough to rerun: versions, commit, weights identity, the exact command line (or the API call's equivalent)."""
    versions = package_versions(PACKAGES)
    argv = ["hiresrun", *API_COMMAND] if API_COMMAND is not None else sys.argv
    return {"command": " ".join(["hiresrun"] + argv[1:]), "argv": argv, "git_commit": git_commit(),
            **({"python_api": True} if API_COMMAND is not None else {}),
            "packages": versions, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "model": {"source": model_source, "weights_sha256": weights_hash}}


def write_block(path: Path, name: str, text: str) -> None:
    """Replace what lies between `<!-- table:name -->` and `<!-- /table:name -->` in a markdown file with `text`
    (how a study script keeps the README table it reports current). Both markers must be there, once each."""
    start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
    doc = path.read_text()
    if doc.count(start) != 1 or doc.count(end) != 1 or doc.index(start) > doc.index(end):
        raise ValueError(f"{path}: needs one '{start}' ... '{end}' pair to write the {name} table into")
    head, rest = doc.split(start)
    write_text(path, f"{head}{start}\n{text.strip()}\n{end}{rest.split(end, 1)[1]}")
