"""`hiresrun report <multirun dir>`: any sweep -> report.md (one row per run) and two plots.

Reads each job folder's metrics.json, status.json and .hydra/{config,overrides,hydra}.yaml. Runs without
results are listed with a reason, never dropped: `failed` (a config but no metrics.json; the first error of
its log's last traceback), `refused` (status.json says so and why), `missing` (a job of multirun.yaml's
sweep that has no folder: the sweep stopped before it). Plots: the chosen quality metric against seconds
per image with the Pareto front marked, and against NFE with one line per method.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from hiresrun.errors import UsageError
from hiresrun.naming import job_number

LOWER_BETTER = ("fid", "kid", "swd", "patch_fid", "fd_digits", "lpips_to_ref")
HIGHER_BETTER = ("digit_acc", "digit_conf", "psnr_to_ref", "ssim_to_ref")
# header, metrics.json key, decimals: shown when at least one run has the key
COLUMNS = (("FID", "fid", 2), ("KID", "kid", 4), ("digit_acc", "digit_acc", 3), ("SWD", "swd", 2),
           ("LPIPS", "lpips_to_ref", 3), ("PSNR", "psnr_to_ref", 2), ("NFE", "nfe_per_image", 1),
           ("s/image", "sec_per_image", 4), ("peak MB", "peak_memory_mb", 0), ("trainable", "trainable_params", 0),
           ("train steps", "steps", 0), ("train s", "train_seconds", 1), ("train loss", "train/loss", 4))
SHOWN_ELSEWHERE = ("method", "accelerator", "sampler", "sampler.num_steps", "task")  # not repeated under `overrides`
ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit|Interrupt)): ?(.*)$")


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    """A table cell: `digits` decimals, "–" when the run has no such number."""
    return "–" if value is None else f"{scale * value:.{digits}f}"


# -- loading ----------------------------------------------------------------------------------------------
def _yaml(path: Path, default):
    """A YAML file of a job as plain containers, `default` when absent; one line naming it when it does not parse."""
    if not path.is_file():
        return default
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # yaml's and OmegaConf's parse errors have no common base
        raise UsageError(f"report: {path} does not parse ({type(e).__name__}); repair or remove it") from None


def _json(path: Path) -> dict:
    """A job's metrics.json / status.json, {} when absent; one line naming it when it does not parse."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UsageError(f"report: {path} is not readable JSON ({type(e).__name__}); repair or remove it") from None
    if not isinstance(value, dict):
        raise UsageError(f"report: {path} holds no JSON object; repair or remove it")
    return value


def job_folders(sweep: Path) -> list[Path]:
    """Hydra's numbered job folders (`3`, `3-method=upsample`: naming.job_dir; any sub-folder with .hydra,
    metrics.json or status.json), in job order; the folder itself when it is a single run; none when `sweep` is not
    a folder."""
    if not sweep.is_dir():
        return []
    if (sweep / ".hydra").is_dir() or (sweep / "metrics.json").is_file():
        return [sweep]
    marks = (".hydra", "metrics.json", "status.json")
    found = [p for p in sweep.iterdir() if p.is_dir() and (job_number(p) is not None
                                                            or any((p / m).exists() for m in marks))]
    return sorted(found, key=lambda p: (job_number(p) is None, job_number(p) or 0, p.name))


def failure_reason(folder: Path) -> str:
    """Why a job left no metrics.json: the root error of the last logged failure (Python prints a chain root
    first), else the log's last line (a job still running, or killed, logs no error)."""
    logs = sorted(folder.glob("*.log"))
    lines = [ln.rstrip() for ln in logs[-1].read_text(errors="replace").splitlines() if ln.strip()] if logs else []
    if not lines:
        return "no metrics.json and no log (crashed before logging, or still running)"
    marks = [i for i, ln in enumerate(lines) if "][ERROR]" in ln] or [i for i, ln in enumerate(lines)
                                                                      if ln.startswith("Traceback")][:1]
    errors = [m for m in map(ERROR_LINE.match, lines[marks[-1]:]) if m] if marks else []
    if errors:
        return f"{errors[0][1]}: {errors[0][2]}".rstrip(": ")
    return f"no metrics.json and no error in the log (still running, or killed); it ends: {lines[-1].strip()[:100]}"


