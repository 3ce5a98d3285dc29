"""Skip-Tuning sweeps -> the rho x NFE table (FID, KID, digit_acc; best rho per NFE in bold) and FID-vs-rho plots.

    python experiments/skiptuning/report.py <multirun dir> [...] [--out experiments/skiptuning]
    python experiments/skiptuning/report.py --from-json experiments/skiptuning/results.json --out experiments/skiptuning

Runs are read with hiresrun.report.load_sweep (the general `hiresrun report`; this is its Skip-Tuning view).
Runs that differ in anything but rho and NFE (method, resolution, sampler, depth mode, time schedule, FID
computed or not, number of samples) get their own table and plot (a plot only where rho varies). With --out
it writes results.json (per-run metrics and overrides), report.md and vs_rho_<setting>.png; with --out
experiments/skiptuning it also rewrites the tables of this folder's README (between its `<!-- table:... -->`
markers). --from-json renders everything but results.json again from a results.json, no sweep folders needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from collections import defaultdict
from pathlib import Path

from hiresrun.outputs import write_block
from hiresrun.report import axes, fmt, load_sweep, save

HERE = Path(__file__).resolve().parent

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
    runs, names = [], set()
    for sweep in map(Path, sweeps):
        # a second sweep folder of the same name (e.g. n1000/ddim16_10 beside ddim16_10) is named with its parent
        name = sweep.name if sweep.name not in names else f"{sweep.parent.name}/{sweep.name}"
        names.add(sweep.name)
        for job in sorted((j for j in load_sweep(sweep) if j["status"] == "ok"), key=lambda j: j["run"]):
            metrics = job["metrics"]
            rho, mode = describe(job["config"].get("accelerator") or {})
            setting = f"{metrics['method']} {metrics['resolution']}px {metrics['sampler']} {mode}"
            setting += "" if metrics.get("fid") is not None else " (digit metrics only)"
            runs.append({"run": f"{name}/{job['run']}", "setting": setting, "rho": rho,
                         "nfe": round(metrics["nfe_per_image"]), **{k: metrics.get(k) for k in KEEP},
                         "overrides": job["overrides"]})
    return runs


def by_setting(runs: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """(setting, n) -> its runs, in first-seen order: the same setting at another n is a table of its own."""
    groups = defaultdict(list)
    for r in runs:
        groups[r["setting"], r["num_samples"]].append(r)
    return dict(groups)


def plot_name(setting: str, n: int, first_n: int) -> str:
    """vs_rho_<setting>.png; a setting also run at another n than its first gets _n<n> on the name."""
    slug = re.sub(r"[^a-z0-9]+", "_", setting.lower()).strip("_")
    return f"vs_rho_{slug}.png" if n == first_n else f"vs_rho_{slug}_n{n}.png"


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


# -- the README's tables (experiments/skiptuning/README.md, between its table markers) -------------------------
FID16, FID32 = "none 16px ddim constant", "none 32px ddim constant"
DIGITS16 = "none 16px ddim constant (digit metrics only)"
SC32 = "selfcascade 32px ddim constant"
N = 300                                                      # sections 1-3: n = 300; section 0: n = 1000
PAPER = ("| paper: EDM ImageNet-64, Heun | 19 | constant 0.78 | FID 3.64 -> 1.88 | -48 % |",
         "| paper: same, tuned (linear) | 19 | not transcribed | FID 3.64 -> 1.75 | -52 % |",
         "| paper: LDM ImageNet-256 (eps-prediction) | 10 steps | 0.78 | FID 4.91 -> 4.67 | -5 % |")


def cells(r: dict | None) -> str:
    return "–" if r is None else (f"{fmt(r['fid'])} / {fmt(r['kid'], 1e3)} / {fmt(r['digit_acc'], 1, 3)} / "
                                  f"{fmt(r['fd_digits'])}")


def change(new: float, base: float) -> str:
    """Relative change in percent: one decimal below 100 %, none above."""
    pct = 100 * (new / base - 1)
    return f"{pct:+.1f} %" if abs(pct) < 100 else f"{pct:+.0f} %"


def n1000_table(g16: list[dict], g32: list[dict]) -> str:
    """Section 0: rho rows, the 16 px base and the 32 px tuned Self-Cascade (both 10 sampler steps; Self-Cascade
    spends 17 NFE on them, pivot pass included) side by side, best FID per column in bold."""
    for g in (g16, g32):
        if len({r["nfe"] for r in g}) != 1:
            raise ValueError(f"{g[0]['setting']} at n = {g[0]['num_samples']}: one step count expected")
    cols = [{r["rho"]: r for r in g} for g in (g16, g32)]
    best = [min(c.values(), key=lambda r: r["fid"])["rho"] for c in cols]
    lines = ["| rho | 16 px `none`: FID / KID×10³ / digit_acc / fd_digits | 32 px tuned Self-Cascade (`resblock`, 300 "
             "steps): FID / KID×10³ / digit_acc / fd_digits |", "|---|---|---|"]
    for rho in sorted(set(cols[0]) | set(cols[1])):
        row = [f"**{cells(c[rho])}**" if b == rho else cells(c.get(rho)) for c, b in zip(cols, best)]
        lines.append(f"| {rho} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def time_table(one: dict, arm: list[dict]) -> str:
    """Time-schedule arm: rho = 1 (`one`), then the arm's constant, increasing and decreasing schedules at its rho."""
    by = {o.split("=", 1)[1]: r for r in arm for o in r["overrides"] if o.startswith("accelerator.time_schedule=")}
    if set(by) != {"none", "increasing", "decreasing"}:
        raise KeyError(f"time-schedule runs none, increasing, decreasing expected; found {sorted(by)}")
    rho = by["none"]["rho"]
    rows = [("rho = 1 (no tuning)", one), (f"none (rho = {rho:g} at every t)", by["none"]),
            (f"increasing ({rho:g} at t = 0, 1.0 at t = T)", by["increasing"]),
            (f"decreasing (1.0 at t = 0, {rho:g} at t = T)", by["decreasing"])]
    best = min(r["fd_digits"] for _, r in rows)
    lines = ["| schedule | digit_acc | fd_digits |", "|---|---|---|"]
    for label, r in rows:
        fd = fmt(r["fd_digits"])
        lines.append(f"| {label} | {fmt(r['digit_acc'], 1, 3)} | {f'**{fd}**' if r['fd_digits'] == best else fd} |")
    return "\n".join(lines)


