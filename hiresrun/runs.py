"""`hiresrun runs [folder ...]`: a table of the runs under a folder (default: the outputs root, `HIRESRUN_OUTPUTS`
or ./outputs), newest first: when, verb, model, method, accelerator, n, the headline numbers and the status.
Not a Hydra task: it reads run folders (their .hydra/, metrics.json, status.json) as `hiresrun report` does."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from hiresrun.errors import UsageError

# header, metrics.json key, format: the numbers a glance needs; a column shows when any run has its key
HEADLINE = (("FID", "fid", "{:.1f}"), ("digit_acc", "digit_acc", "{:.3f}"), ("CLIP", "clip_score", "{:.1f}"),
            ("PSNR", "psnr_to_ref", "{:.1f}"), ("NFE", "nfe_per_image", "{:.1f}"), ("s/img", "sec_per_image", "{:.3f}"),
            ("steps", "steps", "{:,}"), ("loss", "train/loss", "{:.4f}"))


def run_folders(root: Path) -> list[Path]:
    """Every run folder under `root` (one holding .hydra/, metrics.json or status.json), not looking inside a run."""
    marks = (".hydra", "metrics.json", "status.json")
    if any((root / m).exists() for m in marks):
        return [root]
    found = []
    for folder, subfolders, _ in os.walk(root):
        here = Path(folder)
        if here != root and any((here / m).exists() for m in marks):
            found.append(here)
            subfolders.clear()
        else:
            subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
    return found


def status(run: dict) -> str:
    """done, refused (why), or what an unfinished run left: images on disk, the last checkpoint, the error."""
    folder: Path = run["path"]
    if run["status"] == "ok":
        shard = (run["metrics"].get("protocol") or {}).get("shard")
        return f"done (shard {shard})" if shard and shard != "0/1" else "done"
    if run["status"] != "failed":
        return f"{run['status']}: {run['reason']}" if run.get("reason") else str(run["status"])
    images = sum(1 for _ in (folder / "samples").glob("*.png")) if (folder / "samples").is_dir() else 0
    if images:
        return f"unfinished: {images:,} images on disk (the same command with hydra.run.dir= resumes)"
    if (folder / "checkpoints" / "last.ckpt").is_file():
        return "unfinished: checkpoints/last.ckpt (ckpt_path=<folder> resumes)"
    return f"failed: {run['reason']}"


def model_name(run: dict) -> str:
    choices_model = (run["config"].get("model") or {})
    path = str(choices_model.get("path") or "")
    return Path(path.rstrip("/")).name if path else "–"


def rows(roots: list[Path]) -> tuple[list[str], list[list[str]]]:
    from hiresrun.report import load_job

    runs = [load_job(f, str(f)) for root in roots for f in run_folders(root)]
    runs.sort(key=lambda r: r["path"].stat().st_mtime, reverse=True)
    shown = [c for c in HEADLINE if any(r["metrics"].get(c[1]) is not None for r in runs)]
    header = ["when", "verb", "model", "method", "accelerator", "n", *[c[0] for c in shown], "status", "folder"]
    table = []
    for r in runs:
        m = r["metrics"]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["path"].stat().st_mtime))
        n = m.get("num_samples")
        table.append([when, str(r["task"] or "–"), model_name(r), str(r["method"] or "–"),
                      str(r["accelerator"] or "none"), f"{n:,}" if isinstance(n, int) else "–",
                      *[fmt.format(m[key]) if isinstance(m.get(key), (int, float)) else "–" for _, key, fmt in shown],
                      status(r), shown_path(r["path"])])
    return header, table


def shown_path(folder: Path) -> str:
    """The folder relative to the working directory when it lies below it, else as found."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def render(header: list[str], table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), *map(line, table)])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hiresrun runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path,
                        help="folders to look in (default: $HIRESRUN_OUTPUTS or ./outputs)")
    args = parser.parse_args(argv)
    roots = args.folders or [Path(os.environ.get("HIRESRUN_OUTPUTS", "outputs"))]
    for root in roots:
        if not root.is_dir():
            raise UsageError(f"hiresrun runs {root}: no such folder; give a folder that holds run folders "
                             f"(hydra.run.dir=, a sweep, or the outputs root)")
    header, table = rows(roots)
    if not table:
        print(f"no runs under {', '.join(map(str, roots))}")
        return 0
    print(render(header, table))
    return 0