def load_job(folder: Path, name: str) -> dict:
    """One run: its status, the names the table shows, its metrics, config and overrides."""
    hydra = folder / ".hydra"
    metrics = _json(folder / "metrics.json")
    config = _yaml(hydra / "config.yaml", {})
    choices = _yaml(hydra / "hydra.yaml", {}).get("hydra", {}).get("runtime", {}).get("choices", {})
    status = _json(folder / "status.json")
    if status.get("status", "ok") != "ok":
        state, reason = status["status"], status.get("reason", "")
    elif metrics:
        state, reason = "ok", None
    else:
        state, reason = "failed", failure_reason(folder) if hydra.is_dir() else "no .hydra/config.yaml"
    task = metrics.get("task") or config.get("task")  # every metrics.json names its verb (outputs.write_metrics)
    name_of = lambda group: metrics.get(group) or choices.get(group) or _target_name(config.get(group))
    sampling = task in (None, "sample", "calibrate")  # train runs use the sampler only for validation grids
    steps = metrics.get("num_steps", (config.get("sampler") or {}).get("num_steps"))
    return {"run": name, "status": state, "reason": reason, "task": task, "method": name_of("method"),
            "accelerator": name_of("accelerator"), "sampler": name_of("sampler") if sampling else None,
            "steps": steps if sampling else None, "metrics": metrics, "config": config,
            "overrides": _yaml(hydra / "overrides.yaml", []), "path": folder}


def _target_name(node) -> str | None:
    target = node.get("_target_") if isinstance(node, dict) else None
    return target.rsplit(".", 1)[-1] if target else None