def paper_table(g16: list[dict], g32: list[dict], digits: list[dict], nfe: int = 10) -> str:
    """The paper's numbers (transcribed) beside ours: the best rho < 1 against rho = 1, and the paper-like 0.8."""
    lines = ["| setting | NFE | rho | base -> skip-tuned | change |", "|---|---|---|---|---|", *PAPER]
    for px, g in ((16, g16), (32, g32)):
        at = {r["rho"]: r for r in g if r["nfe"] == nfe}
        top = min((r for rho, r in at.items() if rho < 1), key=lambda r: r["fid"])
        lines.append(f"| ours: tiny-mnist {px} px, DDIM | {nfe} | best rho < 1 = {top['rho']:g} | "
                     f"FID {fmt(at[1.0]['fid'])} -> {fmt(top['fid'])} | {change(top['fid'], at[1.0]['fid'])} |")
        if px == 16:
            d = {r["rho"]: r for r in digits if r["nfe"] == nfe and
                 "accelerator.time_schedule=none" not in r["overrides"]}
            lines.append(f"| ours: tiny-mnist 16 px, DDIM | {nfe} | 0.8 (paper-like) | fd_digits "
                         f"{fmt(d[1.0]['fd_digits'])} -> {fmt(d[0.8]['fd_digits'])} | "
                         f"{change(d[0.8]['fd_digits'], d[1.0]['fd_digits'])} |")
    return "\n".join(lines)


def readme_tables(runs: list[dict]) -> dict[str, str]:
    """Every results table of the README, by its marker name, from the runs of results.json."""
    groups = by_setting(runs)
    need = {"n1000-16": (FID16, 1000), "n1000-sc32": (SC32, 1000), "grid32": (FID32, N), "native16": (FID16, N),
            "digits16": (DIGITS16, N), "dpm16": ("none 16px dpmsolver constant (digit metrics only)", N),
            "linear16": ("none 16px ddim linear to 1.0 (digit metrics only)", N)}
    missing = [f"{s} (n = {n})" for s, n in need.values() if (s, n) not in groups]
    if missing:
        raise KeyError(f"no runs for {', '.join(missing)}: the README tables need every sweep of its Commands")
    g = {k: groups[v] for k, v in need.items()}
    # the time-schedule arm's rho = 0.8 "none" run lands in the DDIM digit grid's setting too; the grid shows it
    # once (the same seeds and settings as the grid's own rho = 0.8 run, so the same numbers)
    grid = [r for r in g["digits16"] if "accelerator.time_schedule=none" not in r["overrides"]] or g["digits16"]
    return {"n1000": n1000_table(g["n1000-16"], g["n1000-sc32"]), "grid32": markdown_table(g["grid32"]),
            "native16": markdown_table(g["native16"]), "digits16": markdown_table(grid),
            "dpm16": markdown_table(g["dpm16"]), "linear16": markdown_table(g["linear16"]),
            "time16": time_table(next(r for r in grid if r["nfe"] == 10 and r["rho"] == 1.0),
                                 [r for r in runs if r["num_samples"] == N and r["resolution"] == 16 and
                                  any(o.startswith("accelerator.time_schedule=") for o in r["overrides"])]),
            "paper": paper_table(g["native16"], g["grid32"], g["digits16"])}


def write_readme(runs: list[dict], readme: Path = HERE / "README.md") -> None:
    for name, table in readme_tables(runs).items():
        write_block(readme, name, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="*", type=Path, help="hydra multirun folders")
    parser.add_argument("--from-json", type=Path, help="render from this results.json instead of sweep folders")
    parser.add_argument("--out", type=Path, help="write results.json, report.md and the plots here")
    args = parser.parse_args()
    if bool(args.sweeps) == bool(args.from_json):
        parser.error("pass hydra multirun folders or --from-json results.json (one of the two)")
    runs = json.loads(args.from_json.read_text()) if args.from_json else load_runs(args.sweeps)
    if not runs:
        raise SystemExit(f"no <job>/metrics.json under {', '.join(map(str, args.sweeps))}: pass hydra multirun folders")
    sections, can_plot = [], importlib.util.find_spec("matplotlib") is not None
    if args.out and not can_plot:
        print("matplotlib is not installed: tables only (pip install matplotlib for the plots)")
    first_n = {}
    for (setting, n), group in by_setting(runs).items():
        first_n.setdefault(setting, n)
        sections.append(f"### {setting} (n = {n})\n\n{markdown_table(group)}\n")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
        if args.out and can_plot and len({r["rho"] for r in group}) > 1:  # one rho: nothing to plot against
            title = setting if n == first_n[setting] else f"{setting} (n = {n})"
            plot(group, title, args.out / plot_name(setting, n, first_n[setting]))
    report = "\n".join(sections)
    print(report)
    if args.out:
        (args.out / "report.md").write_text(report)
        if not args.from_json:
            (args.out / "results.json").write_text(json.dumps(runs, indent=1))
        if args.out.resolve() == HERE:
            write_readme(runs)
            print(f"tables of {HERE / 'README.md'} rewritten")


if __name__ == "__main__":
    main()
