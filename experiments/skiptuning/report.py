"""Skip-Tuning sweeps -> the rho x NFE table (FID, KID, digit_acc; best rho per NFE in bold) and FID-vs-rho plots.

    python experiments/skiptuning/report.py <multirun dir> [...] [--out experiments/skiptuning]

Runs are read with hiresrun.report.load_sweep (the general `hiresrun report`; this is its Skip-Tuning view).
Runs that differ in anything but rho and NFE (method, resolution, sampler, depth mode, time schedule, FID
computed or not) get their own table and plot. With --out it writes results.json (per-run metrics and
overrides), report.md and vs_rho_<setting>.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from collections import defaultdict
from pathlib import Path

from hiresrun.report import axes, fmt, load_sweep, save

KEEP = ("fid", "fid_floor", "kid", "kid_std", "swd", "digit_acc", "digit_conf", "fd_digits", "num_samples",
        "resolution", "nfe_per_image", "sec_per_image", "method", "sampler", "accelerator")


def describe(acc: dict) -> tuple[float, str]:
    """(rho on the table's axis, the rest of the accelerator's setting): rho_bottom stands for a linear ramp."""
    if not str(acc.get("_target_", "")).endswith("SkipTuning"):
        return 1.0, "constant"  # accelerator=none is rho = 1
    mode = acc.get("mode", "constant")
    rho = acc["rho"] if mode == "constant" else acc["rho_bottom"]
    label = mode if mode == "constant" else f"linear to {acc['rho_top']}"
    if acc.get("time_schedule", "none") != "none":
        label += f", {acc['time_schedule']} in t"
    return float(rho), label


def load_runs(sweeps: list[Path]) -> list[dict]:
    """One record per finished run of each sweep (hiresrun.report.load_sweep, in folder-name order): the
    metrics, rho, NFE, setting and overrides."""
    runs = []
    for sweep in sweeps:
        for job in sorted((j for j in load_sweep(sweep) if j["status"] == "ok"), key=lambda j: j["run"]):
            metrics = job["metrics"]
            rho, mode = describe(job["config"].get("accelerator") or {})
            setting = f"{metrics['method']} {metrics['resolution']}px {metrics['sampler']} {mode}"
            setting += "" if metrics.get("fid") is not None else " (digit metrics only)"
            runs.append({"run": f"{Path(sweep).name}/{job['run']}", "setting": setting, "rho": rho,
                         "nfe": round(metrics["nfe_per_image"]), **{k: metrics.get(k) for k in KEEP},
                         "overrides": job["overrides"]})
    return runs


def by_setting(runs: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in runs:
        groups[r["setting"]].append(r)
    return dict(groups)


def ranking_key(runs: list[dict]) -> str:
    """FID when every run has it; digit-only runs (metrics.fid=false) are ranked by fd_digits."""
    return "fid" if all(r["fid"] is not None for r in runs) else "fd_digits"


def best_rho(runs: list[dict]) -> dict[int, float]:
    """Per NFE, the rho with the lowest FID (or fd_digits) within one setting."""
    key, best = ranking_key(runs), {}
    for r in sorted(runs, key=lambda r: r[key]):
        best.setdefault(r["nfe"], r["rho"])
    return dict(sorted(best.items()))


def markdown_table(runs: list[dict]) -> str:
    """rho rows x NFE columns of `FID / KIDx1e3 / digit_acc / fd_digits`, best rho per NFE in bold, then the
    ranking metric's change from rho = 1 to the best rho, and fid_floor (FID of real images at the same n)."""
    nfes, rhos, key = sorted({r["nfe"] for r in runs}), sorted({r["rho"] for r in runs}), ranking_key(runs)
    cell, best = {(r["rho"], r["nfe"]): r for r in runs}, best_rho(runs)
    lines = ["| rho | " + " | ".join(f"NFE {n}: FID / KID×10³ / digit_acc / fd_digits" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for rho in rhos:
        row = []
        for n in nfes:
            r = cell.get((rho, n))
            text = "–" if r is None else (f"{fmt(r['fid'])} / {fmt(r['kid'], 1e3)} / {fmt(r['digit_acc'], 1, 3)}"
                                          f" / {fmt(r['fd_digits'])}")
            row.append(f"**{text}**" if r is not None and best[n] == rho else text)
        lines.append(f"| {rho:g} | " + " | ".join(row) + " |")
    gains = []
    for n in nfes:
        one, top = cell.get((1.0, n)), cell[(best[n], n)]
        gains.append("–" if one is None else f"best rho {best[n]:g}: {100 * (top[key] / one[key] - 1):+.1f}% {key}")
    lines.append("| vs rho=1 | " + " | ".join(gains) + " |")
    floors = [fmt(next(r["fid_floor"] for r in runs if r["nfe"] == n)) for n in nfes]
    lines.append("| fid_floor | " + " | ".join(floors) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], title: str, path: Path) -> None:
    """FID (or fd_digits) against rho, one line per NFE."""
    fig, ax, key = *axes(), ranking_key(runs)
    for n in sorted({r["nfe"] for r in runs}):
        pts = sorted((r["rho"], r[key]) for r in runs if r["nfe"] == n)
        ax.plot(*zip(*pts), marker="o", label=f"{n} NFE")
    ax.set(xlabel="rho_bottom (linear ramp to rho_top)" if "linear" in title else "rho",
           ylabel=f"{key} (lower is better)", title=title)
    ax.legend()
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="hydra multirun folders")
    parser.add_argument("--out", type=Path, help="write results.json, report.md and the plots here")
    args = parser.parse_args()
    runs = load_runs(args.sweeps)
    if not runs:
        raise SystemExit(f"no <job>/metrics.json under {', '.join(map(str, args.sweeps))}: pass hydra multirun folders")
    sections, can_plot = [], importlib.util.find_spec("matplotlib") is not None
    if args.out and not can_plot:
        print("matplotlib is not installed: tables only (pip install matplotlib for the plots)")
    for setting, group in by_setting(runs).items():
        n = sorted({r["num_samples"] for r in group})
        sections.append(f"### {setting} (n = {', '.join(map(str, n))})\n\n{markdown_table(group)}\n")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
        if args.out and can_plot:
            plot(group, setting, args.out / f"vs_rho_{re.sub(r'[^a-z0-9]+', '_', setting.lower()).strip('_')}.png")
    report = "\n".join(sections)
    print(report)
    if args.out:
        (args.out / "report.md").write_text(report)
        (args.out / "results.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