def expected_jobs(sweep: Path) -> list[list[str]]:
    """Each job's overrides as Hydra's basic sweeper expands multirun.yaml (its sweeper params, then the
    command line): the cartesian product, in job-number order. [] when there is no multirun.yaml."""
    path = sweep / "multirun.yaml"
    if not path.is_file():
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # Hydra's own expansion: its job numbers
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    hydra = _yaml(path, {}).get("hydra", {})
    params = [f"{k}={v}" for k, v in ((hydra.get("sweeper") or {}).get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides(params + hydra.get("overrides", {}).get("task", []))
        return BasicSweeper.split_arguments(overrides, None)[0]
    except HydraException:  # another sweeper's syntax (intervals, optuna): no expectation to check against
        return []


def load_sweep(sweep: Path) -> list[dict]:
    """Every job of a sweep, with expected jobs that have no folder appended as `missing`."""
    sweep = Path(sweep)
    runs = [load_job(f, f.name if f != sweep else sweep.name) for f in job_folders(sweep)]
    seen = {frozenset(r["overrides"]) for r in runs}
    numbers = {job_number(r["path"]) for r in runs if r["path"] is not None}
    for i, overrides in enumerate(expected_jobs(sweep)):
        if frozenset(overrides) not in seen and i not in numbers:
            runs.append({"run": str(i), "status": "missing", "task": None, "metrics": {}, "config": {},
                         "overrides": overrides, "path": None, "method": None, "accelerator": None,
                         "sampler": None, "steps": None, "reason": "no job folder (the sweep stopped before it)"})
    return runs


def load_sweeps(sweeps: list[Path]) -> list[dict]:
    """Several sweeps in one report: runs are then named <sweep>/<job>."""
    runs = []
    for sweep in sweeps:
        for r in load_sweep(sweep):
            runs.append({**r, "run": f"{Path(sweep).name}/{r['run']}"} if len(sweeps) > 1 else r)
    return runs


# -- table and Pareto front -------------------------------------------------------------------------------
def varied(runs: list[dict], shown: tuple[str, ...] = SHOWN_ELSEWHERE) -> dict[str, list[str]]:
    """Per run, its overrides that are not common to every run (what the sweep varied), minus the keys in `shown`."""
    sets = [set(r["overrides"]) for r in runs]
    common = set.intersection(*sets) if sets else set()
    keep = lambda o: o not in common and o.split("=", 1)[0].lstrip("+~") not in shown
    return {r["run"]: [o for o in r["overrides"] if keep(o)] for r in runs}


def markdown_table(runs: list[dict]) -> str:
    """One row per run with results; metric columns only where some run has the metric."""
    done = [r for r in runs if r["status"] == "ok"]
    cols = [c for c in COLUMNS if any(r["metrics"].get(c[1]) is not None for r in done)]
    swept = varied(runs)
    show_swept = any(swept[r["run"]] for r in done)
    head = ["run", "method", "accelerator", "sampler", "steps", *(["overrides"] if show_swept else []),
            *(c[0] for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in done:
        names = [r["run"], *(str(r[k]) if r[k] is not None else "–" for k in ("method", "accelerator", "sampler",
                                                                            "steps"))]
        extra = [" ".join(swept[r["run"]]) or "–"] if show_swept else []
        lines.append("| " + " | ".join(names + extra + [fmt(r["metrics"].get(k), 1, d) for _, k, d in cols]) + " |")
    return "\n".join(lines)


def problems_table(runs: list[dict]) -> str:
    """Runs without results: failed, refused, missing, each with its reason ('' when there are none)."""
    bad = [r for r in runs if r["status"] != "ok"]
    if not bad:
        return ""
    swept = varied(runs, shown=())  # a missing run has nothing else to say what it was
    lines = ["| run | status | overrides | reason |", "|---|---|---|---|"]
    for r in bad:
        reason = (r["reason"] or "").replace("|", "\\|")
        lines.append(f"| {r['run']} | {r['status']} | {' '.join(swept[r['run']]) or '–'} | {reason} |")
    return "\n".join(lines)


def sign(quality: str) -> float:
    """+1 where lower is better, -1 where higher is."""
    return -1.0 if quality in HIGHER_BETTER else 1.0


def points(runs: list[dict], quality: str, x: str = "sec_per_image") -> list[tuple[float, float, dict]]:
    return [(r["metrics"][x], r["metrics"][quality], r) for r in runs if r["status"] == "ok"
            and r["metrics"].get(x) is not None and r["metrics"].get(quality) is not None]


def pareto(runs: list[dict], quality: str) -> list[str]:
    """Runs no other run beats on both seconds per image and quality (at least as good on both, better on
    one), fastest first."""
    s, pts = sign(quality), points(runs, quality)
    beats = lambda a, b: a[0] <= b[0] and s * a[1] <= s * b[1] and (a[0] < b[0] or s * a[1] < s * b[1])
    front = [p for p in pts if not any(beats(q, p) for q in pts)]
    return [p[2]["run"] for p in sorted(front, key=lambda p: (p[0], s * p[1]))]


def pick_quality(runs: list[dict], asked: str | None) -> str | None:
    """The asked metric, else the first of FID, digit_acc, ... that some run has."""
    if asked:
        return asked
    present = {k for r in runs for k, v in r["metrics"].items() if v is not None}
    return next((k for k in LOWER_BETTER[:1] + HIGHER_BETTER[:1] + LOWER_BETTER[1:] + HIGHER_BETTER[1:]
                 if k in present), None)


# -- plots ------------------------------------------------------------------------------------------------
def axes(figsize: tuple[float, float] = (5, 3.5)):
    """A matplotlib figure and axes drawn off-screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def direction(quality: str) -> str:
    return "higher is better" if sign(quality) < 0 else "lower is better"


def pair_name(r: dict) -> str:
    return str(r["method"]) if r["accelerator"] in (None, "none") else f"{r['method']} + {r['accelerator']}"


def plot_speed(runs: list[dict], quality: str, front: list[str], path: Path) -> None:
    """Quality against seconds per image, every run labelled, the Pareto front joined and in red."""
    fig, ax = axes()
    pts = points(runs, quality)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="grey", zorder=2)
    names = [pair_name(r) for _, _, r in pts]  # method (+ accelerator) when that tells the points apart
    names = names if len(set(names)) == len(names) else [r["run"] for _, _, r in pts]
    for (x, y, _), name in zip(pts, names):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    best = sorted((p for p in pts if p[2]["run"] in front), key=lambda p: p[0])
    ax.plot([p[0] for p in best], [p[1] for p in best], color="tab:red", marker="o", zorder=3, label="Pareto front")
    if pts and max(p[0] for p in pts) > 10 * min(p[0] for p in pts) > 0:
        ax.set_xscale("log")
    ax.set(xlabel="seconds per image", ylabel=f"{quality} ({direction(quality)})", title=f"{quality} vs speed")
    ax.legend()
    save(fig, path)


def plot_nfe(runs: list[dict], quality: str, path: Path) -> None:
    """Quality against NFE per image, one line per method (and accelerator, when one is on)."""
    fig, ax = axes()
    pts = points(runs, quality, "nfe_per_image")
    for name in dict.fromkeys(pair_name(p[2]) for p in pts):
        line = sorted((x, y) for x, y, r in pts if pair_name(r) == name)
        ax.plot(*zip(*line), marker="o", label=name)
    ax.set(xlabel="NFE per image", ylabel=f"{quality} ({direction(quality)})", title=f"{quality} vs NFE")
    ax.legend(fontsize=7)
    save(fig, path)


# -- the verb ---------------------------------------------------------------------------------------------
def report(runs: list[dict], quality: str | None, out: Path, title: str) -> str:
    """report.md's text; writes the plots into `out` when the runs have the numbers for them."""
    done = [r for r in runs if r["status"] == "ok"]
    without = [r["status"] for r in runs if r["status"] != "ok"]
    counts = {s: without.count(s) for s in dict.fromkeys(without)}
    text = [f"# Sweep report: {title}", "",
            f"{len(done)} runs with results" + "".join(f", {n} {s}" for s, n in counts.items()) + ".", ""]
    if done:
        text += [markdown_table(runs), ""]
    if quality and points(runs, quality):
        front = pareto(runs, quality)
        speed, nfe = f"{quality}_vs_sec_per_image.png", f"{quality}_vs_nfe.png"
        plot_speed(runs, quality, front, out / speed)
        text += [f"Pareto front ({quality}, {direction(quality)}, vs seconds per image): {', '.join(front)}", ""]
        if points(runs, quality, "nfe_per_image"):
            plot_nfe(runs, quality, out / nfe)
            text += [f"![{quality} vs seconds per image]({speed}) ![{quality} vs NFE]({nfe})", ""]
    elif done:
        text += [f"No plots: no run has both {quality or 'a quality metric'} and sec_per_image "
                 f"(sample with metrics=default, or pick --quality).", ""]
    if len(done) < len(runs):
        text += ["## Runs without results", "", problems_table(runs), ""]
    return "\n".join(text)


def write_html(runs: list[dict], text: str, quality: str | None, out: Path, title: str) -> None:
    """report.html beside report.md (hiresrun/report_html.py): the same tables and plots, and the images."""
    from hiresrun import report_html

    done = [r for r in runs if r["status"] == "ok"]
    swept = varied(runs, shown=("method", "accelerator", "task"))  # a column's name: the pair and what else varies
    names = {r["run"]: " ".join([pair_name(r), *swept[r["run"]]]) for r in runs}
    plots = [out / f"{quality}_vs_{x}.png" for x in ("sec_per_image", "nfe") if quality and f"{quality}_vs_{x}.png"
             in text]
    report_html.write(runs, text, [markdown_table(runs) if done else "", problems_table(runs)], plots, names, title,
                      out / "report.html")


def main(argv: list[str] | None = None) -> int:
    """`hiresrun report <multirun dir> [...] [--out DIR] [--quality fid]`: write report.md and the plots into
    the sweep folder (or --out) and print the report."""
    ap = argparse.ArgumentParser(prog="hiresrun report", description=main.__doc__.split("\n")[0])
    ap.add_argument("sweeps", nargs="+", type=Path, help="hydra multirun folders (hydra.sweep.dir), or run folders")
    ap.add_argument("--out", type=Path, help="where report.md and the PNGs go (default: the sweep folder)")
    ap.add_argument("--quality", choices=LOWER_BETTER + HIGHER_BETTER,
                    help="the metric of the Pareto front and the plots (default: fid, else digit_acc, ...)")
    args = ap.parse_args(argv)
    for s in args.sweeps:
        if not s.is_dir():
            raise UsageError(f"report: {s} is not a folder; pass a multirun folder (hydra.sweep.dir)")
    if args.out is None and len(args.sweeps) > 1:
        raise UsageError("report: several sweeps need --out DIR for report.md and the plots")
    runs = load_sweeps(args.sweeps)
    if not runs:
        raise UsageError(f"report: no job folders in {args.sweeps[0]}; pass a multirun folder (hydra.sweep.dir)")
    out = args.out or args.sweeps[0]
    try:  # writable before any plot is drawn
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"report: cannot write into {out} ({e.strerror or e}); pass --out <a writable folder>") \
            from None
    quality, title = pick_quality(runs, args.quality), ", ".join(map(str, args.sweeps))
    text = report(runs, quality, out, title)
    (out / "report.md").write_text(text)
    write_html(runs, text, quality, out, title)
    print(text)
    print(f"hiresrun: report of {len(runs)} runs -> {out / 'report.md'}, {out / 'report.html'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        sys.exit(f"hiresrun: error: {e}")
